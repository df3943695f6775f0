"""``report.md`` of a run directory: headline findings stated from the numbers, the tables
and the plots. Rendered from the files of the run alone (``memprune report RUN_DIR``)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from memprune._io import read_json, write_text
from memprune._table import difference_se
from memprune.errors import ConfigError
from memprune.recipes._findings import findings_lines
from memprune.recipes._schema import load_recipe
from memprune.recipes._stages import DONE, STAGES, enabled_stages, read_metrics

#: Plots each stage writes, with their captions.
PLOTS = {
    "unitmem": [("unitmem_per_site.png", "UnitMem distribution per layer (f)")],
    "classmem": [
        ("classmem_vs_unitmem.png", "ClassMem vs UnitMem per unit"),
        ("classmem_f_per_site.png", "ClassMem distribution per layer (f)"),
    ],
    "sslmem": [("sslmem.png", "SSLMem of the candidates (in f's data) and the extras (not)")],
    "layermem": [
        ("layermem.png", "LayerMem and ΔLayerMem per layer"),
        ("consistency.png", "agreement of per-point SSLMem between layers"),
    ],
    "membergap": [("membergap.png", "member gap and membership AUC per layer (f alone)")],
    "cka": [("cka.png", "CKA between f (SSL) and the supervised encoder, layer by layer")],
    "prune": [("tradeoff.png", "linear-probe accuracy against parameters, MACs and latency")],
    "finetune": [("comparison.png", "fine-tuning strategies at the same budget")],
}
TABLES = {
    "evaluate": ("probes.md", "Probes (test accuracy)"),
    "unitmem": ("summary.md", "UnitMem per site (f)"),
    "layermem": ("layermem.md", "LayerMem per layer"),
    "membergap": ("membergap.md", "Member gap per layer (reference-free)"),
    "cka": ("cka_by_depth.md", "CKA between f and the supervised encoder at the same depth"),
    "prune": ("comparison.md", "Pruning"),
    "finetune": ("comparison.md", "Fine-tuning (test accuracy over seeds)"),
}
#: Extra tables after the main ones.
MORE_TABLES = {"finetune": ("rankings.md", "Layer rankings the fine-tuning rules used")}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _prune_lines(p: dict) -> list[str]:
    from memprune.pruning import prune_verdicts

    return [f"Pruning, {line}." for line in prune_verdicts(p["rows"])]


def _spread(a: dict, b: dict) -> str:
    """Whether two rows' mean difference exceeds their seed-to-seed spread (2 SE)."""
    se = difference_se(a["std"], a["seeds"], b["std"], b["seeds"])
    if se is None:
        return "one seed: no spread"
    return "beyond" if abs(a["mean"] - b["mean"]) > 2 * se else f"within 2 SE of {100 * se:.1f}"


def _finetune_lines(f: dict) -> list[str]:
    out, rows = [], f["rows"]
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
        out.append(
            f"Fine-tuning k={k} on {f['data']}: best {best['strategy']}"
            f" {_pct(best['mean'])} ± {_pct(best['std'])}{vs}."
        )
    return out


def headlines(m: dict) -> list[str]:
    """One sentence per finding, each computed from the stage metrics."""
    out = []
    if ev := m.get("evaluate"):
        parts = [
            f"{name}: " + ", ".join(f"{k} {_pct(v)}" for k, v in vals.items() if k != "seconds")
            for name, vals in ev.items()
            if isinstance(vals, dict)
        ]
        out.append("Probe accuracy on the test split: " + "; ".join(parts) + ".")
    if s := m.get("sslmem"):
        d, se = s["difference"], s["difference_se"]
        verdict = (
            "f memorizes its candidates" if d > 2 * se
            else "no clear memorization signal in this one run (difference within 2 SE). The"
            " emergence study (benchmarks/emergence.py, docs/method.md §11c) finds where it"
            " appears: weak augmentation, a small training set, 40+ epochs, and more than one"
            " pair seed; `--set 'seeds=[0,1,2]'` runs the loop three times (three times the"
            " cost) and tests the difference against the seed spread"
        )  # fmt: skip
        out.append(
            f"SSLMem: candidates {s['candidate']['mean']:.4f} vs extras"
            f" {s['extra']['mean']:.4f} (difference {d:+.4f} ± {se:.4f} SE"
            f"{f', {d / se:+.1f} SE' if se > 0 else ''}): {verdict}."
        )
    if lm := m.get("layermem"):
        out.append(
            f"LayerMem: ΔLayerMem is largest at {lm['top_delta_layer']} ({lm['top_delta']:+.4f});"
            f" LayerMem at the output {lm['output_layermem']:+.4f}."
        )
    if g := m.get("membergap"):
        verdict = (
            "f tells its training points from unseen ones at the output"
            if g["output_gap_lo"] > 0 else "no member gap at the output beyond the interval"
        )  # fmt: skip
        out.append(
            f"Member gap (f alone, {g['n_members']} members vs {g['n_nonmembers']}"
            f" non-members): {g['output_gap']:+.4f} at the output (95% interval"
            f" {g['output_gap_lo']:+.4f} to {g['output_gap_hi']:+.4f}, AUC"
            f" {g['output_auc']:.3f}); largest at {g['top_gap_layer']} ({g['top_gap']:+.4f}):"
            f" {verdict}."
        )
    if u := m.get("unitmem"):
        out.append(
            f"UnitMem (f): mean {u['mean']:.3f} over {u['units']} units, {_pct(u['frac>0.5'])}"
            f" above 0.5; per-site mean from {u['first_mean']:.3f} ({u['first_site']}) to"
            f" {u['last_mean']:.3f} ({u['last_site']}), highest at {u['top_site']}"
            f" ({u['top_mean']:.3f})."
        )
    if c := m.get("classmem"):
        parts = [
            f"{name}: UnitMem {v['unitmem_mean']:.3f}, ClassMem {v['classmem_mean']:.3f}"
            for name, v in c.items()
            if isinstance(v, dict)
        ]
        out.append("Mean unit scores, " + "; ".join(parts) + ".")
    if p := m.get("prune"):
        out += _prune_lines(p)
    if f := m.get("finetune"):
        out += _finetune_lines(f)
    return out


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

    found = read_metrics(run)
    metrics = {s: found[s] for s in STAGES if s in found}
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
    for stage, (name, title) in TABLES.items():
        path = run / stage / name
        if path.is_file():
            lines += [f"## {title}", "", path.read_text().rstrip(), ""]
    for stage, (name, title) in MORE_TABLES.items():
        path = run / stage / name
        if path.is_file():
            lines += [f"## {title}", "", path.read_text().rstrip(), ""]
    plots = [(stage, f, cap) for stage, items in PLOTS.items() for f, cap in items]
    present = [(s, f, c) for s, f, c in plots if (run / s / f).is_file()]
    if present:
        lines += ["## Plots", ""]
        lines += [f"### {cap}\n\n![{cap}]({s}/{f})\n" for s, f, cap in present]
    lines += ["Files: `recipe.yaml` (resolved), `environment.json`, `metrics.json` / `metrics.csv`,"
              " one directory per stage (scores, models, tables, plots).", ""]  # fmt: skip
    return write_text(run / "report.md", "\n".join(lines))
