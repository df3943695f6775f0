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


def privacy_rows(rows: list[dict], groups: dict) -> list[dict]:
    """The privacy-utility table: per row of a :func:`compare_pruning` table (the unpruned
    first), the accuracy, the MACs and the means over the setting's encoders of what their
    probe results' ``meta`` holds of the canaries (``canary_auc``: membership AUC of included
    against excluded canaries at the output; ``canary_gap``: their member gap, excluded minus
    included alignment loss). ``front``: on the privacy-utility front, where no other row has
    at least the accuracy, at most the canary AUC and at most the MACs, one of them strictly.
    ``groups``: :func:`by_setting`."""
    out = []
    for row in rows:
        key = tuple(row[k] for k in SETTING)
        metas = [r.meta for r in groups.get(key, []) if "canary_auc" in r.meta]
        if not metas:
            continue
        means = {k: sum(m[k] for m in metas) / len(metas) for k in ("canary_auc", "canary_gap")}
        out.append({k: row[k] for k in (*SETTING, "accuracy", "macs_ratio")} | means
                   | {"encoders": len(metas)})  # fmt: skip
    for r in out:
        r["front"] = not any(_dominates(o, r) for o in out if o is not r)
    return out


def _dominates(a: dict, b: dict) -> bool:
    better = (a["accuracy"] >= b["accuracy"], a["canary_auc"] <= b["canary_auc"],
              a["macs_ratio"] <= b["macs_ratio"])  # fmt: skip
    strictly = (a["accuracy"] > b["accuracy"], a["canary_auc"] < b["canary_auc"],
                a["macs_ratio"] < b["macs_ratio"])  # fmt: skip
    return all(better) and any(strictly)
