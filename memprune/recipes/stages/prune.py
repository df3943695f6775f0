"""``prune``: structured pruning of f by each strategy, ratio and schedule, each pruned (and
recovered) encoder probed; the accuracy-cost table, its Pareto fronts and verdicts
(docs/method.md §9, §9b)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from memprune.recipes._findings import pruning_highest
from memprune.recipes._stages import Stage, StageResult
from memprune.recipes.stages.evaluate import accuracy
from memprune.recipes.stages.unitmem import score as unit_score


@dataclass
class PruneTable(StageResult):
    """One row per (strategy, ratio, steps, recovery), the unpruned encoder first."""

    rows: list[dict]


def _needs(recipe) -> list[tuple[str, str | None]]:
    from memprune.pruning import PRUNING_STRATEGIES

    p = recipe.actions.prune
    if any(PRUNING_STRATEGIES[s].needs == "scores" for s in p.strategies):
        return [("unitmem", "actions.prune.scores")]
    return []


def unit_scores(ctx):
    """The UnitMem of f that the prune stage ranks by (None when no strategy needs it)."""
    if not _needs(ctx.recipe):
        return None
    return ctx.result("unitmem", "unitmem", given=ctx.recipe.actions.prune.scores)


def run(ctx, out: Path) -> PruneTable:
    from memprune._io import write_json
    from memprune._table import write_table
    from memprune.encoders import resolve_device
    from memprune.pruning import (
        PRUNING_STRATEGIES,
        compare_pruning,
        prune_verdicts,
        recovery_fn,
        ssl_gradient_fn,
    )
    from memprune.report import plot_prune_tradeoff

    r, p = ctx.recipe, ctx.recipe.actions.prune
    f = ctx.encoder("f").to(resolve_device(r.device))
    scores = unit_scores(ctx)
    if scores is not None and p.scores is not None:
        check_scores_match(scores, ctx)

    def evaluate(model) -> float:
        return accuracy(ctx, model, ctx.probe_train, ctx.test)

    def rescore(model):  # UnitMem of the shrunken encoder
        return unit_score(ctx, model, progress=False)

    needs = {PRUNING_STRATEGIES[s].needs for s in p.strategies}
    grads = ssl_gradient_fn(ctx.train, seed=r.seed) if "gradients" in needs else None
    recover = None
    if p.recover is not None:
        options = dataclasses.asdict(p.recover)
        method = options.pop("method")
        precision = r.encoder.pretrain.mixed_precision if r.encoder.pretrain else "auto"
        recover = recovery_fn(ctx.train, f, method, progress=False, mixed_precision=precision,
                           **options)  # fmt: skip
    # iterative schedules rescore each step's encoder, unless the scores were given
    iterative = max(p.steps) > 1 and "scores" in needs and p.scores is None
    rows, runs = compare_pruning(
        f, scores, evaluate, p.ratios, p.strategies, out / "models", overwrite=ctx.overwrite,
        log=ctx.log, recover=recover, seeds=p.seeds, steps=p.steps, export=p.export,
        onnx=p.onnx, scope=p.scope, gradients=grads, rescore=rescore if iterative else None,
        max_layer_ratio=p.max_layer_ratio, heads=p.heads, keep_output_width=p.keep_output_width,
        latency_batch=p.latency_batch,
    )  # fmt: skip
    verdicts = prune_verdicts(rows)
    for line in verdicts:
        ctx.log(line)
    write_json(out / "results.json", {"model": ctx.model_name("f"), "checkpoint":
                                      ctx.checkpoint("f"), "data": r.data.name,
                                      "options": dataclasses.asdict(p), "table": rows,
                                      "verdicts": verdicts, "runs": runs})  # fmt: skip
    write_table(out / "comparison", rows)
    title = f"pruning {ctx.model_name('f')} ({p.scope} scope), linear probe on {r.data.name}"
    plot_prune_tradeoff(rows, out / "tradeoff.png", title)
    return PruneTable(rows)


def check_scores_match(scores, ctx) -> None:
    """Saved scores record the encoder they were made on: it must be the one pruned."""
    from memprune.errors import ConfigError

    made_on, mine = scores.meta.get("checkpoint"), ctx.checkpoint("f")
    if "checkpoint" not in scores.meta:
        return
    same = made_on is mine if None in (made_on, mine) else (
        Path(made_on).resolve() == Path(mine).resolve())  # fmt: skip
    if not same:
        raise ConfigError(
            f"actions.prune.scores {ctx.recipe.actions.prune.scores} were computed on"
            f" checkpoint {made_on or '(random init)'}, not on {mine or '(random init)'}: score"
            " this encoder first (memprune score units), or pass its own scores"
        )


def headlines(p: PruneTable) -> list[str]:
    from memprune.pruning import prune_verdicts

    return [f"Pruning, {line}." for line in prune_verdicts(p.rows)]


def _label(row: dict) -> str:
    rec = "" if row["recovery"] == "none" else f", {row['recovery']}"
    steps = f", {row['steps']} steps" if row.get("steps", 1) > 1 else ""
    return f"pruned {row['strategy']} {100 * row['ratio']:g}%{rec}{steps}"


def values(p: PruneTable) -> dict[str, float]:
    return {"unpruned" if row["strategy"] == "none" else _label(row): row["accuracy"]
            for row in p.rows}  # fmt: skip


STAGE = Stage(
    "prune",
    PruneTable,
    run,
    enabled=lambda recipe: recipe.actions.prune.enabled,
    needs=_needs,
    headlines=headlines,
    values=values,
    findings=(pruning_highest,),
    tables=(("comparison.md", "Pruning"),),
    plots=(("tradeoff.png", "linear-probe accuracy against parameters, MACs and latency"),),
    printed="comparison.md",
)
