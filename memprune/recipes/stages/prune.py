"""``prune``: structured pruning of f by each strategy, ratio and schedule, each pruned (and
recovered) encoder probed; the accuracy-cost table, its Pareto fronts and verdicts
(docs/method.md §9, §9b)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from memprune.recipes._findings import pruning_forgets_atypical, pruning_highest
from memprune.recipes._stages import Stage, StageResult
from memprune.recipes.stages.evaluate import probe
from memprune.recipes.stages.unitmem import score as unit_score


@dataclass
class PruneTable(StageResult):
    """One row per (strategy, ratio, steps, recovery), the unpruned encoder first; with
    forgetting, per strategy the mean flip AUC of atypicality over its encoders (``auc``,
    ``auc_se``, ``n``, ``forgotten``: mean forgotten test points)."""

    rows: list[dict]
    forgetting: list[dict] = dataclasses.field(default_factory=list)
    #: prune_verdicts of the run (with the test set's noise where forgetting was recorded),
    #: then privacy_verdicts (which criterion leaves the least memorization)
    verdicts: list[str] = dataclasses.field(default_factory=list)
    #: privacy_rows: per setting, accuracy, MACs and the memorization signals left
    privacy: list[dict] = dataclasses.field(default_factory=list)


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
        by_setting,
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

    memorized = _memorization_signal(ctx) if p.forgetting else None

    def evaluate(model):  # the probe's result: its accuracy, and per example for forgetting
        result = probe(ctx, model, ctx.probe_train, ctx.test)
        if memorized is not None:  # what the encoder still shows of f's memorization
            result.meta.update(memorized(model))
        return result

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
    outcomes = {} if p.forgetting else None
    rows, runs = compare_pruning(
        f, scores, evaluate, p.ratios, p.strategies, out / "models", overwrite=ctx.overwrite,
        log=ctx.log, recover=recover, seeds=p.seeds, steps=p.steps, export=p.export,
        onnx=p.onnx, scope=p.scope, gradients=grads, rescore=rescore if iterative else None,
        max_layer_ratio=p.max_layer_ratio, heads=p.heads, keep_output_width=p.keep_output_width,
        latency_batch=p.latency_batch, outcomes=outcomes,
    )  # fmt: skip
    forgetting = [] if outcomes is None else _forgetting(ctx, f, runs, outcomes, out)
    groups = by_setting(runs, outcomes) if outcomes else None
    verdicts = prune_verdicts(rows, outcomes=groups)
    privacy = []
    if memorized is not None:
        from memprune.pruning import privacy_rows, privacy_verdicts

        privacy = privacy_rows(rows, groups)
        write_table(out / "privacy", privacy)
        verdicts += privacy_verdicts(privacy, groups)
    for line in verdicts:
        ctx.log(line)
    write_json(out / "results.json", {"model": ctx.model_name("f"), "checkpoint":
                                      ctx.checkpoint("f"), "data": r.data.name,
                                      "preprocessing": ctx.preprocessing(),
                                      "options": dataclasses.asdict(p), "table": rows,
                                      "verdicts": verdicts, "runs": runs})  # fmt: skip
    write_table(out / "comparison", rows)
    title = f"pruning {ctx.model_name('f')} ({p.scope} scope), linear probe on {r.data.name}"
    plot_prune_tradeoff(rows, out / "tradeoff.png", title)
    return PruneTable(rows, forgetting, verdicts, privacy)


#: candidates (and as many unseen test points) whose SSLMem each pruned encoder gets, with
#: this many view pairs each (the points, not the views, limit its standard error)
MEMORIZATION_POINTS, MEMORIZATION_PAIRS = 128, 5


def _memorization_signal(ctx):
    """``fn(model) -> dict``: what a pruned encoder still shows of f's memorization, or None
    when the run has neither canaries nor a reference g.

    With canaries: the membership signal of the included against the excluded canaries at
    the output, from the model alone (``canary_auc``: a member has the lower alignment loss;
    ``canary_gap``: excluded minus included mean loss). With g: the mean output SSLMem against
    g of (up to) :data:`MEMORIZATION_POINTS` candidates (``sslmem``) and of as many test
    points neither encoder saw (``sslmem_unseen``): pruning that only blurs the encoder's
    invariance lowers both, so ``memorization`` = their difference is what f still holds of
    its candidates beyond g (``memorization_point_se``: its standard error over the scored
    points, which every encoder shares, so it bounds the unpruned value, not the differences
    between pruned encoders)."""
    splits = ctx.splits()
    r = ctx.recipe
    parts = []
    c = r.data.canaries
    if c is not None and splits is not None and splits.included:
        from memprune.scores import member_gap

        def canary(model) -> dict:
            gap = member_gap(model, ctx.train, ctx.train, splits.included, splits.excluded,
                             n_pairs=c.pairs, layers=["output"], augment=r.scores.augment,
                             seed=r.seed, device=r.device, precision=r.precision,
                             progress=False)  # fmt: skip
            return {"canary_auc": float(gap.auc()[-1]), "canary_gap": float(gap.gap()[-1])}

        parts.append(canary)
    has_g = r.encoder.pretrain is not None or r.encoder.reference is not None
    if has_g and splits is not None and splits.candidate:
        from torch.utils.data import Subset

        from memprune.data import seeded_subset
        from memprune.scores import ssl_mem_against

        g = ctx.encoder("g")
        options = dict(n_pairs=MEMORIZATION_PAIRS, augment=r.scores.augment, seed=r.seed,
                       device=r.device, precision=r.precision)  # fmt: skip
        members = seeded_subset(Subset(ctx.train, splits.candidate), MEMORIZATION_POINTS, r.seed)
        unseen = seeded_subset(ctx.test, len(members), r.seed)
        on_members = ssl_mem_against(g, members, **options)
        on_unseen = ssl_mem_against(g, unseen, **options)

        def sslmem(model) -> dict:
            a, b = on_members(model).score.double(), on_unseen(model).score.double()
            se = (a.var() / len(a) + b.var() / len(b)).sqrt()  # over the scored points
            return {
                "sslmem": float(a.mean()),
                "sslmem_unseen": float(b.mean()),
                "memorization": float(a.mean() - b.mean()),
                "memorization_point_se": float(se),
                "sslmem_points": a.tolist(),
                "sslmem_unseen_points": b.tolist(),
            }

        parts.append(sslmem)
    if not parts:
        return None
    return lambda model: {k: v for part in parts for k, v in part(model).items()}


def _forgetting(ctx, f, runs, outcomes, out: Path) -> list[dict]:
    """forgetting.md (per pruned encoder), pies.md (per setting) and forgetting.safetensors
    (per encoder and test point: right or wrong), against f's atypicality of each test point."""
    import torch
    from safetensors.torch import save_file

    from memprune._io import atomic_write, write_json
    from memprune._table import write_table
    from memprune.pruning import forgetting_rows, pie_rows, typicality

    r = ctx.recipe
    score = typicality(f, ctx.probe_train, ctx.test, device=r.device, precision=r.precision,
                       progress=False)  # fmt: skip
    rows = forgetting_rows(runs, outcomes, score)
    write_table(out / "forgetting", rows)
    write_table(out / "pies", pie_rows(runs, outcomes, score))
    names = ["unpruned", *(n for n in outcomes if n != "unpruned")]
    tensors = {"correct": torch.stack([outcomes[n].correct() for n in names]).to(torch.uint8),
               "predictions": torch.stack([outcomes[n].predictions for n in names]),
               "indices": outcomes[names[0]].indices, "labels": outcomes[names[0]].labels,
               "typicality": score}  # fmt: skip
    atomic_write(out / "forgetting.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    write_json(
        out / "forgetting.json",
        {
            "encoders": names,
            "score": "typicality: mean cosine distance to the 10 nearest probe-train points",
        },
    )
    return _per_strategy(rows)


