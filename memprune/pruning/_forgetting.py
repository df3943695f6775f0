"""What a pruning sweep forgets, example by example (docs/method.md §9c; Hooker et al. 2019):
per pruned encoder, the test points whose probe outcome flips against the unpruned encoder
and how a per-point score (memorization or atypicality) predicts the forgotten ones; per
setting, the pruning-identified exemplars (PIEs): points whose most common prediction over
the setting's seeds differs from the unpruned encoder's."""

from __future__ import annotations

import torch

from memprune.errors import ConfigError
from memprune.probe import flip_auc, flips, top_share

#: The settings a sweep's run records are grouped by for PIEs.
SETTING = ("strategy", "ratio", "steps", "recovery")
#: The unpruned encoder's setting in :func:`by_setting`.
UNPRUNED = ("none", 0.0, 0, "none")


def _name(record: dict) -> str:
    return record["model_dir"].split("/", 1)[-1]


def by_setting(runs: list[dict], outcomes: dict, base: str = "unpruned") -> dict:
    """(strategy, ratio, steps, recovery) -> the probe results of its seeds, the unpruned
    encoder's under ``("none", 0.0, 0, "none")`` (what :func:`prune_verdicts` takes)."""
    groups = {UNPRUNED: [outcomes[base]]}
    for record in runs:
        groups.setdefault(tuple(record[k] for k in SETTING), []).append(outcomes[_name(record)])
    return groups


def forgetting_rows(runs: list[dict], outcomes: dict, score: torch.Tensor | None,
                    top: float = 0.1, base: str = "unpruned") -> list[dict]:  # fmt: skip
    """One row per run of :func:`compare_pruning` (``outcomes``: its probe results by name,
    ``base`` the unpruned one): forgotten / learned counts against ``base``, and with
    ``score`` (per test point, sorted by index; higher = more memorized or atypical) the AUC
    with which it predicts a forgotten point and the forgotten points' share in its ``top``
    fraction (chance: ``top``). An AUC is None where nothing (or everything) was forgotten."""
    if base not in outcomes:
        raise ConfigError(f"outcomes hold no {base!r} probe result to compare against")
    rows = []
    for record in runs:
        fl = flips(outcomes[base], outcomes[_name(record)])
        row = {**{k: record[k] for k in (*SETTING, "seed")}, "model": _name(record),
               **fl.counts()}  # fmt: skip
        if score is not None:
            row["flip_auc"] = flip_auc(fl.forgotten, score)
            row["top_share"] = top_share(fl.forgotten, score, top)
        rows.append(row)
    return rows


def pie_rows(runs: list[dict], outcomes: dict, score: torch.Tensor | None,
             base: str = "unpruned") -> list[dict]:  # fmt: skip
    """Per setting of the sweep: the PIEs (points whose modal prediction over the setting's
    seeds differs from ``base``'s prediction), how many, the share that ``base`` got right,
    and with ``score`` the AUC with which it predicts a PIE (None without PIEs)."""
    ref = outcomes[base]
    groups = by_setting(runs, outcomes, base)
    rows = []
    for key, results in groups.items():
        if key == UNPRUNED:  # the reference itself
            continue
        preds = torch.stack([r.predictions for r in results])  # [seeds, N]
        modal = torch.mode(preds, dim=0).values
        pie = modal != ref.predictions
        row = {**dict(zip(SETTING, key)), "seeds": len(results), "pies": int(pie.sum()),
               "pies_base_right": float(ref.correct()[pie].double().mean()) if pie.any()
               else None}  # fmt: skip
        if score is not None:
            row["pie_auc"] = flip_auc(pie, score)
        rows.append(row)
    return rows


def typicality(encoder, train, test, k: int = 10, **features) -> torch.Tensor:
    """Per test point (sorted by index): the mean cosine distance of its features to its
    ``k`` nearest training points', under ``encoder``; higher = more atypical (a score for
    test points, which no encoder trained on, so they have no SSLMem)."""
    from memprune.probe import extract_features

    tr = extract_features(encoder, train, **features).features
    te = extract_features(encoder, test, **features).features
    tr = torch.nn.functional.normalize(tr.double(), dim=1)
    te = torch.nn.functional.normalize(te.double(), dim=1)
    sims = te @ tr.T
    k = min(k, sims.shape[1])
    return (1 - sims.topk(k, dim=1).values).mean(1).float()


#: What a probe result's ``meta`` may hold of f's memorization (:func:`privacy_rows`): the
#: canaries' membership AUC and member gap from the encoder alone; the candidates' mean
#: SSLMem against g, that of unseen test points (the control) and their difference
#: (``memorization``, with its standard error over the scored points). Lower = less
#: memorization, except for the control and the standard error.
SIGNALS = (
    "canary_auc",
    "canary_gap",
    "sslmem",
    "sslmem_unseen",
    "memorization",
    "memorization_point_se",
)
#: The signals the privacy-utility front minimizes (each where recorded).
FRONT_SIGNALS = ("canary_auc", "memorization")


