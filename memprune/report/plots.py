"""Plots, written atomically as PNG with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from memprune._io import atomic_write


def save_figure(fig, path: str | os.PathLike) -> Path:
    try:
        return atomic_write(
            path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        )
    finally:
        plt.close(fig)


def plot_unit_scores(result, path: str | os.PathLike, title: str | None = None) -> Path:
    """Per-site distributions of unit scores (box plots, forward order) with per-site means."""
    names = list(result.sites)
    data = [result.sites[n]["score"].numpy() for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 4.5))
    ax.boxplot(data, showfliers=True, flierprops={"markersize": 2, "alpha": 0.4})
    ax.plot(
        range(1, len(names) + 1),
        [d.mean() for d in data],
        "o-",
        color="tab:red",
        ms=3,
        label="mean",
    )
    ax.set_xticks(range(1, len(names) + 1), names, rotation=70, ha="right", fontsize=7)
    label = {"unitmem": "UnitMem", "classmem": "ClassMem"}.get(result.kind, result.kind)
    ax.set_ylabel(label)
    ax.set_ylim(-0.02, 1.02)
    ax.axhline(0.5, color="grey", lw=0.5, ls="--")
    ax.legend(loc="upper left", fontsize=8)
    meta = result.meta
    ax.set_title(
        title
        or f"{label} per site: {meta.get('model')} on {meta.get('data')}"
        f" ({meta.get('n_points')} points, {meta.get('n_views')} views)",
        fontsize=9,
    )
    return save_figure(fig, path)


def plot_layer_mem(result, path: str | os.PathLike) -> Path:
    """LayerMem and ΔLayerMem per layer, over all scored points and the top / least sets."""
    rows = result.table()
    names = [r["layer"] for r in rows]
    cols = [k for k in rows[0] if k.startswith("LayerMem")]
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.45 * len(names) + 2), 6.5), sharex=True)
    x = range(len(names))
    for col in cols:
        label = col.replace("LayerMem", "").lstrip("_") or "all"
        axes[0].plot(x, [r[col] for r in rows], "o-", ms=3, label=label)
        axes[1].bar([i + 0.27 * cols.index(col) - 0.27 for i in x], [r["d" + col] for r in rows],
                    width=0.27, label=label)  # fmt: skip
    axes[0].set_ylabel("LayerMem")
    axes[1].set_ylabel("ΔLayerMem")
    for ax in axes:
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=8)
    axes[1].set_xticks(list(x), names, rotation=70, ha="right", fontsize=7)
    meta = result.meta
    axes[0].set_title(f"LayerMem per layer ({meta.get('n_points')} points, {meta.get('n_pairs')}"
                      f" view pairs, {meta.get('representation')})", fontsize=9)  # fmt: skip
    return save_figure(fig, path)


def plot_member_gap(result, path: str | os.PathLike) -> Path:
    """Member gap per layer with its bootstrap interval, and the membership AUC."""
    rows = result.table()
    names = [r["layer"] for r in rows]
    x = list(range(len(names)))
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.45 * len(names) + 2), 6), sharex=True)
    gap = [r["gap"] for r in rows]
    err = [
        [g - r["gap_lo"] for g, r in zip(gap, rows)],
        [r["gap_hi"] - g for g, r in zip(gap, rows)],
    ]
    axes[0].errorbar(x, gap, yerr=err, fmt="o-", ms=3, capsize=3)
    axes[0].axhline(0, color="grey", lw=0.5)
    axes[0].set_ylabel("member gap")
    axes[1].plot(x, [r["auc"] for r in rows], "o-", ms=3, color="C1")
    axes[1].axhline(0.5, color="grey", lw=0.5)
    axes[1].set_ylabel("membership AUC")
    axes[1].set_xticks(x, names, rotation=70, ha="right", fontsize=7)
    meta = result.meta
    axes[0].set_title(f"members ({meta.get('n_members')}) vs non-members"
                      f" ({meta.get('n_nonmembers')}), {meta.get('n_pairs')} view pairs,"
                      f" {int(100 * result.level)}% bootstrap interval", fontsize=9)  # fmt: skip
    return save_figure(fig, path)


def plot_canaries(result, path: str | os.PathLike) -> Path:
    """Membership AUC of the included against the excluded canaries per layer (two standard
    errors shaded) and the TPR at 10% FPR."""
    rows = result.table()
    names = [r["layer"] for r in rows]
    x = list(range(len(names)))
    auc = [r["auc"] for r in rows]
    se = [r["auc_se"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 3.5), layout="constrained")
    ax.fill_between(x, [a - 2 * s for a, s in zip(auc, se)], [a + 2 * s for a, s in zip(auc, se)],
                    alpha=0.2, color="C0")  # fmt: skip
    ax.plot(x, auc, "o-", ms=3, color="C0", label="AUC (± 2 SE)")
    ax.plot(x, [r["tpr_at_10pct_fpr"] for r in rows], "s--", ms=3, color="C1",
            label="TPR at 10% FPR")  # fmt: skip
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set_ylim(0, 1.02)
    ax.set_xticks(x, names, rotation=70, ha="right", fontsize=7)
    ax.legend(fontsize=7)
    ax.set_title(f"{len(result.member_indices)} included vs {len(result.nonmember_indices)}"
                 " excluded canaries", fontsize=9)  # fmt: skip
    return save_figure(fig, path)


def plot_consistency(result, path: str | os.PathLike, k: int | None = None) -> Path:
    """Heat maps of Kendall tau and top-k overlap of per-point SSLMem between layers."""
    cons = result.consistency(k)
    names = result.layers
    size = max(4, 0.3 * len(names) + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size), layout="constrained")
    for i, (ax, (key, title)) in enumerate(
        zip(axes, (("kendall_tau", "Kendall tau"), ("topk_overlap", "top-k overlap")))
    ):
        im = ax.imshow(
            cons[key].numpy(), vmin=-1 if key == "kendall_tau" else 0, vmax=1, cmap="viridis"
        )
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        # the layer names once, on the left: on the right they would run into the first colorbar
        ax.set_yticks(range(len(names)), names if i == 0 else [], fontsize=6)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    return save_figure(fig, path)


def plot_confusion(
    confusion, path: str | os.PathLike, title: str = "", classes: list[str] | None = None
) -> Path:
    """A confusion matrix (rows: true class, columns: predicted), counts in the cells, the
    axes labelled with the class names when given."""
    cm = confusion.numpy()
    n = len(cm)
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * n + 1.5), max(3.5, 0.45 * n + 1)))
    im = ax.imshow(cm, cmap="Blues")
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")  # fmt: skip
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    if classes is not None and len(classes) == n:
        ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=7)
        ax.set_yticklabels(classes, fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save_figure(fig, path)


def plot_prune_tradeoff(rows: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Linear-probe accuracy (mean ± std over seeds) against parameters, MACs and latency: one
    line per strategy over its ratios (dashed after recovery, dotted for iterative schedules),
    the unpruned encoder as a star, Pareto-optimal points (row ``pareto``) ringed in black."""
    axes_keys = [("params", "parameters"), ("macs", "MACs"), ("latency_ms", "latency (ms)")]
    axes_keys = [(k, label) for k, label in axes_keys if all(k in r for r in rows)]
    from matplotlib.ticker import EngFormatter, MaxNLocator

    fig, axes = plt.subplots(1, len(axes_keys), figsize=(4.2 * len(axes_keys), 4.2), sharey=True,
                             layout="constrained")  # fmt: skip
    axes = [axes] if len(axes_keys) == 1 else list(axes)

    def key(r: dict) -> tuple:
        return r["strategy"], r.get("steps", 1), r.get("recovery", "none")

    keys = list(dict.fromkeys(key(r) for r in rows))
    colors = {s: f"C{i}" for i, s in enumerate(dict.fromkeys(k[0] for k in keys))}
    for ax, (cost, label) in zip(axes, axes_keys):
        for strategy, steps, recovery in keys:
            pts = sorted((r[cost], r["accuracy"], r.get("std", 0.0), cost in r.get("pareto", ""))
                         for r in rows if key(r) == (strategy, steps, recovery))  # fmt: skip
            xs, ys, es, front = zip(*pts)
            name = strategy + (f" x{steps}" if steps > 1 else "")
            name += "" if recovery == "none" else f" + {recovery}"
            if strategy == "none":
                ax.plot(xs, ys, "k*", ms=12, ls="", label=name)
            else:
                ls = ":" if steps > 1 else "--" if recovery != "none" else "-"
                ax.errorbar(xs, ys, yerr=es, color=colors[strategy], ls=ls, marker="o", ms=4,
                            capsize=2, label=name)  # fmt: skip
            ringed = [(x, y) for x, y, f in zip(xs, ys, front) if f]
            if ringed:
                ax.plot(*zip(*ringed), "o", ms=10, mfc="none", mec="k", mew=1.2)
        ax.set_xlabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(4))  # few, short labels: 1.2M, not 1200000
        ax.xaxis.set_major_formatter(EngFormatter(places=1, sep=""))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("linear-probe test accuracy (ringed: Pareto-optimal)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_finetune(rows: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Test accuracy (mean ± standard deviation over seeds) per strategy and k."""
    labels = [r["strategy"] if r["k"] == 0 else f"{r['strategy']} k={r['k']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(rows) + 2), 4))
    colors = [f"C{list(dict.fromkeys(r['strategy'] for r in rows)).index(r['strategy'])}"
              for r in rows]  # fmt: skip
    ax.bar(range(len(rows)), [r["mean"] for r in rows], yerr=[r["std"] for r in rows],
           color=colors, capsize=3)  # fmt: skip
    ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy")
    low = min(r["mean"] - r["std"] for r in rows)
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def plot_regret(rows: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Regret (oracle minus rule accuracy, mean ± standard error over seeds) per rule and k,
    one bar colour per shift (``rows``: the shifts stage's, each with ``shift``)."""
    rows = [r for r in rows if not r["rule"].startswith("oracle")]
    shifts = list(dict.fromkeys(r["shift"] for r in rows))
    rules = list(dict.fromkeys((r["rule"], r["k"]) for r in rows))
    width = 0.8 / max(1, len(shifts))
    fig, ax = plt.subplots(figsize=(min(16.0, 0.6 * len(rules) + 3), 4.5))
    for j, shift in enumerate(shifts):
        at = {(r["rule"], r["k"]): r for r in rows if r["shift"] == shift}
        xs = [i + (j - (len(shifts) - 1) / 2) * width for i, key in enumerate(rules) if key in at]
        got = [at[key] for key in rules if key in at]
        ax.bar(xs, [100 * r["regret"] for r in got], width,
               yerr=[100 * (r["regret_se"] or 0) for r in got], capsize=2, label=shift,
               color=f"C{j}")  # fmt: skip
    labels = [rule if k in (0,) or rule == "all" else f"{rule} k={k}" for rule, k in rules]
    ax.set_xticks(range(len(rules)), labels, rotation=45, ha="right", fontsize=8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_ylabel("regret (points below the oracle)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def plot_class_vs_unit(pairs: dict, path: str | os.PathLike) -> Path:
    """ClassMem against UnitMem per unit, one colour per encoder (e.g. SSL vs supervised)."""
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for label, (unit, cls) in pairs.items():
        ax.scatter(unit.numpy(), cls.numpy(), s=4, alpha=0.4, label=label)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
    ax.set_xlabel("UnitMem (per unit)")
    ax.set_ylabel("ClassMem (per unit)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, markerscale=3)
    ax.set_title("memorizing single points (x) vs selective for a class (y)", fontsize=9)
    return save_figure(fig, path)


def plot_sslmem(scores: dict, path: str | os.PathLike) -> Path:
    """Histograms of per-point SSLMem, e.g. of the candidates (f saw them) and the extras."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    lo = min(float(s.min()) for s in scores.values())
    hi = max(float(s.max()) for s in scores.values())
    for label, s in scores.items():
        ax.hist(s.numpy(), bins=30, range=(lo, hi), alpha=0.5,
                label=f"{label} (mean {float(s.mean()):.3f})")  # fmt: skip
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("SSLMem (> 0: f aligns the point's views better than g)")
    ax.set_ylabel("points")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_cka(result, path: str | os.PathLike, title: str = "") -> Path:
    """Heat map of CKA between the layers of a (rows) and b (columns), and per layer the CKA
    with the labels and between two augmented views."""
    fig, (ax, side) = plt.subplots(
        1, 2, figsize=(5 + 0.45 * len(result.layers_b), 4 + 0.3 * len(result.layers_a)),
        gridspec_kw={"width_ratios": [3, 2]},
    )  # fmt: skip
    im = ax.imshow(result.matrix.numpy(), vmin=0, vmax=1, cmap="magma")
    ax.set_xticks(range(len(result.layers_b)), result.layers_b, rotation=70, fontsize=7)
    ax.set_yticks(range(len(result.layers_a)), result.layers_a, fontsize=7)
    for i, row in enumerate(result.matrix.tolist()):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if v < 0.6 else "black")  # fmt: skip
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xlabel(result.meta.get("name_b", "b"))
    ax.set_ylabel(result.meta.get("name_a", "a"))
    side.plot(result.labels_a.numpy(), "o-", label=f"{result.meta.get('name_a', 'a')}: labels")
    if not result.meta.get("same_model"):
        side.plot(result.labels_b.numpy(), "s-", label=f"{result.meta.get('name_b', 'b')}: labels")
    if result.invariance_a is not None:
        side.plot(
            result.invariance_a.numpy(), "o--", label=f"{result.meta.get('name_a', 'a')}: views"
        )
        if not result.meta.get("same_model"):
            side.plot(result.invariance_b.numpy(), "s--",
                      label=f"{result.meta.get('name_b', 'b')}: views")  # fmt: skip
    side.set_xticks(range(len(result.layers_a)), result.layers_a, rotation=70, fontsize=7)
    side.set_ylim(-0.05, 1.05)
    side.set_ylabel("CKA")
    side.legend(fontsize=7)
    side.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_learnedness(result, path: str | os.PathLike) -> Path:
    """Mean learnedness over checkpoints, and the histogram of r(x) at the last one."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    curve = result.curve().numpy()
    left.plot(range(len(curve)), curve, "o-")
    left.set_xticks(range(len(curve)), result.checkpoints, rotation=60, fontsize=7)
    left.set_ylabel("mean r(x)")
    left.set_ylim(-0.02, 1.02)
    left.grid(alpha=0.3)
    r = result.points()[-1].numpy()
    right.hist(r, bins=min(20, result.learned.shape[1] * result.learned.shape[3] + 1),
               range=(0, 1))  # fmt: skip
    test = result.homogeneity()
    right.set_title(f"last checkpoint: chi2 p = {test['p_value']:.2g} (R = {test['R']})",
                    fontsize=9)  # fmt: skip
    right.set_xlabel("r(x)")
    right.set_ylabel("points")
    return save_figure(fig, path)
