"""The qualitative claims of the LayerMem / UnitMem papers, checked on a run's own numbers.

Each claim is a list of comparisons, each a difference ``d`` with a standard error ``se``
taken from the run (points, units, blocks or seeds): it *holds* when ``d > 2 se``, *does not
hold* when ``d < -2 se`` and is *inconclusive* in between. A claim holds when every one of its
comparisons holds and does not hold when any of them fails; otherwise it is inconclusive. A
claim whose inputs the run lacks is *not evaluated*, with the reason. Units of one encoder are
not independent samples, so the unit-level standard errors are optimistic; the section says
which figure each verdict rests on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from memprune._table import difference_se

HOLDS, FAILS, UNSURE, SKIPPED = "holds", "does not hold", "inconclusive", "not evaluated"


@dataclass(frozen=True)
class Finding:
    claim: str
    verdict: str
    figure: str


def judge(d: float, se: float | None) -> str:
    """``holds`` when ``d > 2 se``, ``does not hold`` when ``d < -2 se``, else inconclusive
    (also without a standard error: no spread to judge by)."""
    if se is None or not math.isfinite(se):
        return UNSURE
    if d > 2 * se:
        return HOLDS
    return FAILS if d < -2 * se else UNSURE


def combine(verdicts: list[str]) -> str:
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    return FAILS if FAILS in verdicts else UNSURE


def _mean_se(x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    return float(x.mean()), float(x.std() / math.sqrt(len(x))) if len(x) > 1 else math.nan


def _load(path: Path):
    import memprune.scores  # noqa: F401  (the result classes load_any chooses from)
    from memprune.results import load_any

    return load_any(path) if path.is_file() else None


def layermem_depth(run: Path, metrics: dict) -> Finding:
    claim = ("LayerMem rises with depth but not monotonically, and the largest ΔLayerMem is"
             " not in the last layer")  # fmt: skip
    lm = _load(run / "layermem" / "layermem.safetensors")
    if lm is None:
        return Finding(claim, SKIPPED, "the run has no layermem stage")
    layers = [name for name in lm.layers if name != "output"]
    per_point = lm.sslmem[:, : len(layers)]  # [N, L] SSLMem per point and layer
    if len(layers) < 3:
        return Finding(claim, SKIPPED, f"only {len(layers)} layers")
    rise, rise_se = _mean_se(per_point[:, -1] - per_point[:, 0])
    steps = [_mean_se(per_point[:, i] - per_point[:, i + 1]) for i in range(len(layers) - 1)]
    drop = max(range(len(steps)), key=lambda i: steps[i][0] / (steps[i][1] or 1e-12))
    delta = lm.delta()[: len(layers)]
    top = int(delta.argmax())
    deltas = per_point[:, 1:] - per_point[:, :-1]  # per-point ΔLayerMem of layers 2..L
    by_point = torch.cat([per_point[:, :1], deltas], 1)
    lead, lead_se = _mean_se(by_point[:, top] - by_point[:, -1])
    verdicts = [
        judge(rise, rise_se),
        judge(*steps[drop]),  # the largest drop between consecutive layers
        judge(lead, lead_se) if top != len(layers) - 1 else FAILS,
    ]
    figure = (
        f"last − first layer {rise:+.4f} ± {rise_se:.4f}; largest drop {layers[drop]} →"
        f" {layers[drop + 1]} {steps[drop][0]:+.4f} ± {steps[drop][1]:.4f}; largest ΔLayerMem"
        f" at {layers[top]} ({float(delta[top]):+.4f}), {lead:+.4f} ± {lead_se:.4f} above"
        f" the last layer {layers[-1]}"
    )
    return Finding(claim, combine(verdicts), figure)


def top_vs_least(run: Path, metrics: dict) -> Finding:
    lm = _load(run / "layermem" / "layermem.safetensors")
    claim = "the most memorized points have higher LayerMem than the least in every layer"
    if lm is None:
        return Finding(claim, SKIPPED, "the run has no layermem stage")
    ranked = lm.ranked()
    top, least = ranked["top"], ranked["least"]
    claim = (f"the {len(top)} most memorized points have higher LayerMem than the"
             f" {len(least)} least in every layer")  # fmt: skip
    per_point = lm.sslmem
    layers = [name for name in lm.layers if name != "output"]
    verdicts, worst = [], None
    for j, name in enumerate(layers):
        a, b = per_point[top, j].double(), per_point[least, j].double()
        d = float(a.mean() - b.mean())
        se = math.sqrt(float(a.var()) / len(a) + float(b.var()) / len(b))
        verdicts.append(judge(d, se))
        if worst is None or d / (se or 1e-12) < worst[1] / (worst[2] or 1e-12):
            worst = (name, d, se)
    n_holds = verdicts.count(HOLDS)
    figure = (
        f"higher beyond 2 SE in {n_holds} of {len(layers)} layers (points ranked by the"
        f" output's SSLMem); weakest at {worst[0]}: {worst[1]:+.4f} ± {worst[2]:.4f}"
    )
    return Finding(claim, combine(verdicts), figure)


def units_vs_classes(run: Path, metrics: dict) -> Finding:
    claim = ("SSL encoders have units that memorize points (UnitMem above ClassMem),"
             " supervised encoders units that memorize classes (the reverse)")  # fmt: skip
    stage = run / "classmem"
    pairs = {
        "f": (run / "unitmem" / "unitmem.safetensors", stage / "classmem_f.safetensors"),
        "supervised": (stage / "unitmem_supervised.safetensors",
                       stage / "classmem_supervised.safetensors"),
    }  # fmt: skip
    figures, verdicts = [], []
    for name, (unit_path, class_path) in pairs.items():
        unit, cls = _load(unit_path), _load(class_path)
        if unit is None or cls is None:
            return Finding(claim, SKIPPED, f"the run has no UnitMem and ClassMem of {name}")
        sites = [s for s in unit.sites if s in cls.sites]
        diff = torch.cat([unit[s]["score"] - cls[s]["score"] for s in sites])
        d, se = _mean_se(diff)
        verdicts.append(judge(d if name == "f" else -d, se))
        more = float((diff > 0).double().mean())
        figures.append(f"{name}: UnitMem − ClassMem {d:+.3f} ± {se:.3f} per unit"
                       f" ({100 * more:.0f}% of {len(diff)} units higher by UnitMem)")  # fmt: skip
    return Finding(claim, combine(verdicts), "; ".join(figures))


def mlp_vs_attention(run: Path, metrics: dict) -> Finding:
    claim = "in ViTs, the MLP sublayers memorize more than the attention sublayers (UnitMem)"
    unit = _load(run / "unitmem" / "unitmem.safetensors")
    if unit is None:
        return Finding(claim, SKIPPED, "the run has no unitmem stage")
    roles = {name: info.get("role") for name, info in unit.meta.get("sites", {}).items()}
    blocks: dict[str, dict[str, list[float]]] = {}
    for name in unit.sites:
        kind = roles.get(name)
        if kind in ("mlp", "attn"):
            block = name.split(".mlp")[0].split(".attn")[0]
            blocks.setdefault(block, {}).setdefault(kind, []).append(unit[name]["score"])
    paired = {b: v for b, v in blocks.items() if "mlp" in v and "attn" in v}
    if not paired:
        return Finding(claim, SKIPPED, "the encoder has no attention and MLP unit sites (a CNN)")
    diff = torch.tensor([
        float(torch.cat(v["mlp"]).mean() - torch.cat(v["attn"]).mean()) for v in paired.values()
    ])  # fmt: skip
    d, se = _mean_se(diff)
    higher = int((diff > 0).sum())
    figure = (f"MLP − attention mean UnitMem per block {d:+.3f} ± {se:.3f} over {len(diff)}"
              f" blocks (MLP higher in {higher})")  # fmt: skip
    return Finding(claim, judge(d, se), figure)


def _seed_gap(a: dict, b: dict, value: str) -> tuple[str, float, str]:
    """Verdict, difference and spread text of table row ``a`` minus row ``b`` in ``value``
    (the standard error from their seed spreads)."""
    d = a[value] - b[value]
    se = difference_se(a["std"], a["seeds"], b["std"], b["seeds"])
    spread = "one seed each: no spread" if se is None else f"± {100 * se:.1f}"
    return judge(d, se), d, spread


#: The two claims about actions; over seeds they are judged on paired differences.
PRUNE_CLAIM = ("removing the highest-UnitMem units hurts the probe more than removing the lowest"
               " or random ones")  # fmt: skip
FINETUNE_CLAIM = ("fine-tuning the top-ΔLayerMem layers beats fine-tuning the last layers at the"
                  " same k")  # fmt: skip


def pruning_highest(run: Path, metrics: dict) -> Finding:
    claim = PRUNE_CLAIM
    rows = (metrics.get("prune") or {}).get("rows")
    if not rows:
        return Finding(claim, SKIPPED, "the run has no prune stage")
    plain = [r for r in rows if r["recovery"] == "none" and r["steps"] <= 1]
    by = {(r["strategy"], r["ratio"]): r for r in plain}
    ratios = sorted({r for s, r in by if s == "highest"})
    if not ratios:
        return Finding(claim, SKIPPED, "the pruning sweep has no `highest` strategy")
    verdicts, parts = [], []
    for ratio in ratios:
        high = by[("highest", ratio)]
        for other in ("lowest", "random"):
            if (other, ratio) in by:
                verdict, d, spread = _seed_gap(by[(other, ratio)], high, "accuracy")
                verdicts.append(verdict)
                parts.append(f"{other} − highest at {ratio:.0%}: {100 * d:+.1f} points ({spread})")
    return Finding(claim, combine(verdicts), "; ".join(parts))


FORGET_CLAIM = "pruning forgets atypical examples first (Hooker et al.'s PIEs)"


def pruning_forgets_atypical(run: Path, metrics: dict) -> Finding:
    """Per criterion, the mean over its pruned encoders of the AUC with which the test points'
    atypicality (f's kNN distance) predicts a forgotten point, against 0.5 (chance)."""
    per = (metrics.get("prune") or {}).get("forgetting")
    if not per:
        return Finding(FORGET_CLAIM, SKIPPED, "the run did not record forgetting"
                       " (actions.prune.forgetting: true)")  # fmt: skip
    verdicts, parts = [], []
    for row in per:
        if row["auc"] is None:
            parts.append(f"{row['strategy']}: nothing forgotten")
            continue
        verdicts.append(judge(row["auc"] - 0.5, row["auc_se"]))
        se = "one encoder: no spread" if row["auc_se"] is None else f"± {row['auc_se']:.3f}"
        parts.append(f"{row['strategy']} AUC {row['auc']:.3f} ({se}, {row['n']} encoders)")
    return Finding(FORGET_CLAIM, combine(verdicts) if verdicts else UNSURE, "; ".join(parts))


def finetune_top(run: Path, metrics: dict) -> Finding:
    claim = FINETUNE_CLAIM
    rows = (metrics.get("finetune") or {}).get("rows")
    if not rows:
        return Finding(claim, SKIPPED, "the run has no finetune stage")
    by = {(r["strategy"], r["k"]): r for r in rows}
    ks = sorted(k for s, k in by if s == "top delta" and ("last", k) in by)
    if not ks:
        return Finding(claim, SKIPPED, "the run compares no `top delta` with `last` at one k")
    verdicts, parts = [], []
    for k in ks:
        top, last = by[("top delta", k)], by[("last", k)]
        verdict, d, spread = _seed_gap(top, last, "mean")
        verdicts.append(verdict)
        parts.append(f"k={k}: top − last {100 * d:+.1f} points ({spread}, {top['seeds']} seeds)")
    return Finding(claim, combine(verdicts), "; ".join(parts))


SHIFT_CLAIM = (
    "input-level shifts are best fine-tuned in earlier layers than feature- and"
    " output-level shifts (surgical fine-tuning)"
)


def shifts_depth(run: Path, metrics: dict) -> Finding:
    """Per shift and seed, the depth (0 first, 1 last) of the single layer whose fine-tuning
    scored best; non-input minus input shifts, with the Welch standard error over those."""
    import json

    path = run / "shifts" / "results.json"
    if metrics.get("shifts") is None or not path.is_file():
        return Finding(SHIFT_CLAIM, SKIPPED, "the run has no shifts stage")
    results = json.loads(path.read_text())
    depth: dict[str, list[float]] = {}
    for shift in dict.fromkeys(r["shift"] for r in results["oracle"]):
        single = [r for r in results["oracle"] if r["shift"] == shift and r["k"] == 1]
        accs = torch.tensor([[float(a) for a in r["accuracies"].split()] for r in single])
        family = single[0]["family"]
        best = accs.argmax(0).double() / max(1, len(single) - 1)  # per seed
        depth.setdefault("input" if family == "input" else "other", []).extend(best.tolist())
    if len(depth) < 2 or min(len(v) for v in depth.values()) < 2:
        return Finding(SHIFT_CLAIM, SKIPPED, "the run needs input-level and other shifts")
    a, b = torch.tensor(depth["other"]), torch.tensor(depth["input"])
    d = float(a.mean() - b.mean())
    se = math.sqrt(float(a.var()) / len(a) + float(b.var()) / len(b))
    figure = (f"depth of the best single layer (0 first, 1 last), per shift and seed: input"
              f" {float(b.mean()):.2f}, feature and output {float(a.mean()):.2f}; difference"
              f" {d:+.2f} ± {se:.2f}")  # fmt: skip
    return Finding(SHIFT_CLAIM, judge(d, se), figure)


def cka_depth(run: Path, metrics: dict) -> Finding:
    claim = "SSL and supervised encoders agree in early layers and diverge with depth (CKA)"
    c = metrics.get("cka")
    if not c:
        return Finding(claim, SKIPPED, "the run has no cka stage (it needs a supervised encoder)")
    layers, folds = list(c["cka"]), torch.tensor(c["folds"], dtype=torch.float64)
    if len(layers) < 2:
        return Finding(claim, SKIPPED, f"only {len(layers)} layer")
    d = float(folds[:, 0].mean() - folds[:, -1].mean()) if len(folds) else math.nan
    se = _mean_se(folds[:, 0] - folds[:, -1])[1] if len(folds) else math.nan
    profile = ", ".join(f"{v:.2f}" for v in c["cka"].values())
    figure = (
        f"CKA by depth {profile} ({layers[0]} … {layers[-1]}); first − last layer"
        f" {d:+.3f} ± {se:.3f} over {len(folds)} disjoint minibatches of {c['minibatch']}"
    )
    return Finding(claim, judge(d, se), figure)


def findings(run: str | Path, metrics: dict) -> list[Finding]:
    """Every claim of every registered stage, checked on the run directory ``run`` and its
    stage ``metrics`` (a claim whose stage did not run is *not evaluated*)."""
    from memprune.recipes._stages import STAGES

    return [claim(Path(run), metrics) for stage in STAGES.values() for claim in stage.findings]


def findings_lines(run: str | Path, metrics: dict) -> list[str]:
    """The report's section: one line per claim, verdict first, then the figure."""
    checked = findings(run, metrics)
    out = [f"- **{f.verdict}**: {f.claim} — {f.figure}." for f in checked]
    skipped = sum(f.verdict == SKIPPED for f in checked)
    out += ["", f"A comparison holds when its difference exceeds 2 standard errors; {skipped}"
            " claims were not evaluated (the reasons are given above)."]  # fmt: skip
    return out


ATYPICAL_CLAIM = "atypical (canary) points are memorized more than typical points"
ABLATION_CLAIM = ("UnitMem's most memorizing units are where ablation removes the canaries'"
                  " signal")  # fmt: skip


def canaries_atypical(run: Path, metrics: dict) -> Finding:
    """The canaries' membership effect (included minus excluded SSLMem) against that of typical
    points (candidates minus extras): memorization is what membership adds, and g never sees a
    point of the canaries' kind, so the included canaries' SSLMem alone is not compared with the
    candidates' (it is shown beside the verdict)."""
    c = metrics.get("canaries")
    if not c:
        return Finding(ATYPICAL_CLAIM, SKIPPED, "the run has no canaries")
    d, se = c["atypical_diff"], c["atypical_se"]
    return Finding(ATYPICAL_CLAIM, judge(d, se),
                   f"membership effect on SSLMem, canaries (included − excluded"
                   f" {c['sslmem_diff']:+.4f}) − typical points (candidates − extras"
                   f" {c['typical_diff']:+.4f}): {d:+.4f} ± {se:.4f}; without the control,"
                   f" included canaries − candidates {c['raw_atypical_diff']:+.4f}")  # fmt: skip


def canaries_ablation(run: Path, metrics: dict) -> Finding:
    """Ablating the canary units lowers the canaries' SSLMem difference more than ablating as
    many random units of the same sites (the spread over random seeds)."""
    c = metrics.get("canaries")
    if not c:
        return Finding(ABLATION_CLAIM, SKIPPED, "the run has no canaries")
    d, se = c["canary_drop"] - c["random_drop"], c["random_drop_se"]
    spread = "one random seed: no spread" if se is None else f"random spread ± {se:.4f} over seeds"
    return Finding(ABLATION_CLAIM, judge(d, se),
                   f"drop of the canary SSLMem difference, canary units − random units:"
                   f" {d:+.4f} ({spread})")  # fmt: skip
