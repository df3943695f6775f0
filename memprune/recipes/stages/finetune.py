"""``finetune``: fine-tuning f's top layers by each ranking (ΔLayerMem, member gap, UnitMem
profile, Auto-RGN) against last-k, first-k, random-k, all layers and the linear probe, at the
same budget over seeds, on the downstream data (docs/method.md §10)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from memprune.errors import ConfigError
from memprune.recipes._findings import finetune_top
from memprune.recipes._schema import RANKED_BY
from memprune.recipes._stages import Stage, StageResult
from memprune.recipes.stages.evaluate import accuracy


@dataclass
class FinetuneTable(StageResult):
    data: str
    rows: list[dict]


def _given(ctx) -> list:
    """The saved scores named by ``actions.finetune.scores``, each as a layer ranking."""
    import memprune.scores  # noqa: F401  (the result classes load_any chooses from)
    from memprune.recipes._context import find_result
    from memprune.results import load_any
    from memprune.tuning import unitmem_profile

    out = []
    for i, path in enumerate(ctx.recipe.actions.finetune.scores):
        found = None
        for stage, name in (("layermem", "layermem"), ("membergap", "membergap"),
                            ("unitmem", "unitmem")):  # fmt: skip
            try:
                found = find_result(path, stage, name)
                break
            except ConfigError:
                continue
        if found is None:
            raise ConfigError(
                f"actions.finetune.scores[{i}]: no LayerMem, member-gap or UnitMem result at"
                f" {path}: pass the --out of memprune score layers / score units"
            )
        result = load_any(found)
        out.append(unitmem_profile(result, ctx.encoder("f")) if result.kind == "unitmem"
                   else result)  # fmt: skip
    return out


def rankings(ctx, train, by=None, key: str = "actions.finetune.by") -> dict:
    """Ranking name -> the result ranking by it: the names ``by`` (default: those of
    ``actions.finetune.by``), or every ranking the scores stages and saved scores offer, then
    Auto-RGN (computed on the fine-tuning data ``train``). ``key`` names ``by`` in errors."""
    from memprune.tuning import auto_rgn, unitmem_profile

    r = ctx.recipe
    by = r.actions.finetune.by if by is None else by
    f, offered = ctx.encoder("f"), {}
    given = _given(ctx)
    for result in given:
        for name in result.rankings:
            offered.setdefault(name, result)
    wanted = list(by) if by else [
        *[n for n, stage in (("delta", "layermem"), ("gap", "membergap"), ("unitmem", "unitmem"))
          if getattr(r.scores, stage).enabled],
        *[g.rankings[0] for g in given], "rgn",
    ]  # fmt: skip
    made: dict = {}
    for name in dict.fromkeys(wanted):
        stage = RANKED_BY[name]
        if name in offered:
            made[name] = offered[name]
        elif stage is None:
            made[name] = auto_rgn(f, train, seed=r.seed, device=r.device)
        elif stage in ("layermem", "membergap") and getattr(r.scores, stage).enabled:
            made[name] = ctx.result(stage, stage)
        elif stage == "unitmem" and r.scores.unitmem.enabled:
            same = made.get("unitmem") or made.get("unitmem_frac")
            made[name] = same or unitmem_profile(ctx.result("unitmem", "unitmem"), f)
        else:
            raise ConfigError(
                f"{key}: {name!r} ranks layers by scores.{stage}: enable it, give"
                " its saved result in actions.finetune.scores (CLI: --layer-scores,"
                " --unit-scores), or rank by rgn"
            )
    return made


def run(ctx, out: Path) -> FinetuneTable:
    from memprune._io import write_json
    from memprune._table import write_table
    from memprune.report import plot_finetune
    from memprune.tuning import compare_finetuning, ranking_values

    r, c = ctx.recipe, ctx.recipe.actions.finetune
    name = r.data.downstream or r.data.name
    train, test = ctx.dataset(name, "train"), ctx.dataset(name, "test")

    def baseline(encoder, seed: int) -> float:  # the probes of the evaluate stage's kind
        return accuracy(ctx, encoder, train, test, seed=seed)

    made = rankings(ctx, train)
    values = {by: dict(zip(res.layers, ranking_values(res, by)[1].tolist()))
              for by, res in made.items()}  # fmt: skip
    table: dict[str, dict] = {}
    for by, per_layer in values.items():
        for layer, value in per_layer.items():
            if layer != "output":
                table.setdefault(layer, {"layer": layer})[by] = value
    write_table(out / "rankings", list(table.values()))
    budget = dict(epochs=c.epochs, lr=c.lr, batch_size=c.batch_size, augment=c.augment)
    rows, runs = compare_finetuning(ctx.encoder("f"), made, train, test, c.k, c.strategies,
                                    c.seeds, baseline=baseline, log=ctx.log,
                                    **budget)  # fmt: skip
    write_json(out / "results.json", {"f": ctx.checkpoint("f"), "data": name,
                                      "preprocessing": ctx.preprocessing(name),
                                      "options": asdict(c), "by": list(made),
                                      "layer_values": values, "table": rows,
                                      "runs": runs})  # fmt: skip
    write_table(out / "comparison", rows)
    plot_finetune(
        rows, out / "comparison.png", f"fine-tuning f on {name} ({c.epochs} epochs, lr {c.lr:g})"
    )
    return FinetuneTable(data=name, rows=rows)


def _spread(a: dict, b: dict) -> str:
    """Whether two rows' mean difference exceeds their seed-to-seed spread (2 SE)."""
    from memprune._table import difference_se

    se = difference_se(a["std"], a["seeds"], b["std"], b["seeds"])
    if se is None:
        return "one seed: no spread"
    return "beyond" if abs(a["mean"] - b["mean"]) > 2 * se else f"within 2 SE of {100 * se:.1f}"


