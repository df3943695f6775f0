"""``shifts``: which layers to fine-tune, by kind of shift (docs/method.md §10b). Each shift of
``actions.shifts.shifts`` is made from the data set f was trained on; on each, every block of
layers is fine-tuned (the oracle) and every rule (top-k by each ranking, last, first, random,
all, the linear probe) at the same budget over seeds, with its regret against the oracle. The
report recommends the rule with the least regret for the user's shift, named or estimated."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from memprune.recipes._findings import shifts_depth
from memprune.recipes._stages import Stage, StageResult
from memprune.recipes.stages.evaluate import accuracy
from memprune.recipes.stages.finetune import needs_of, rankings

#: The rankings that read memorization (the others are baselines or Auto-RGN).
MEMORIZATION = ("delta", "layermem", "gap", "auc", "unitmem", "unitmem_frac")


@dataclass
class ShiftsTable(StageResult):
    data: str
    rows: list[dict]
    #: family -> the rule with the least mean regret, its regret and standard error
    best: dict = field(default_factory=dict)
    #: the user's shift: ``named`` (family) or the estimate, and the recommendation
    recommendation: dict = field(default_factory=dict)


def _data(ctx, spec: str, split: str):
    from memprune.data import Shift, seeded_subset, shifted

    r, c = ctx.recipe, ctx.recipe.actions.shifts
    shift = Shift.parse(spec, seed=r.seed)
    base = ctx.dataset(r.data.name, split)
    train = ctx.dataset(r.data.name, "train") if split != "train" else None
    if hasattr(base, "canaries"):  # the task is made of the data set's own points
        base = base.base
        train = train.base if train is not None else None
    data = shifted(base, shift, split, train)
    return seeded_subset(data, c.n_points, r.seed) if split == "train" else data


def family_best(rows: list[dict]) -> dict:
    """Family -> the non-oracle rule (and k) with the least regret averaged over the family's
    shifts, its mean regret and the standard error of that mean."""
    by_family: dict[str, dict[tuple, list[dict]]] = {}
    for row in rows:
        if not row["rule"].startswith("oracle"):
            by_family.setdefault(row["family"], {}).setdefault((row["rule"], row["k"]), [])
            by_family[row["family"]][(row["rule"], row["k"])].append(row)
    out = {}
    for family, rules in by_family.items():
        n = max(len(v) for v in rules.values())
        scored = {key: _mean_regret(v) for key, v in rules.items() if len(v) == n}
        (rule, k), (regret, se) = min(scored.items(), key=lambda kv: kv[1][0])
        out[family] = {"rule": rule, "k": k, "regret": regret, "regret_se": se, "shifts": n}
    return out


def _mean_regret(rows: list[dict]) -> tuple[float, float | None]:
    regret = sum(r["regret"] for r in rows) / len(rows)
    ses = [r["regret_se"] for r in rows]
    se = None if None in ses else math.sqrt(sum(s * s for s in ses)) / len(rows)
    return regret, se


def run(ctx, out: Path) -> ShiftsTable:
    from memprune._io import write_json
    from memprune._table import write_table
    from memprune.data import Shift
    from memprune.report import plot_regret
    from memprune.tuning import estimate_shift, shift_regret

    r, c = ctx.recipe, ctx.recipe.actions.shifts
    f = ctx.encoder("f")
    budget = dict(epochs=c.epochs, lr=c.lr, batch_size=c.batch_size, augment=c.augment)
    source = ctx.dataset(r.data.name, "train")
    rows, oracle, records, estimates = [], [], {}, {}
    for spec in c.shifts:
        shift = Shift.parse(spec, seed=r.seed)
        train, test = _data(ctx, spec, "train"), _data(ctx, spec, "test")
        ctx.log(f"shift {shift.name} ({shift.family}-level): {len(train)} train, {len(test)} test")

        def baseline(encoder, seed: int, train=train, test=test) -> float:
            return accuracy(ctx, encoder, train, test, seed=seed)

        made = rankings(ctx, train, c.by, key="actions.shifts.by")
        blocks, rule_rows, runs = shift_regret(f, made, train, test, c.k, c.strategies,
                                               c.seeds, baseline=baseline, log=ctx.log,
                                               **budget)  # fmt: skip
        tag = {"shift": shift.name, "family": shift.family}
        rows += [{**tag, **row} for row in rule_rows]
        oracle += [{**tag, **{k: v for k, v in b.items() if k != "accuracies"},
                    "accuracies": " ".join(f"{a:.4f}" for a in b["accuracies"])}
                   for b in blocks]  # fmt: skip
        records[shift.name] = runs
        est = estimate_shift(f, source.base if hasattr(source, "canaries") else source,
                             train, test, seed=r.seed)  # fmt: skip
        estimates[shift.name] = {"family": est["family"], "layer": est["layer"],
                                 "true": shift.family, "p_input": est["p_input"],
                                 "p_feature": est["p_feature"]}  # fmt: skip
        for row in est["rows"]:
            row.update(tag)
        write_table(out / f"estimate-{_slug(shift.name)}", est["rows"])
    best = family_best(rows)
    recommendation = _recommend(ctx, c, estimates, best)
    write_table(out / "regret", rows)
    write_table(out / "oracle", oracle)
    write_table(out / "estimates", [{"shift": k, **v} for k, v in estimates.items()])
    plot_regret(rows, out / "regret.png",
                f"regret against the oracle ({c.epochs} epochs, lr {c.lr:g})")  # fmt: skip
    write_json(out / "results.json", {
        "f": ctx.checkpoint("f"), "data": r.data.name, "options": asdict(c), "rows": rows,
        "oracle": oracle, "estimates": estimates, "best": best,
        "recommendation": recommendation, "runs": records,
    })  # fmt: skip
    return ShiftsTable(data=r.data.name, rows=rows, best=best, recommendation=recommendation)


def _slug(name: str) -> str:
    return name.replace(":", "-")


def _recommend(ctx, c, estimates: dict, best: dict) -> dict:
    """The user's shift (``actions.shifts.shift``: a family or a shift; else the estimate of
    the first shift, the task the recipe names first) and the family's best rule."""
    from memprune.data import FAMILIES, Shift

    if c.shift in FAMILIES:
        family, how = c.shift, "named in the recipe"
    elif c.shift is not None:
        family, how = Shift.parse(c.shift).family, f"named in the recipe ({c.shift})"
    else:
        first = Shift.parse(c.shifts[0]).name
        est = estimates[first]
        family = est["family"]
        where = f", moved most at {est['layer']}" if est["layer"] else ""
        how = f"estimated from f's features on {first}{where}"
    hits = sum(e["family"] == e["true"] for e in estimates.values())
    out = {"family": family, "how": how, "estimates_right": hits, "estimates": len(estimates)}
    if family in best:
        out.update(best[family])
    return out


