"""``report.md`` of a run directory: headline findings stated from the numbers, the tables
and the plots. Rendered from the files of the run alone (``memprune report RUN_DIR``)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from memprune._io import read_json, write_text
from memprune.errors import ConfigError
from memprune.recipes._findings import findings_lines
from memprune.recipes._schema import load_recipe
from memprune.recipes._stages import DONE, STAGES, enabled_stages, read_metrics, typed


def headlines(metrics: dict) -> list[str]:
    """One sentence per finding, each computed from a stage's typed result."""
    return [
        line for name, result in typed(metrics).items() for line in STAGES[name].headlines(result)
    ]


def unfinished_stages(run: str | os.PathLike) -> list[str]:
    """The stages the run's recipe enables that have no ``done.json`` yet."""
    recipe = load_recipe(Path(run) / "recipe.yaml")
    return [s for s in enabled_stages(recipe) if not (Path(run) / s / DONE).is_file()]


def render_report(run: str | os.PathLike) -> Path:
    """Write ``RUN/report.md`` from the run's recipe, environment, metrics, tables and plots."""
    run = Path(run)
    if not (run / "recipe.yaml").is_file():
        raise ConfigError(
            f"{run} is not a memprune run directory (no recipe.yaml): pass the --out of"
            " `memprune run`"
        )
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    env = read_json(run / "environment.json") if (run / "environment.json").is_file() else {}
    if recipe.get("seeds") is not None:
        from memprune.recipes._seeds import render_seeds_report

        return render_seeds_report(run, recipe, env)

    metrics = read_metrics(run)
    missing = unfinished_stages(run)
    incomplete = [
        f"**Incomplete run**: the stages {', '.join(missing)} did not finish, so this report"
        " lacks their results. Finish it with `memprune run RECIPE --out RUN --resume`.",
        "",
    ]
    enc = recipe["encoder"]
    timm_args = ", ".join(f"{k}={v}" for k, v in (enc.get("timm") or {}).items())
    lines = [
        f"# memprune report: {recipe['name']}",
        "",
        f"- encoder: `{enc['model']}`{f' ({timm_args})' if timm_args else ''} at"
        f" {enc.get('img_size')} px;"
        f" data: `{recipe['data']['name']}`; seed {recipe['seed']}",
        f"- device: {env.get('device')} ({env.get('device_name')}, {env.get('threads')} threads);"
        f" git {str((env.get('git') or {}).get('revision'))[:12]}"
        f"{' (dirty)' if (env.get('git') or {}).get('dirty') else ''}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in (env.get('versions') or {}).items())}",
        "- stages: " + ", ".join(f"{k} ({v.get('seconds')} s)" for k, v in metrics.items()),
        "",
        *(incomplete if missing else []),
        "## Headline findings",
        "",
        *[f"- {h}" for h in headlines(metrics)],
        "",
        "## The papers' findings, checked on this run",
        "",
        *findings_lines(run, metrics),
        "",
    ]
    for stage in STAGES.values():
        for name, title in stage.tables:
            path = run / stage.name / name
            if path.is_file():
                lines += [f"## {title}", "", path.read_text().rstrip(), ""]
    present = [(stage.name, f, cap) for stage in STAGES.values() for f, cap in stage.plots
               if (run / stage.name / f).is_file()]  # fmt: skip
    if present:
        lines += ["## Plots", ""]
        lines += [f"### {cap}\n\n![{cap}]({s}/{f})\n" for s, f, cap in present]
    lines += ["Files: `recipe.yaml` (resolved), `environment.json`, `metrics.json` / `metrics.csv`,"
              " one directory per stage (scores, models, tables, plots).", ""]  # fmt: skip
    return write_text(run / "report.md", "\n".join(lines))