def headlines(f: FinetuneTable) -> list[str]:
    out, rows = [], f.rows
    for k in sorted({r["k"] for r in rows if r["strategy"] not in ("linear probe", "all")}):
        at = {r["strategy"]: r for r in rows if r["k"] == k}
        best = max(at.values(), key=lambda r: r["mean"])
        vs = ""
        tops = [s for s in at if s == "top" or s.startswith("top ")]
        if "last" in at and tops:
            last = at["last"]
            vs = "; " + ", ".join(
                f"{s} − last {100 * (at[s]['mean'] - last['mean']):+.1f} points"
                f" ({_spread(at[s], last)})"
                for s in tops
            )
        out.append(f"Fine-tuning k={k} on {f.data}: best {best['strategy']}"
                   f" {100 * best['mean']:.1f}% ± {100 * best['std']:.1f}%{vs}.")  # fmt: skip
    return out


def values(f: FinetuneTable) -> dict[str, float]:
    out = {}
    for row in f.rows:
        k = "" if row["strategy"] in ("linear probe", "all") else f" k={row['k']}"
        out[f"fine-tuned {row['strategy']}{k}"] = row["mean"]
    return out


def needs_of(by) -> list[tuple[str, str | None]]:
    """The scores stages the rankings ``by`` come from (or saved scores in
    ``actions.finetune.scores``)."""
    return [(RANKED_BY[b], "actions.finetune.scores") for b in by or () if RANKED_BY[b]]


def _needs(recipe) -> list[tuple[str, str | None]]:
    return needs_of(recipe.actions.finetune.by)


STAGE = Stage(
    "finetune",
    FinetuneTable,
    run,
    enabled=lambda recipe: recipe.actions.finetune.enabled,
    needs=_needs,
    headlines=headlines,
    values=values,
    findings=(finetune_top,),
    tables=(
        ("comparison.md", "Fine-tuning (test accuracy over seeds)"),
        ("rankings.md", "Layer rankings the fine-tuning rules used"),
    ),
    plots=(("comparison.png", "fine-tuning strategies at the same budget"),),
    printed="comparison.md",
)
