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
    #: family -> the rules with the least mean regret (:func:`family_best`)
    best: dict = field(default_factory=dict)
    #: the user's shift: ``named`` (family) or the estimate, and the recommendation
    recommendation: dict = field(default_factory=dict)


def _own(data):
    """The data set's own points: a task is not made of its canaries."""
    return data.base if hasattr(data, "canaries") else data


def _data(ctx, spec: str, split: str):
    from memprune.data import Shift, seeded_subset, shifted

    r, c = ctx.recipe, ctx.recipe.actions.shifts
    shift = Shift.parse(spec, seed=r.seed)
    base = _own(ctx.dataset(r.data.name, split))
    train = _own(ctx.dataset(r.data.name, "train")) if split != "train" else None
    data = shifted(base, shift, split, train)
    return seeded_subset(data, c.n_points, r.seed) if split == "train" else data


#: Rules that choose no k layers: every layer, or none (the linear probe).
WHOLE = ("all", "linear probe")


def family_rules(rows: list[dict]) -> dict[str, dict[tuple[str, int], dict]]:
    """Family -> (rule, k) -> its regret averaged over the family's shifts (``regret``, the
    standard error of that mean ``regret_se``, ``parameters``, ``shifts``); rules missing on
    some of the family's shifts are left out."""
    grouped: dict[str, dict[tuple, list[dict]]] = {}
    for row in rows:
        if not row["rule"].startswith("oracle"):
            grouped.setdefault(row["family"], {}).setdefault((row["rule"], row["k"]), [])
            grouped[row["family"]][(row["rule"], row["k"])].append(row)
    out: dict[str, dict] = {}
    for family, rules in grouped.items():
        n = max(len(v) for v in rules.values())
        out[family] = {}
        for (rule, k), found in rules.items():
            if len(found) < n:
                continue
            ses = [r["regret_se"] for r in found]
            se = None if None in ses else math.sqrt(sum(x * x for x in ses)) / n
            out[family][(rule, k)] = {
                "rule": rule, "k": k, "regret": sum(r["regret"] for r in found) / n,
                "regret_se": se, "parameters": round(sum(r["parameters"] for r in found) / n),
                "shifts": n,
            }  # fmt: skip
    return out


def _least(rules: dict, keep) -> dict | None:
    kept = [r for (rule, _), r in rules.items() if keep(rule)]
    return min(kept, key=lambda r: r["regret"]) if kept else None


def family_best(rows: list[dict]) -> dict:
    """Family -> the rule with the least mean regret over the family's shifts (``any``), the
    least among rules that choose k layers (``k_layers``: not all, not the linear probe), among
    the memorization rankings (``memorization``) and Auto-RGN at its best k (``rgn``)."""
    out = {}
    for family, rules in family_rules(rows).items():
        picks = {
            "any": _least(rules, lambda rule: True),
            "k_layers": _least(rules, lambda rule: rule not in WHOLE),
            "memorization": _least(rules, lambda rule: rule.startswith("top ")
                                   and rule[4:] in MEMORIZATION),
            "rgn": _least(rules, lambda rule: rule == "top rgn"),
        }  # fmt: skip
        out[family] = {k: v for k, v in picks.items() if v is not None}
    return out


def run(ctx, out: Path) -> ShiftsTable:
    from memprune._io import write_json
    from memprune._table import write_table
    from memprune.data import Shift
    from memprune.report import plot_regret
    from memprune.tuning import estimate_shift, shift_regret

    r, c = ctx.recipe, ctx.recipe.actions.shifts
    f = ctx.encoder("f")
    budget = dict(epochs=c.epochs, lr=c.lr, batch_size=c.batch_size, augment=c.augment)
    source = _own(ctx.dataset(r.data.name, "train"))
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
        est = estimate_shift(f, source, train, test, seed=r.seed)
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
    the first shift, the task the recipe names first) and the family's best rules."""
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
    return {"family": family, "how": how, "estimates_right": hits,
            "estimates": len(estimates), **best.get(family, {})}  # fmt: skip


def _rule(row: dict) -> str:
    return row["rule"] if row["rule"] in ("all", "linear probe") else f"{row['rule']} k={row['k']}"


def _pts(x: float | None) -> str:
    return "no spread" if x is None else f"{100 * x:.1f}"


def _said(r: dict) -> str:
    return (f"{_rule(r)} {100 * r['regret']:+.1f} ± {_pts(r['regret_se'])} points"
            f" ({r['parameters']:,} parameters)")  # fmt: skip


def headlines(s: ShiftsTable) -> list[str]:
    out = []
    for family, b in s.best.items():
        parts = [f"{family}-level shifts ({b['any']['shifts']}), regret against the oracle"
                 f" (its accuracy minus the rule's, averaged over the shifts): least:"
                 f" {_said(b['any'])}"]  # fmt: skip
        shown = [b["any"]]
        for key, name in (("k_layers", "of the k-layer choices"),
                          ("memorization", "of the memorization rankings"),
                          ("rgn", "Auto-RGN")):  # fmt: skip
            if key in b and all(b[key] != x for x in shown):  # read back from JSON: ==
                parts.append(f"{name}: {_said(b[key])}")
                shown.append(b[key])
        out.append("; ".join(parts) + ".")
    rec = s.recommendation
    if rec.get("any"):
        pick = rec.get("k_layers") or rec["any"]
        also = "" if pick == rec["any"] else f"; least regret of all: {_said(rec['any'])}"
        out.append(
            f"Recommendation: your shift is {rec['family']}-level ({rec['how']}): fine-tune by"
            f" {_said(pick)} against the oracle{also}. The feature estimate named the right"
            f" family for {rec['estimates_right']} of {rec['estimates']} shifts."
        )
    elif rec:
        out.append(
            f"No recommendation: your shift is {rec['family']}-level ({rec['how']}),"
            " and the run has no shift of that family: add one to actions.shifts.shifts."
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
