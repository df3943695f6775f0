"""``classmem``: ClassMem (class selectivity) of f and of the supervised encoder, beside their
UnitMem on the same points (docs/method.md §4)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from memprune.recipes._findings import units_vs_classes
from memprune.recipes._stages import Stage, StageResult
from memprune.recipes.stages.unitmem import score as unit_score
from memprune.recipes.stages.unitmem import scored_points


@dataclass
class ClassMemMeans(StageResult):
    """Encoder (``f``, ``supervised``) -> its mean UnitMem and ClassMem per unit (UnitMem
    None when the run has no UnitMem of f to compare with)."""

    means: dict[str, dict[str, float | None]]

    def to_dict(self) -> dict:
        return dict(self.means)

    @classmethod
    def from_dict(cls, data: dict):
        return cls(means={k: v for k, v in data.items() if isinstance(v, dict)})


def run(ctx, out: Path) -> ClassMemMeans:
    from memprune._table import write_table
    from memprune.report import plot_unit_scores
    from memprune.report.plots import plot_class_vs_unit
    from memprune.scores import class_mem

    r, c = ctx.recipe, ctx.recipe.scores.classmem
    data = scored_points(ctx)
    means, pairs = {}, {}
    encoders = ["f"] + (["supervised"] if r.encoder.supervised.enabled else [])
    for which in encoders:
        model = ctx.encoder(which)
        cm = class_mem(model, data, n_views=c.views, sites=r.scores.unitmem.sites,
                       augment=c.augment, chunk_size=r.scores.chunk_size, seed=r.seed,
                       device=r.device, num_workers=r.workers, precision=r.precision)  # fmt: skip
        cm.meta.update(model=ctx.model_name(which), checkpoint=ctx.checkpoint(which),
                       data=r.data.name)  # fmt: skip
        cm.save(out / f"classmem_{which}")
        write_table(out / f"classmem_{which}", cm.to_rows())
        plot_unit_scores(cm, out / f"classmem_{which}_per_site.png")
        k = torch.cat([s["score"] for s in cm.sites.values()])
        # the baseline's UnitMem is made exactly like f's (unitmem stage), so the two compare
        if which == "f" and not r.scores.unitmem.enabled:
            um = None
        elif which == "f":
            um = ctx.result("unitmem", "unitmem")
        else:
            um = unit_score(ctx, model)
            um.save(out / f"unitmem_{which}")
        u = None if um is None else torch.cat([s["score"] for s in um.sites.values()])
        if u is not None:
            pairs["SSL (f)" if which == "f" else "supervised"] = (u, k)
        means[which] = {"unitmem_mean": None if u is None else float(u.mean()),
                        "classmem_mean": float(k.mean())}  # fmt: skip
    if pairs:
        plot_class_vs_unit(pairs, out / "classmem_vs_unitmem.png")
    return ClassMemMeans(means)


def headlines(c: ClassMemMeans) -> list[str]:
    parts = [
        (f"{name}: UnitMem {v['unitmem_mean']:.3f}, " if v["unitmem_mean"] is not None else
         f"{name}: ") + f"ClassMem {v['classmem_mean']:.3f}"
        for name, v in c.means.items()
    ]  # fmt: skip
    return ["Mean unit scores, " + "; ".join(parts) + "."]


def values(c: ClassMemMeans) -> dict[str, float]:
    out = {}
    for name, v in c.means.items():
        if name != "f" and v["unitmem_mean"] is not None:
            out[f"UnitMem mean, {name}"] = v["unitmem_mean"]
        out[f"ClassMem mean, {name}"] = v["classmem_mean"]
    return out


STAGE = Stage(
    "classmem",
    ClassMemMeans,
    run,
    enabled=lambda recipe: recipe.scores.classmem.enabled,
    needs=lambda recipe: [("unitmem", None)] if recipe.scores.unitmem.enabled else [],
    headlines=headlines,
    values=values,
    findings=(units_vs_classes,),
    tables=(("classmem_f.md", "ClassMem per site (f)"),),
    printed="classmem_f.md",
    plots=(
        ("classmem_vs_unitmem.png", "ClassMem vs UnitMem per unit"),
        ("classmem_f_per_site.png", "ClassMem distribution per layer (f)"),
    ),
)