def _rule(row: dict) -> str:
    return row["rule"] if row["rule"] in ("all", "linear probe") else f"{row['rule']} k={row['k']}"


def _pts(x: float | None) -> str:
    return "no spread" if x is None else f"{100 * x:.1f}"


def headlines(s: ShiftsTable) -> list[str]:
    out = []
    for family, b in s.best.items():
        at = [r for r in s.rows if r["family"] == family and not r["rule"].startswith("oracle")]
        mem = [r for r in at if r["rule"].split(" ", 1)[-1] in MEMORIZATION
               and r["rule"].startswith("top ")]  # fmt: skip
        rgn = [r for r in at if r["rule"] == "top rgn"]
        parts = [
            f"{family}-level shifts ({b['shifts']}): the least regret (oracle accuracy"
            f" minus the rule's; negative: better than every block) is {_rule(b)}'s,"
            f" {100 * b['regret']:+.1f} ± {_pts(b['regret_se'])} points"
        ]
        if mem:
            m = min(mem, key=lambda r: r["regret"])
            parts.append(
                f"best memorization ranking {m['rule']} k={m['k']}"
                f" {100 * m['regret']:+.1f} ± {_pts(m['regret_se'])} ({m['shift']})"
            )
        if rgn:
            g = min(rgn, key=lambda r: r["regret"])
            parts.append(
                f"Auto-RGN k={g['k']} {100 * g['regret']:+.1f} ±"
                f" {_pts(g['regret_se'])} ({g['shift']})"
            )
        out.append("; ".join(parts) + ".")
    rec = s.recommendation
    if rec.get("rule"):
        out.append(
            f"Recommendation: your shift is {rec['family']}-level ({rec['how']}): fine-tune by"
            f" {_rule(rec)}, measured regret {100 * rec['regret']:+.1f} ±"
            f" {_pts(rec['regret_se'])} points against the oracle. The feature estimate named"
            f" the right family for {rec['estimates_right']} of {rec['estimates']} shifts."
        )
    return out


def values(s: ShiftsTable) -> dict[str, float]:
    return {f"regret {r['shift']} {_rule(r)}": r["regret"] for r in s.rows
            if not r["rule"].startswith("oracle")}  # fmt: skip


STAGE = Stage(
    "shifts",
    ShiftsTable,
    run,
    enabled=lambda recipe: recipe.actions.shifts.enabled,
    needs=lambda recipe: needs_of(recipe.actions.shifts.by),
    headlines=headlines,
    values=values,
    findings=(shifts_depth,),
    tables=(
        ("regret.md", "Regret of every rule against the oracle, per shift"),
        ("oracle.md", "The oracle: every block fine-tuned"),
        ("estimates.md", "The shift family estimated from f's features"),
    ),
    plots=(("regret.png", "regret of every rule per shift"),),
    printed="regret.md",
)
