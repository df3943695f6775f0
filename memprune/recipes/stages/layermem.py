"""``layermem``: LayerMem / ΔLayerMem of f against g, layer by layer (docs/method.md §6)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from memprune.errors import ConfigError
from memprune.recipes._findings import layermem_depth, top_vs_least
from memprune.recipes._stages import Stage, StageResult


@dataclass
class LayerMemSummary(StageResult):
    top_delta_layer: str
    top_delta: float
    output_layermem: float
    layers: int


def run(ctx, out: Path) -> LayerMemSummary:
    from memprune._table import write_table
    from memprune.report import plot_consistency, plot_layer_mem
    from memprune.scores import layer_mem

    r, c = ctx.recipe, ctx.recipe.scores.layermem
    f, g = ctx.encoder("f"), ctx.encoder("g")
    same = ctx.checkpoint("f") and ctx.checkpoint("g")
    if same and Path(ctx.checkpoint("f")).resolve() == Path(ctx.checkpoint("g")).resolve():
        raise ConfigError(
            f"f and g are the same encoder ({ctx.checkpoint('f')}): LayerMem would be 0 in"
            " every layer; give as the reference g the encoder trained without the candidates"
        )
    data, indices = ctx.indices(c.points, "scores.layermem.points", "candidate")
    if indices is not None and not indices:
        raise ConfigError(
            "scores.layermem.points: no points to score (an empty part of the split): choose"
            " another part (shared, candidate, extra) or pretrain with a test share"
        )
    result = layer_mem(
        f, g, data, indices, n_pairs=c.pairs, layers=c.layers, representation=c.representation,
        pair=c.pair, n_points=c.n_points if c.n_points is not None else (
            c.points.n_points if c.points else None), chunk_size=r.scores.chunk_size, seed=r.seed,
        device=r.device, num_workers=r.workers, top_k=c.top_k, augment=r.scores.augment,
        precision=r.precision,
    )  # fmt: skip
    scored = "all" if indices is None else (c.points.part if c.points else "candidate")
    result.meta.update(f=ctx.checkpoint("f"), g=ctx.checkpoint("g"), data=r.data.name,
                       scored=scored)  # fmt: skip
    result.save(out / "layermem")
    plot_layer_mem(result, out / "layermem.png")
    plot_consistency(result, out / "consistency.png")
    rows = result.to_rows()
    write_table(out / "layermem", rows)
    layers = [row for row in rows if row["layer"] != "output"]
    top = max(layers, key=lambda row: row["dLayerMem"])
    return LayerMemSummary(top_delta_layer=top["layer"], top_delta=top["dLayerMem"],
                           output_layermem=rows[-1]["LayerMem"], layers=len(layers))  # fmt: skip


def headlines(lm: LayerMemSummary) -> list[str]:
    return [
        f"LayerMem: ΔLayerMem is largest at {lm.top_delta_layer} ({lm.top_delta:+.4f});"
        f" LayerMem at the output {lm.output_layermem:+.4f}."
    ]


def values(lm: LayerMemSummary) -> dict[str, float]:
    return {"LayerMem at the output": lm.output_layermem, "largest ΔLayerMem": lm.top_delta}


STAGE = Stage(
    "layermem",
    LayerMemSummary,
    run,
    enabled=lambda recipe: recipe.scores.layermem.enabled,
    headlines=headlines,
    values=values,
    findings=(layermem_depth, top_vs_least),
    tables=(("layermem.md", "LayerMem per layer"),),
    plots=(
        ("layermem.png", "LayerMem and ΔLayerMem per layer"),
        ("consistency.png", "agreement of per-point SSLMem between layers"),
    ),
    printed="layermem.md",
)
