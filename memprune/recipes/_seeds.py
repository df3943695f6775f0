"""A recipe run over several seeds: one whole loop per seed, then numbers with intervals.

``seeds: [0, 1, 2]`` runs the recipe once per seed into ``RUN/seed_<s>/``, each an ordinary
run directory with its own report. Seed ``s`` sets everything a run draws at random: the
pair's and the supervised encoder's training, the candidate / extra split
(``data.split_seed + s``), the views the scores and probes see, and the seeds of the actions
(random pruning, recovery, fine-tuning: ``x + 1000 s`` for each listed ``x``, so no two loops
share a random draw). Seed 0 is exactly the single-seed run with ``seed: 0``.

``RUN/report.md`` then gives every headline number as mean ± a 95% confidence interval over
the seeds (Student's t with n - 1 degrees of freedom) and every comparison as the mean paired
difference (same seed, both sides) with its interval: it *exceeds the spread* when the
interval excludes zero. The papers' claims are judged in each seed's own run and combined:
a claim holds over seeds when it holds in every seed. The claims about pruning and fine-tuning
are also judged on their paired differences over seeds, and decided when either way decides
without the other contradicting it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path

from memprune._io import write_json, write_text
from memprune._table import format_table
from memprune.recipes._findings import (
    FAILS,
    FINETUNE_CLAIM,
    HOLDS,
    PRUNE_CLAIM,
    SKIPPED,
    UNSURE,
    combine,
    findings,
)
from memprune.recipes._schema import Recipe
from memprune.recipes._stages import STAGES, read_metrics, typed

#: Offset between the action seeds of two loops.
ACTION_STRIDE = 1000
#: A paired comparison whose 95% interval over seeds excludes zero.
EXCEEDS = "exceeds the spread"


def seed_dir(run: Path, seed: int) -> Path:
    return Path(run) / f"seed_{seed}"


def seed_recipe(recipe: Recipe, seed: int) -> Recipe:
    """The single-seed recipe of loop ``seed`` (see the module docstring)."""
    r = dataclasses.replace(recipe, seed=seed, seeds=None)
    r.data = dataclasses.replace(recipe.data, split_seed=recipe.data.split_seed + seed)
    prune, tune = recipe.actions.prune, recipe.actions.finetune
    r.actions = dataclasses.replace(
        recipe.actions,
        prune=dataclasses.replace(prune, seeds=[x + ACTION_STRIDE * seed for x in prune.seeds]),
        finetune=dataclasses.replace(tune, seeds=[x + ACTION_STRIDE * seed for x in tune.seeds]),
    )
    return r


# ---------------------------------------------------------------- numbers of one loop


def headline_values(m: dict) -> dict[str, float]:
    """The headline numbers of one run's stage metrics, by label (accuracies in [0, 1]): what
    each registered stage reports over seeds."""
    return {label: value for name, result in typed(m).items()
            for label, value in STAGES[name].values(result).items()}  # fmt: skip


def comparisons(labels: list[str]) -> list[tuple[str, str]]:
    """The pairs ``(a, b)`` whose paired difference ``a - b`` the report tests."""
    have = set(labels)
    pairs = [("SSLMem, candidates", "SSLMem, extras"),
             ("linear probe, f", "linear probe, supervised"),
             ("knn probe, f", "knn probe, supervised"),
             ("linear probe, f", "linear probe, g"),
             ("UnitMem mean, f", "ClassMem mean, f"),
             ("UnitMem mean, supervised", "ClassMem mean, supervised")]  # fmt: skip
    for label in labels:
        if label.startswith("pruned lowest "):
            for other in ("random", "magnitude", "highest"):
                pairs.append((label, label.replace("lowest", other, 1)))
            pairs.append((label.replace("lowest", "random", 1),
                          label.replace("lowest", "highest", 1)))  # fmt: skip
        if label.startswith("fine-tuned top"):
            k = label.rsplit(" ", 1)[1]
            pairs += [(label, f"fine-tuned {b} {k}") for b in ("last", "random", "first")]
            pairs.append((label, "fine-tuned all"))
    return [(a, b) for a, b in pairs if a in have and b in have]


# ---------------------------------------------------------------- statistics over seeds


def interval(values: list[float], level: float = 0.95) -> tuple[float, float | None]:
    """Mean and the half-width of its t confidence interval (None with one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    from scipy.stats import t

    sd = statistics.stdev(values)
    return mean, float(t.ppf(0.5 + level / 2, len(values) - 1)) * sd / math.sqrt(len(values))


def _fmt(x: float, pct: bool) -> str:
    return f"{100 * x:.1f}%" if pct else f"{x:+.4f}"


def _is_pct(label: str) -> bool:
    return "probe" in label or label.startswith(("pruned", "fine-tuned", "unpruned"))


def over_seeds(per_seed: dict[int, dict[str, float]]) -> tuple[list[dict], list[dict]]:
    """Headline rows and comparison rows over the seeds that have each number."""
    labels = list(dict.fromkeys(k for vals in per_seed.values() for k in vals))
    rows = []
    for label in labels:
        vals = [v[label] for v in per_seed.values() if label in v]
        mean, half = interval(vals)
        rows.append({"label": label, "mean": mean, "half": half, "values": vals,
                     "pct": _is_pct(label)})  # fmt: skip
    comps = []
    for a, b in comparisons(labels):
        diffs = [v[a] - v[b] for v in per_seed.values() if a in v and b in v]
        mean, half = interval(diffs)
        verdict = ("one seed: no spread" if half is None else
                   EXCEEDS if abs(mean) > half else "within the spread")  # fmt: skip
        comps.append({"a": a, "b": b, "mean": mean, "half": half, "values": diffs,
                      "verdict": verdict, "pct": _is_pct(a)})  # fmt: skip
    return rows, comps


def combine_seeds(verdicts: list[str]) -> str:
    """A claim over seeds: holds (does not hold) when it does in every evaluated seed."""
    judged = [v for v in verdicts if v != SKIPPED]
    if not judged:
        return SKIPPED
    if all(v == HOLDS for v in judged):
        return HOLDS
    return FAILS if all(v == FAILS for v in judged) else UNSURE


def _claim_comparisons(claim: str, comp: dict) -> bool:
    """Whether comparison row ``comp`` is one of the paired differences ``claim`` rests on
    (a − b > 0 when the claim holds)."""
    a, b = comp["a"], comp["b"]
    if claim == PRUNE_CLAIM:  # plain one-shot pruning, as in the one-run check
        return (a.startswith(("pruned lowest ", "pruned random ")) and b.startswith(
            "pruned highest ") and ", " not in a + b)  # fmt: skip
    return a.startswith("fine-tuned top delta ") and b.startswith("fine-tuned last ")


def paired_claims(comps: list[dict]) -> dict[str, tuple[str, str]]:
    """The action claims judged on their paired differences over seeds: claim -> (verdict,
    figure). A difference holds when it exceeds the spread (its row in the comparison table) above
    zero and fails when it does below; the claim combines its differences as in one run. Claims
    without such differences (or with one seed) are left out: they are judged seed by seed."""
    out = {}
    for claim in (PRUNE_CLAIM, FINETUNE_CLAIM):
        mine = [c for c in comps if _claim_comparisons(claim, c) and c["half"] is not None]
        if not mine:
            continue
        verdicts = [(HOLDS if c["mean"] > 0 else FAILS) if c["verdict"] == EXCEEDS else UNSURE
                    for c in mine]  # fmt: skip
        figure = "; ".join(
            f"{c['a'].split(' ', 1)[1]} − {c['b'].split(' ', 1)[1]}: {100 * c['mean']:+.1f}"
            f" ± {100 * c['half']:.1f} points over {len(c['values'])} seeds"
            for c in mine
        )
        out[claim] = (combine(verdicts), figure)
    return out


def both_ways(runs: str, over: str) -> str:
    """An action claim from its verdict in the seeds' runs and its paired verdict over seeds:
    decided when one of them decides and the other does not contradict it."""
    if runs == SKIPPED:
        return SKIPPED
    decided = {runs, over} - {UNSURE}
    return decided.pop() if len(decided) == 1 else UNSURE


# ---------------------------------------------------------------- the report


def seeds_of(run: Path) -> list[int]:
    return sorted(int(p.name.split("_", 1)[1]) for p in Path(run).glob("seed_*")
                  if p.is_dir() and p.name.split("_", 1)[1].isdigit())  # fmt: skip


def aggregate(run: Path, seeds: list[int]) -> dict:
    """``metrics.json`` of a seeds run: each seed's stage metrics and the numbers over seeds."""
    per_seed = {s: read_metrics(seed_dir(run, s)) for s in seeds}
    values = {s: headline_values(m) for s, m in per_seed.items()}
    rows, comps = over_seeds(values)
    return {"seeds": seeds, "per_seed": {str(s): m for s, m in per_seed.items()},
            "headlines": rows, "comparisons": comps}  # fmt: skip


def _cell(row: dict) -> str:
    mean, half = row["mean"], row["half"]
    if half is None:
        return _fmt(mean, row["pct"])
    return f"{_fmt(mean, row['pct'])} ± {100 * half:.1f}" if row["pct"] else (
        f"{mean:+.4f} ± {half:.4f}")  # fmt: skip


def _per_seed(row: dict) -> str:
    return " ".join(_fmt(v, row["pct"]) for v in row["values"])


def seeds_report_lines(run: Path, recipe: dict, env: dict, agg: dict) -> list[str]:
    seeds = agg["seeds"]
    n = len(seeds)
    headlines = format_table(
        ["number", "mean ± 95% CI", "per seed"],
        [[r["label"], _cell(r), _per_seed(r)] for r in agg["headlines"]], markdown=True,
    )  # fmt: skip
    compared = format_table(
        ["a", "b", "a − b", "verdict", "per seed"],
        [[c["a"], c["b"], _cell(c), c["verdict"], _per_seed(c)] for c in agg["comparisons"]],
        markdown=True,
    )  # fmt: skip
    lines = [
        f"# memprune report: {recipe['name']}, {n} seeds",
        "",
        f"- encoder: `{recipe['encoder']['model']}` at {recipe['encoder'].get('img_size')} px;"
        f" data: `{recipe['data']['name']}`; seeds {', '.join(map(str, seeds))} (one whole loop"
        " each: pair, split, scores, probes, pruning, fine-tuning)",
        f"- device: {env.get('device')} ({env.get('device_name')}, {env.get('threads')} threads);"
        f" git {str((env.get('git') or {}).get('revision'))[:12]}",
        "- each seed's run, with its own report, tables and plots: "
        + ", ".join(f"[seed_{s}](seed_{s}/report.md)" for s in seeds),
        "",
        f"## Headline numbers over {n} seeds",
        "",
        f"Mean ± the half-width of the 95% confidence interval (t, {n - 1} degrees of freedom);"
        " accuracies in %, their intervals in points.",
        "",
        headlines,
        "",
        "## Comparisons, paired over seeds",
        "",
        "The difference a − b within each seed, its mean and 95% interval over seeds; it exceeds"
        " the spread when the interval excludes zero.",
        "",
        compared,
        "",
        "## The papers' findings, over seeds",
        "",
        "Each claim is judged in every seed's run (difference beyond 2 standard errors there):"
        " it holds over seeds when it holds in every seed, does not hold when it fails in every"
        " seed, and is inconclusive otherwise. The claims about pruning and fine-tuning are"
        " also judged on their paired differences over seeds (the comparisons above, 95%"
        " intervals, which carry the whole loop's variation; a run with one action seed has no"
        " spread of its own): they are decided when either way decides and the other does not"
        " contradict it.",
        "",
    ]
    per_seed = {s: findings(seed_dir(run, s), agg["per_seed"][str(s)]) for s in seeds}
    paired = paired_claims(agg["comparisons"])
    for i, first in enumerate(per_seed[seeds[0]]):
        runs = combine_seeds([per_seed[s][i].verdict for s in seeds])
        if first.claim in paired:
            over, figure = paired[first.claim]
            lines.append(f"- **{both_ways(runs, over)}**: {first.claim} — in the seeds' runs:"
                         f" {runs}; paired over seeds: {over} ({figure}).")  # fmt: skip
        else:
            lines.append(f"- **{runs}**: {first.claim}.")
        for s in seeds:
            f = per_seed[s][i]
            lines.append(f"  - seed {s}: {f.verdict} — {f.figure}.")
    lines.append("")
    return lines


def render_seeds_report(run: Path, recipe: dict, env: dict) -> Path:
    agg = aggregate(run, seeds_of(run))
    write_json(run / "metrics.json", agg)
    return write_text(run / "report.md", "\n".join(seeds_report_lines(run, recipe, env, agg)))


def clear_seeds(run: Path) -> None:
    import shutil

    for p in Path(run).glob("seed_*"):
        if p.is_dir():
            shutil.rmtree(p)
    for name in ("report.md", "metrics.json", *STAGES):
        path = Path(run) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
