"""Run a recipe stage by stage into one run directory.

Layout of ``RUN/``: ``recipe.yaml`` (resolved), ``environment.json``, one directory per stage
(``pretrain/``, ``supervised/``, ``unitmem/``, ``classmem/``, ``sslmem/``, ``layermem/``,
``membergap/``, ``evaluate/``, ``prune/``, ``finetune/``) each ending with ``done.json`` (its
metrics, written last), then ``metrics.json`` / ``metrics.csv`` and ``report.md``.

``resume``: stages with ``done.json`` are skipped; an unfinished stage's directory is cleared
and the stage runs again (pretraining continues from its own per-epoch checkpoint, which
gives the same weights as an uninterrupted run). ``force``: the stages are cleared first.
"""

from __future__ import annotations

import copy
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from memprune._dist import barrier, is_main, rank_world
from memprune._io import package_versions, read_json, write_json, write_text
from memprune.errors import ConfigError, MemPruneError
from memprune.recipes._context import Context
from memprune.recipes._report import render_report
from memprune.recipes._schema import Recipe, check_needs
from memprune.recipes._stages import DONE, STAGES, Stage, enabled_stages

# ---------------------------------------------------------------- the run


def environment(device: str | None) -> dict:
    """Package versions, device, threads and the git revision of the memprune source."""
    from memprune.encoders import resolve_device

    src = Path(__file__).resolve().parents[2]
    git = {}
    try:
        rev = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10).stdout  # fmt: skip
        git = {"revision": rev, "dirty": bool(dirty.strip())}
    except (OSError, subprocess.SubprocessError):
        git = {"revision": None}
    dev = resolve_device(device)
    return {
        "versions": package_versions(), "python": platform.python_version(),
        "platform": platform.platform(), "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "processes": rank_world()[1], "git": git,
    }  # fmt: skip


def _preflight(ctx: Context) -> None:
    """Build what every stage starts from (data, encoders named by the recipe) and check
    what each stage needs, so that a bad name or path fails before anything is written."""
    from memprune.encoders import load_encoder, resolve_device
    from memprune.report import check_writable

    recipe = ctx.recipe
    check_writable(ctx.run)
    check_needs(recipe)
    resolve_device(recipe.device)  # a device this machine lacks fails before any write
    for split in _splits_needed(recipe):  # an unknown data set fails here
        ctx.dataset(recipe.data.name, split)
    if recipe.actions.finetune.enabled and recipe.data.downstream:
        ctx.dataset(recipe.data.downstream, "train")
    enc = recipe.encoder
    if enc.pretrain is not None:  # the architecture is built by pretraining: check it exists
        load_encoder(enc.model, img_size=enc.img_size, **enc.timm)
    else:
        for key, path in (("checkpoint", enc.checkpoint), ("reference", enc.reference)):
            if path is not None and not Path(path).exists():
                made = f": it is made by {enc.checkpoint_from}; run `memprune run" if (
                    key == "checkpoint" and enc.checkpoint_from) else ""  # fmt: skip
                hint = f"{made} {enc.checkpoint_from}` (or `make demo`) first" if made else (
                    ": check the path")  # fmt: skip
                raise ConfigError(f"encoder.{key}: {path} does not exist{hint}")
        ctx.encoder("f")
        if enc.reference is not None:
            ctx.encoder("g")
        for name in recipe.evaluation.encoders or ():
            if recipe.evaluation.linear or recipe.evaluation.knn:
                ctx.encoder(name)
    if recipe.scores.membergap.enabled and enc.pretrain is None:
        from memprune.scores.membership import check_disjoint

        check_disjoint(ctx.points("members"), ctx.points("nonmembers"))
    if recipe.actions.prune.enabled and recipe.actions.prune.heads and enc.pretrain is None:
        from memprune.sites import find_sites

        f = ctx.encoder("f")
        if not any(s.role == "heads" for s in find_sites(f, "units", input_size=_size(f))):
            raise ConfigError(
                f"actions.prune.heads: {ctx.model_name('f')} has no attention heads to prune;"
                " leave heads off (it prunes its units all the same)"
            )
    rec = recipe.actions.prune.recover if recipe.actions.prune.enabled else None
    if rec is not None and rec.batch_size > len(ctx.train):
        raise ConfigError(
            f"actions.prune.recover.batch_size {rec.batch_size} exceeds the {len(ctx.train)}"
            " training points the recovery trains on: set it (CLI --recover-batch-size) to at"
            f" most {len(ctx.train)}"
        )
    ctx.log(ctx.input_note())


