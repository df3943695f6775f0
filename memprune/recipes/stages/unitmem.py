"""``unitmem``: UnitMem of every unit of f (per-point selectivity, docs/method.md §3)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from memprune.recipes._findings import mlp_vs_attention
from memprune.recipes._stages import Stage, StageResult


@dataclass
class UnitMemSummary(StageResult):
    mean: float
    frac_above_half: float  # fraction of units with UnitMem > 0.5
    first_site: str
    first_mean: float
    last_site: str
    last_mean: float
    top_site: str
    top_mean: float
    units: int
    dead: int

    @classmethod
    def from_dict(cls, data: dict):
        if "frac>0.5" in data:  # written before the key was renamed
            data = {**data, "frac_above_half": data["frac>0.5"]}
        return super().from_dict(data)


def scored_points(ctx):
    """The points UnitMem (and ClassMem) score: ``n_points`` of the split, drawn by seed."""
    from memprune.data import seeded_subset

    c = ctx.recipe.scores.unitmem
    data = ctx.dataset(ctx.recipe.data.name, c.split)
    return seeded_subset(data, c.n_points, ctx.recipe.seed)


def score(ctx, model, progress: bool | None = None):
    """UnitMem of ``model`` as this stage computes it (also for the supervised encoder and
    for the shrunken encoders of iterative pruning)."""
    from memprune.scores import unit_mem

    r, c = ctx.recipe, ctx.recipe.scores.unitmem
    return unit_mem(
        model, scored_points(ctx), n_views=c.views, sites=c.sites, rest=c.rest,
        signed=c.signed, augment=c.augment, chunk_size=r.scores.chunk_size, seed=r.seed,
        device=r.device, num_workers=r.workers, progress=progress, precision=r.precision,
    )  # fmt: skip


def run(ctx, out: Path) -> UnitMemSummary:
    from memprune._table import write_table
    from memprune.report import plot_unit_scores

    result = score(ctx, ctx.encoder("f"))
    result.meta.update(model=ctx.model_name("f"), checkpoint=ctx.checkpoint("f"),
                       data=ctx.recipe.data.name)  # fmt: skip
    result.save(out / "unitmem")
    plot_unit_scores(result, out / "unitmem_per_site.png")
    write_table(out / "summary", result.to_rows())
    return summary(result)


def summary(result) -> UnitMemSummary:
    rows = result.to_rows()
    scores = torch.cat([s["score"] for s in result.sites.values()])
    best = max(rows, key=lambda r: r["mean"])
    return UnitMemSummary(
        mean=float(scores.mean()), frac_above_half=float((scores > 0.5).float().mean()),
        first_site=rows[0]["site"], first_mean=rows[0]["mean"], last_site=rows[-1]["site"],
        last_mean=rows[-1]["mean"], top_site=best["site"], top_mean=best["mean"],
        units=len(scores), dead=sum(r["dead"] for r in rows),
    )  # fmt: skip


def headlines(u: UnitMemSummary) -> list[str]:
    return [
        f"UnitMem (f): mean {u.mean:.3f} over {u.units} units, {100 * u.frac_above_half:.1f}%"
        f" above 0.5; per-site mean from {u.first_mean:.3f} ({u.first_site}) to"
        f" {u.last_mean:.3f} ({u.last_site}), highest at {u.top_site} ({u.top_mean:.3f})."
    ]


def values(u: UnitMemSummary) -> dict[str, float]:
    return {"UnitMem mean, f": u.mean, "UnitMem > 0.5, f (fraction of units)": u.frac_above_half}


STAGE = Stage(
    "unitmem",
    UnitMemSummary,
    run,
    enabled=lambda recipe: recipe.scores.unitmem.enabled,
    headlines=headlines,
    values=values,
    findings=(mlp_vs_attention,),
    tables=(("summary.md", "UnitMem per site (f)"),),
    plots=(("unitmem_per_site.png", "UnitMem distribution per layer (f)"),),
    printed="summary.md",
)