def _per_strategy(rows: list[dict]) -> list[dict]:
    """Mean flip AUC (and its standard error over encoders) and forgotten points per strategy."""
    import statistics

    out = []
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        mine = [r for r in rows if r["strategy"] == strategy]
        aucs = [r["flip_auc"] for r in mine if r["flip_auc"] is not None]
        se = statistics.stdev(aucs) / len(aucs) ** 0.5 if len(aucs) > 1 else None
        out.append({"strategy": strategy, "auc": statistics.mean(aucs) if aucs else None,
                    "auc_se": se, "n": len(aucs),
                    "forgotten": statistics.mean(r["forgotten"] for r in mine)})  # fmt: skip
    return out


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

    return [f"Pruning, {line}." for line in p.verdicts or prune_verdicts(p.rows)]


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
    findings=(pruning_highest, pruning_forgets_atypical),
    tables=(
        ("comparison.md", "Pruning"),
        ("forgetting.md", "What each pruned encoder forgets (test points that flip against f)"),
        ("pies.md", "Pruning-identified exemplars per setting (modal prediction over seeds)"),
        (
            "privacy.md",
            "Privacy-utility front: accuracy, memorization left (canaries, the"
            " candidates' SSLMem against g) and MACs",
        ),
    ),
    plots=(("tradeoff.png", "linear-probe accuracy against parameters, MACs and latency"),),
    printed="comparison.md",
)