def _size(model) -> tuple[int, ...]:
    from memprune.encoders import input_size

    return tuple(input_size(model))


def _splits_needed(recipe: Recipe) -> list[str]:
    """The splits of ``data`` the enabled stages read."""
    stages, s = enabled_stages(recipe), recipe.scores
    test = (
        {"evaluate", "prune"} & set(stages)
        or ("cka" in stages and s.cka.split == "test")
        or ("unitmem" in stages and s.unitmem.split == "test")
        or any(
            p is not None and p.split == "test"
            for p in (recipe.data.members, recipe.data.nonmembers)
        )
    )
    train = (
        set(stages) - {"cka", "unitmem", "classmem"}
        or ("cka" in stages and s.cka.split == "train")
        or ({"unitmem", "classmem"} & set(stages) and s.unitmem.split == "train")
    )
    return [name for name, on in (("train", train), ("test", test)) if on]


def run_stage(stage: Stage, ctx: Context, out: Path, label: str) -> dict:
    """Run one stage into ``out`` and write its ``done.json`` (its result and seconds) once
    every process has finished it; returns what was written."""
    ctx.log(f"{label} {stage.name} ...")
    start = time.perf_counter()
    result = stage.run(ctx, out)
    if not isinstance(result, stage.result):
        raise TypeError(f"stage {stage.name} returned {type(result).__name__}, not"
                        f" {stage.result.__name__}")  # fmt: skip
    barrier()  # done.json only once every process has finished the stage
    metrics = {**result.to_dict(), "seconds": round(time.perf_counter() - start, 1)}
    write_json(out / DONE, metrics)
    barrier()
    ctx.log(f"{label} {stage.name}: {metrics['seconds']} s")
    return metrics


def _check_run(run: Path, recipe: Recipe, resume: bool, force: bool) -> bool:
    """Refuse a run directory the recipe may not use, changing nothing; whether the earlier
    run's stages must be cleared first (``force``)."""
    saved = run / "recipe.yaml"
    if run.exists() and not run.is_dir():
        raise ConfigError(f"{run} exists and is not a directory: choose a directory as --out")
    if resume and run.is_dir() and any(run.iterdir()) and not saved.is_file():
        raise ConfigError(
            f"--resume: {run} is not a memprune run (no recipe.yaml); drop --resume and choose"
            " a new --out"
        )
    if not (run.is_dir() and any(run.iterdir())):
        return False
    if resume and saved.is_file():
        old = _effective(_as_current(yaml.safe_load(saved.read_text())))
        new = _effective(recipe.to_dict())
        if old != new:
            changed = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
            raise ConfigError(
                f"{run} was run with another recipe (sections {', '.join(changed)} differ):"
                " use a new --out, or --force to start over"
            )
        return False
    if force:
        if not saved.is_file():
            raise ConfigError(f"{run} is not a memprune run directory; refusing to clear it")
        return True
    raise ConfigError(
        f"run directory {run} already exists: pass --resume to finish it, --force to"
        " start over, or choose another --out"
    )


#: Keys added to the recipe since the first release, with the value that reproduces what a
#: recipe written before them did (fp32 scoring; torchvision / folder data resized).
_LEGACY = {("precision",): "fp32", ("data", "transform"): "resize"}
#: Keys renamed since: old path -> new name.
_RENAMED = {("scores", "unitmem", "max_points"): "n_points",
            ("data", "members", "n"): "n_points", ("data", "nonmembers", "n"): "n_points",
            ("actions", "prune", "schedules"): "steps"}  # fmt: skip


