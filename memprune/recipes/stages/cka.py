"""``cka``: CKA between the layers of f and another encoder (the supervised one by default,
the reference g, or f itself), with the spread of same-depth CKA over disjoint minibatches
(docs/method.md §8)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from memprune.recipes._findings import cka_depth
from memprune.recipes._stages import Stage, StageResult


@dataclass
class CKAResult(StageResult):
    """Same-depth CKA per layer of f (when both encoders have the same layers), one list per
    disjoint minibatch for the spread, and the minibatch size."""

    cka: dict[str, float]
    folds: list[list[float]]
    minibatch: int
    against: str = "supervised"


def _other(recipe) -> str | None:
    return {"supervised": "supervised", "g": "g", "self": None}[recipe.scores.cka.against]


def run(ctx, out: Path) -> CKAResult:
    from memprune._table import write_table
    from memprune.report import plot_cka
    from memprune.scores import cka

    r, c = ctx.recipe, ctx.recipe.scores.cka
    data = ctx.dataset(r.data.name, c.split)
    m = min(c.minibatch, len(data))
    opts = dict(minibatch=m, representation=c.representation, seed=r.seed, device=r.device,
                precision=r.precision, progress=False, layers_a=c.layers_a,
                layers_b=c.layers_b, augment=c.augment)  # fmt: skip
    other = _other(r)
    f = ctx.encoder("f")
    b = ctx.encoder(other) if other else None
    result = cka(data, f, b, invariance=c.invariance, **opts)
    name_b = other or "f"
    result.meta.update(a=ctx.checkpoint("f"), b=ctx.checkpoint(name_b), name_a="f",
                       name_b=name_b, data=r.data.name)  # fmt: skip
    result.save(out / "cka")
    write_table(out / "cka", result.to_rows())
    plot_cka(result, out / "cka.png", f"CKA: f (rows) vs {name_b} (columns), {r.data.name}")
    layers = list(result.layers_a)
    if other is None or list(result.layers_b) != layers:  # no same-depth comparison
        return CKAResult(cka={}, folds=[], minibatch=m, against=name_b)
    same = torch.diagonal(result.matrix)
    folds = []
    for start in range(0, len(data) - m + 1, m):
        part = torch.utils.data.Subset(data, range(start, start + m))
        folds.append(torch.diagonal(cka(part, f, b, invariance=False, **opts).matrix).tolist())
    rows = [{"layer": name, "cka": float(v)} for name, v in zip(layers, same)]
    write_table(out / "cka_by_depth", rows)
    return CKAResult(cka={name: float(v) for name, v in zip(layers, same)}, folds=folds,
                     minibatch=m, against=name_b)  # fmt: skip


def _enabled(recipe) -> bool:
    c, e = recipe.scores.cka, recipe.encoder
    if c.against == "supervised":
        return c.enabled and e.supervised.enabled
    return c.enabled


STAGE = Stage(
    "cka",
    CKAResult,
    run,
    enabled=_enabled,
    values=lambda c: {f"CKA f vs {c.against}, {layer}": v for layer, v in c.cka.items()},
    findings=(cka_depth,),
    tables=(("cka_by_depth.md", "CKA between f and the supervised encoder at the same depth"),),
    plots=(("cka.png", "CKA between f (SSL) and the supervised encoder, layer by layer"),),
    printed="cka.md",
)