def privacy_rows(rows: list[dict], groups: dict) -> list[dict]:
    """The privacy-utility table: per row of a :func:`compare_pruning` table (the unpruned
    first), the accuracy, the MACs and the means over the setting's encoders of the
    :data:`SIGNALS` their probe results' ``meta`` hold (with ``<signal>_se``, the standard
    error over the setting's seeds, where it has more than one encoder). ``front``: on the
    privacy-utility front, where no other row has at least the accuracy, at most the MACs and
    at most each recorded signal of :data:`FRONT_SIGNALS`, one of them strictly.
    ``groups``: :func:`by_setting`."""
    import statistics

    out = []
    for row in rows:
        key = tuple(row[k] for k in SETTING)
        metas = [r.meta for r in groups.get(key, [])]
        keys = [k for k in SIGNALS if metas and all(k in m for m in metas)]
        if not keys:
            continue
        entry = {k: row[k] for k in (*SETTING, "accuracy", "macs_ratio")}
        for k in keys:
            values = [m[k] for m in metas]
            entry[k] = statistics.mean(values)
            if len(values) > 1 and not k.endswith("_se"):
                entry[f"{k}_se"] = statistics.stdev(values) / len(values) ** 0.5
        out.append(entry | {"encoders": len(metas)})
    for r in out:
        r["front"] = not any(_dominates(o, r) for o in out if o is not r)
    return out


def _dominates(a: dict, b: dict) -> bool:
    keys = [k for k in FRONT_SIGNALS if k in a and k in b]
    pairs = [(a["accuracy"], b["accuracy"]), *((-a[k], -b[k]) for k in keys),
             (-a["macs_ratio"], -b["macs_ratio"])]  # fmt: skip
    return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)


def privacy_verdicts(rows: list[dict], groups: dict | None = None) -> list[str]:
    """What a :func:`privacy_rows` table says, in sentences: per ratio and recovery (one-shot
    schedules), which criterion leaves the least memorization (the candidates' SSLMem beyond
    unseen points where recorded, else the canaries' membership AUC), its lead over the
    runner-up against their seed spread (two standard errors of the difference; a criterion
    with one encoder has no spread and is not judged by it), and the accuracy it costs
    against the most accurate criterion at that setting.

    With ``groups`` (:func:`by_setting`) whose probe results' ``meta`` hold the per-point
    SSLMem (``sslmem_points``, ``sslmem_unseen_points``), the lead is also weighed against
    the scored points' noise: paired over the same points (each setting's mean over seeds),
    two standard errors of the difference."""
    if not rows:
        return []
    signal = "memorization" if "memorization" in rows[0] else "canary_auc"
    what = {"memorization": "candidates' SSLMem beyond unseen points",
            "canary_auc": "canary membership AUC"}[signal]  # fmt: skip
    base = next((r for r in rows if r["strategy"] == "none"), None)
    lines = []
    if base is not None:
        se = base.get(f"{signal}_point_se")
        over = "" if se is None else f" ± {se:.3f} (standard error over the scored points)"
        lines.append(f"{what}: {base[signal]:.3f} unpruned{over}")
    pruned = [r for r in rows if r["strategy"] != "none" and r.get("steps", 1) == 1]
    for ratio in sorted({r["ratio"] for r in pruned}):
        for rec in dict.fromkeys(r["recovery"] for r in pruned):
            at = sorted((r for r in pruned if r["ratio"] == ratio and r["recovery"] == rec),
                        key=lambda r: r[signal])  # fmt: skip
            if len(at) < 2:
                continue
            rec_text = "without recovery" if rec == "none" else f"after {rec}"
            tied = [r["strategy"] for r in at if r[signal] == at[0][signal]]
            others = [r for r in at if r[signal] != at[0][signal]]
            if not others:  # every criterion leaves the same (e.g. identical encoders)
                value = f"{at[0][signal]:.3f}"
                lines.append(f"{100 * ratio:g}% removed, {rec_text}: {', '.join(tied)} tie at"
                             f" {what} {value}")  # fmt: skip
                continue
            low, second = at[0], others[0]
            top = max(at, key=lambda r: r["accuracy"])
            lead = second[signal] - low[signal]
            ses = [r.get(f"{signal}_se") for r in (low, second)]
            if None in ses:
                spread = "one encoder of a criterion: no seed spread, not judged"
            else:
                two = 2 * (ses[0] ** 2 + ses[1] ** 2) ** 0.5
                side = "beyond" if lead > two else "within"
                spread = f"{side} the seed spread (2 SE {two:.3f})"
            cost = 100 * (top["accuracy"] - low["accuracy"])
            acc = (
                "the most accurate too"
                if top is low
                else f"{cost:.1f} points below {top['strategy']}'s {100 * top['accuracy']:.1f}%"
            )
            noise = _point_noise(low, second, lead, groups) if signal == "memorization" else ""
            who = low["strategy"] if len(tied) == 1 else f"{' and '.join(tied)} (equal)"
            verb = "leaves" if len(tied) == 1 else "leave"
            lines.append(
                f"{100 * ratio:g}% removed, {rec_text}: {who} {verb} the least"
                f" memorization ({what} {low[signal]:.3f}, {lead:.3f} below"
                f" {second['strategy']}; {spread}{noise}), accuracy"
                f" {100 * low['accuracy']:.1f}%, {acc}"
            )
    return lines


def _point_noise(low: dict, second: dict, lead: float, groups: dict | None) -> str:
    """``; within/beyond the scored points' noise (paired 2 SE x)`` for two settings, from
    their encoders' per-point SSLMem; empty where they were not recorded."""
    keys = ("sslmem_points", "sslmem_unseen_points")

    def points(row):
        metas = [r.meta for r in (groups or {}).get(tuple(row[k] for k in SETTING), [])]
        if not metas or not all(k in m for m in metas for k in keys):
            return None
        return [torch.tensor([m[k] for m in metas], dtype=torch.float64).mean(0) for k in keys]

    a, b = points(low), points(second)
    if a is None or b is None:
        return ""
    d_members, d_unseen = b[0] - a[0], b[1] - a[1]
    two = 2 * float(d_members.var() / len(d_members) + d_unseen.var() / len(d_unseen)) ** 0.5
    side = "beyond" if lead > two else "within"
    return f"; {side} the scored points' noise (paired 2 SE {two:.3f})"