def _as_current(saved: dict) -> dict:
    """A saved recipe as this version reads it: a key added since it was written takes the
    value that reproduces what that run did, so an older run can be resumed exactly. One that
    no longer validates is compared as it is (and differs)."""
    from memprune.recipes._schema import validate

    saved = copy.deepcopy(saved)
    for keys, new in _RENAMED.items():
        node = saved
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and keys[-1] in node:
            node[new] = node.pop(keys[-1])
    for keys, value in _LEGACY.items():
        node = saved
        for key in keys[:-1]:
            node = node.setdefault(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.setdefault(keys[-1], value)
    try:
        return validate(saved).to_dict()
    except ConfigError:
        return saved


def _effective(recipe: dict) -> dict:
    """What a recipe runs on this machine: ``auto`` precisions resolved for its device, and
    ``data.transform`` dropped where it has no effect (built-in data, an explicit img_size).
    Two recipes that run the same are the same run."""
    from memprune.data import BUILTIN
    from memprune.encoders import resolve_device
    from memprune.engine import autocast_dtype
    from memprune.train import resolve_mixed_precision

    out = copy.deepcopy(recipe)
    if out.get("precision") == "auto":
        bf16 = autocast_dtype("auto", resolve_device(out.get("device"))) is not None
        out["precision"] = "bf16" if bf16 else "fp32"
    for key in ("pretrain", "supervised"):
        trains = (out.get("encoder") or {}).get(key)
        if isinstance(trains, dict) and "mixed_precision" in trains:
            trains["mixed_precision"] = resolve_mixed_precision(trains["mixed_precision"])
    data = out.get("data") or {}
    if str(data.get("name")).lower() in BUILTIN or data.get("img_size") is not None:
        data.pop("transform", None)
    return out


def _start_run(run: Path, recipe: Recipe, clear: bool) -> None:
    """Clear an earlier run's stages (``clear``) and write the resolved recipe (main process
    only: the others wait at the next barrier)."""
    if not is_main():
        return
    if clear:
        for name in (*STAGES, "report.md", "metrics.json", "metrics.csv"):
            path = run / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    run.mkdir(parents=True, exist_ok=True)
    write_text(run / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def run_recipe(
    recipe: Recipe,
    out: str | os.PathLike,
    resume: bool = False,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Run every enabled stage of ``recipe`` into ``out`` and write ``report.md``.

    Under ``torchrun`` / ``accelerate launch`` every process runs every stage (training with
    DDP, scoring and feature extraction sharded by data index and merged exactly); the main
    process alone writes files and logs, and a stage's ``done.json`` is written only once
    every process has finished the stage. Resuming reads the same ``done.json`` files, so a
    run may be resumed with another number of processes.
    """
    run = Path(out)
    if not is_main():
        log = _quiet
    if recipe.seeds is not None:
        return _run_seeds(recipe, run, resume, force, log)
    ctx = Context(recipe, run, log)
    _preflight(ctx)
    clear = _check_run(run, recipe, resume, force)
    barrier()  # every process has checked the directory before the main one changes it
    _start_run(run, recipe, clear)
    write_json(run / "environment.json", environment(recipe.device))
    barrier()
    stages = enabled_stages(recipe)
    metrics = {}
    for i, name in enumerate(stages, 1):
        stage_dir, label = run / name, f"[{i}/{len(stages)}]"
        if (stage_dir / DONE).is_file():
            metrics[name] = read_json(stage_dir / DONE)
            log(f"{label} {name}: done earlier, skipped")
            continue
        if stage_dir.exists() and not STAGES[name].resumable and is_main():
            shutil.rmtree(stage_dir)  # an interrupted stage restarts cleanly
        barrier()
        stage_dir.mkdir(parents=True, exist_ok=True)
        metrics[name] = run_stage(STAGES[name], ctx, stage_dir, label)
    write_json(run / "metrics.json", metrics)
    write_text(run / "metrics.csv", _metrics_csv(metrics))
    if is_main():
        render_report(run)
    barrier()  # the run is whole before any process reads it back
    return run


def run_verb(
    recipe: Recipe,
    out: str | os.PathLike,
    main: str,
    command: dict,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Run the enabled stages of ``recipe`` for one CLI verb: the stage ``main`` writes
    straight into ``out`` (the same files as ``RUN/<main>/`` of ``memprune run``), any stage
    it needs first into ``out/<stage>/``; ``out/recipe.yaml`` records what ran.

    ``out`` follows the CLI's output rules (:func:`memprune.report.open_output`): a new or
    empty directory, ``force``, or an interrupted run of the same ``command``, which is
    finished (its finished stages are kept). Everything is validated before ``out`` is made.
    """
    from memprune.report import check_output, open_output, read_marker

    out = Path(out)
    if not is_main():
        log = _quiet
    stages = enabled_stages(recipe)
    if main not in stages:
        raise ConfigError(f"the recipe of this command does not enable its {main} stage")
    dirs = {name: out if name == main else out / name for name in stages}
    ctx = Context(recipe, out, log, dirs=dirs)
    check_output(out, command, force)
    _preflight(ctx)
    marker = read_marker(out) if out.is_dir() else None
    new = not out.exists()
    barrier()
    opened = open_output(out, command, force) if is_main() else None
    resuming = not force and marker is not None and not marker.get("finished", True)
    ctx.overwrite = bool(opened and opened.overwrite) or resuming
    write_text(out / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    barrier()
    try:
        for i, name in enumerate(stages, 1):
            stage_dir, label = dirs[name], f"[{i}/{len(stages)}]" if len(stages) > 1 else "-"
            if resuming and (stage_dir / DONE).is_file():
                log(f"{label} {name}: done earlier, kept")
                continue
            stage_dir.mkdir(parents=True, exist_ok=True)
            run_stage(STAGES[name], ctx, stage_dir, label)
    except MemPruneError:
        # a value the stage refused (nothing half-written stays): a new --out goes again,
        # so that the corrected command can use it
        barrier()
        if new and is_main():
            shutil.rmtree(out, ignore_errors=True)
        raise
    if opened is not None:
        opened.finish()
    barrier()
    return out


def _run_seeds(recipe: Recipe, run: Path, resume: bool, force: bool, log) -> Path:
    """``seeds``: one whole run per seed into ``RUN/seed_<s>/``, then the report over seeds
    (memprune.recipes._seeds). Resuming resumes every seed's run."""
    from memprune.recipes._seeds import clear_seeds, render_seeds_report, seed_dir, seed_recipe

    _preflight(Context(seed_recipe(recipe, recipe.seeds[0]), seed_dir(run, recipe.seeds[0]), log))
    clear = _check_run(run, recipe, resume, force)
    barrier()
    if clear and is_main():
        clear_seeds(run)
    _start_run(run, recipe, False)
    env = environment(recipe.device)
    write_json(run / "environment.json", env)
    barrier()
    for i, seed in enumerate(recipe.seeds, 1):
        log(f"== seed {seed} ({i} of {len(recipe.seeds)}) ==")
        run_recipe(seed_recipe(recipe, seed), seed_dir(run, seed), resume=True, log=log)
    if is_main():
        render_seeds_report(run, recipe.to_dict(), env)
    barrier()
    return run


def _quiet(message: str) -> None:
    """The log of every process but the main one."""


def _flatten(prefix: str, value, out: list) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _flatten(f"{prefix}[{i}]", v, out)
    else:
        out.append((prefix, value))


def _metrics_csv(metrics: dict) -> str:
    from memprune._table import format_csv

    rows: list = []
    _flatten("", metrics, rows)
    return format_csv(["metric", "value"], rows)
