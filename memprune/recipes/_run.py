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
import dataclasses
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
from memprune._table import write_table
from memprune.errors import ConfigError
from memprune.recipes._report import render_report
from memprune.recipes._schema import Recipe
from memprune.recipes._stages import DONE, STAGES, enabled_stages


class _Context:
    """What the stages share: the recipe, the run directory, data and encoders (lazily)."""

    def __init__(self, recipe: Recipe, run: Path, log: Callable[[str], None]):
        self.recipe, self.run, self.log = recipe, run, log
        self._cache: dict = {}

    def dataset(self, name: str, split: str):
        from memprune.data import load_dataset, native_size

        key = (name, split)
        if key not in self._cache:
            d = self.recipe.data
            size = native_size(name, d.img_size or self.recipe.encoder.img_size)
            if size is not None and d.transform == "encoder" and d.img_size is None:
                opts = {"transform": self.transform()}
            else:
                opts = {"img_size": size}
            self._cache[key] = load_dataset(name, split, root=d.root, **opts)
        return self._cache[key]

    def transform(self):
        """The recipe encoder's eval preprocessing (from its timm data config)."""
        from memprune.encoders import create_encoder, eval_transform

        if "transform" not in self._cache:
            enc = self.recipe.encoder
            model = create_encoder(enc.model, img_size=enc.img_size, **enc.timm)
            self._cache["transform"] = eval_transform(model)
        return self._cache["transform"]

    @property
    def train(self):
        return self.dataset(self.recipe.data.name, "train")

    @property
    def test(self):
        return self.dataset(self.recipe.data.name, "test")

    def splits(self):
        from memprune.data import Splits

        path = self.run / "pretrain" / "splits.json"
        return Splits.load(path) if path.is_file() else None

    def encoder(self, which: str):
        """``f``, ``g`` or ``supervised``, loaded from the run (or the recipe's checkpoints)."""
        from memprune.encoders import load_encoder

        if which in self._cache:
            return self._cache[which]
        enc = self.recipe.encoder
        if enc.pretrain is not None and which in ("f", "g"):
            model = load_encoder(checkpoint=self.run / "pretrain" / which)
        elif which == "supervised":
            model = load_encoder(checkpoint=self.run / "supervised")
        else:
            path = enc.checkpoint if which == "f" else enc.reference
            model = load_encoder(enc.model, checkpoint=path, img_size=enc.img_size,
                                 entry=enc.entry, strict=enc.strict, **enc.timm)  # fmt: skip
        self._cache[which] = model
        return model

    def points(self, key: str):
        """``data.members`` or ``data.nonmembers`` as a data set (defaults with a pretrain
        stage: the candidates, the extras)."""
        from memprune.data import read_indices, seeded_subset
        from memprune.recipes._schema import PointsCfg

        default = {"members": "candidate", "nonmembers": "extra"}[key]
        cfg = getattr(self.recipe.data, key) or PointsCfg(part=default)
        data = self.dataset(self.recipe.data.name, cfg.split)
        if cfg.indices is not None:
            try:
                idx = read_indices(cfg.indices, cfg.part)
            except ConfigError as err:
                raise ConfigError(f"data.{key}.indices: {err}") from None
        elif cfg.part is not None:
            idx = self.splits().indices(cfg.part)
        else:
            idx = None
        if idx is not None:
            bad = [i for i in idx if not 0 <= i < len(data)]
            if bad:
                raise ConfigError(f"data.{key}: indices {bad[:5]} are outside the"
                                  f" {cfg.split} split of {len(data)} points")  # fmt: skip
            data = torch.utils.data.Subset(data, idx)
        return seeded_subset(data, cfg.n, self.recipe.seed)

    def result(self, stage: str, name: str):
        from memprune.results import load_any

        return load_any(self.run / stage / name)


# ---------------------------------------------------------------- stages


def _pretrain(ctx: _Context, out: Path) -> dict:
    from memprune.train import pretrain_pair

    r, p = ctx.recipe, ctx.recipe.encoder.pretrain
    f, g, splits = pretrain_pair(
        r.encoder.model, ctx.train, out, shared=r.data.shared, candidate=r.data.candidate,
        extra=r.data.extra, split_seed=r.data.split_seed, epochs=p.epochs, lr=p.lr,
        batch_size=p.batch_size, temperature=p.temperature, proj_dim=p.proj_dim, seed=r.seed,
        img_size=r.encoder.img_size, augment=p.augment, mixed_precision=p.mixed_precision,
        resume=True, **r.encoder.timm,
    )  # fmt: skip
    return {
        "n_shared": len(splits.shared), "n_candidate": len(splits.candidate),
        "n_extra": len(splits.extra), "final_loss_f": f.history[-1], "final_loss_g": g.history[-1],
    }  # fmt: skip


def _supervised(ctx: _Context, out: Path) -> dict:
    from memprune.train import train_supervised

    r, s = ctx.recipe, ctx.recipe.encoder.supervised
    res = train_supervised(
        r.encoder.model, ctx.train, ctx.splits().f_indices, epochs=s.epochs,
        batch_size=s.batch_size, lr=s.lr, seed=r.seed, out_dir=out, img_size=r.encoder.img_size,
        resume=True, **r.encoder.timm,
    )  # fmt: skip
    return {"final_loss": res.history[-1]}


def _scored_points(ctx: _Context, max_points: int | None):
    from memprune.data import seeded_subset

    return seeded_subset(ctx.train, max_points, ctx.recipe.seed)


def _unit_summary(result) -> dict:
    rows = result.to_rows()
    scores = torch.cat([s["score"] for s in result.sites.values()])
    best = max(rows, key=lambda r: r["mean"])
    return {
        "mean": float(scores.mean()), "frac>0.5": float((scores > 0.5).float().mean()),
        "first_site": rows[0]["site"], "first_mean": rows[0]["mean"],
        "last_site": rows[-1]["site"], "last_mean": rows[-1]["mean"],
        "top_site": best["site"], "top_mean": best["mean"], "units": len(scores),
        "dead": sum(r["dead"] for r in rows),
    }  # fmt: skip


def _unit_mem(ctx: _Context, model, progress: bool | None = None):
    """UnitMem of ``model`` as the recipe's scores stage computes it."""
    from memprune.scores import unit_mem

    r, c = ctx.recipe, ctx.recipe.scores.unitmem
    return unit_mem(
        model, _scored_points(ctx, c.max_points), n_views=c.views, rest=c.rest, signed=c.signed,
        chunk_size=r.scores.chunk_size, seed=r.seed, device=r.device, progress=progress,
        precision=r.precision,
    )  # fmt: skip


def _unitmem(ctx: _Context, out: Path) -> dict:
    from memprune.report import plot_unit_scores

    result = _unit_mem(ctx, ctx.encoder("f"))
    result.save(out / "unitmem")
    plot_unit_scores(result, out / "unitmem_per_site.png")
    write_table(out / "summary", result.to_rows())
    return _unit_summary(result)


def _classmem(ctx: _Context, out: Path) -> dict:
    from memprune.report import plot_unit_scores
    from memprune.report.plots import plot_class_vs_unit
    from memprune.scores import class_mem

    r, c, uc = ctx.recipe, ctx.recipe.scores.classmem, ctx.recipe.scores.unitmem
    data = _scored_points(ctx, uc.max_points)
    opts = dict(chunk_size=r.scores.chunk_size, seed=r.seed, device=r.device, precision=r.precision)
    # the baseline's UnitMem is made exactly like f's (unitmem stage), so the two compare
    metrics, pairs = {}, {}
    encoders = ["f"] + (["supervised"] if r.encoder.supervised.enabled else [])
    for which in encoders:
        model = ctx.encoder(which)
        cm = class_mem(model, data, n_views=c.views, **opts)
        cm.save(out / f"classmem_{which}")
        plot_unit_scores(cm, out / f"classmem_{which}_per_site.png")
        if which == "f":
            um = ctx.result("unitmem", "unitmem")
        else:
            um = _unit_mem(ctx, model)
            um.save(out / f"unitmem_{which}")
        u = torch.cat([s["score"] for s in um.sites.values()])
        k = torch.cat([s["score"] for s in cm.sites.values()])
        pairs["SSL (f)" if which == "f" else "supervised"] = (u, k)
        metrics[which] = {"unitmem_mean": float(u.mean()), "classmem_mean": float(k.mean())}
    plot_class_vs_unit(pairs, out / "classmem_vs_unitmem.png")
    return metrics


def _sslmem(ctx: _Context, out: Path) -> dict:
    from memprune.report.plots import plot_sslmem
    from memprune.scores import ssl_mem

    r, c = ctx.recipe, ctx.recipe.scores.sslmem
    splits = ctx.splits()
    if splits is None:
        raise ConfigError("SSLMem needs the candidate / extra split of a pretrain stage")
    scores, metrics = {}, {}
    for part in ("candidate", "extra"):
        res = ssl_mem(
            ctx.encoder("f"), ctx.encoder("g"), ctx.train, getattr(splits, part),
            n_pairs=c.pairs, chunk_size=r.scores.chunk_size, seed=r.seed, device=r.device,
            augment=r.scores.augment, precision=r.precision,
        )  # fmt: skip
        res.meta["part"] = part
        res.save(out / f"sslmem_{part}")
        scores[part] = res.score
        n = len(res.score)
        metrics[part] = {"mean": float(res.score.mean()), "n": n,
                         "se": float(res.score.std() / n**0.5) if n > 1 else 0.0}  # fmt: skip
    plot_sslmem(scores, out / "sslmem.png")
    diff = metrics["candidate"]["mean"] - metrics["extra"]["mean"]
    se = (metrics["candidate"]["se"] ** 2 + metrics["extra"]["se"] ** 2) ** 0.5
    return {**metrics, "difference": diff, "difference_se": se}


def _layermem(ctx: _Context, out: Path) -> dict:
    from memprune.report import plot_consistency, plot_layer_mem
    from memprune.scores import layer_mem

    r, c = ctx.recipe, ctx.recipe.scores.layermem
    splits = ctx.splits()
    result = layer_mem(
        ctx.encoder("f"), ctx.encoder("g"), ctx.train, splits.candidate if splits else None,
        n_pairs=c.pairs, representation=c.representation, chunk_size=r.scores.chunk_size,
        seed=r.seed, device=r.device, top_k=c.top_k, augment=r.scores.augment,
        precision=r.precision,
    )  # fmt: skip
    result.save(out / "layermem")
    plot_layer_mem(result, out / "layermem.png")
    plot_consistency(result, out / "consistency.png")
    rows = result.to_rows()
    write_table(out / "layermem", rows)
    layers = [row for row in rows if row["layer"] != "output"]
    top = max(layers, key=lambda row: row["dLayerMem"])
    return {"top_delta_layer": top["layer"], "top_delta": top["dLayerMem"],
            "output_layermem": rows[-1]["LayerMem"], "layers": len(layers)}  # fmt: skip


def _membergap(ctx: _Context, out: Path) -> dict:
    from memprune.report import plot_member_gap
    from memprune.scores import member_gap

    r, c = ctx.recipe, ctx.recipe.scores.membergap
    result = member_gap(
        ctx.encoder("f"), ctx.points("members"), ctx.points("nonmembers"), n_pairs=c.pairs,
        representation=c.representation, n_boot=c.n_boot, chunk_size=r.scores.chunk_size,
        seed=r.seed, device=r.device, augment=r.scores.augment, precision=r.precision,
    )  # fmt: skip
    result.save(out / "membergap")
    plot_member_gap(result, out / "membergap.png")
    rows = result.to_rows()
    write_table(out / "membergap", rows)
    layers = [row for row in rows if row["layer"] != "output"]
    top = max(layers, key=lambda row: row["gap"])
    return {"top_gap_layer": top["layer"], "top_gap": top["gap"],
            "output_gap": rows[-1]["gap"], "output_gap_lo": rows[-1]["gap_lo"],
            "output_gap_hi": rows[-1]["gap_hi"], "output_auc": rows[-1]["auc"],
            "n_members": len(result.member_indices),
            "n_nonmembers": len(result.nonmember_indices)}  # fmt: skip


def _cka(ctx: _Context, out: Path) -> dict:
    """CKA between f and the supervised encoder at the same depth, on the test split: the
    whole split's estimate per layer, and one estimate per disjoint minibatch for the spread
    (the findings' standard error of first-layer minus last-layer CKA)."""
    from memprune.report import plot_cka
    from memprune.scores import cka

    r, c = ctx.recipe, ctx.recipe.scores.cka
    data, m = ctx.test, min(c.minibatch, len(ctx.test))
    opts = dict(minibatch=m, representation=c.representation, invariance=False, seed=r.seed,
                device=r.device, precision=r.precision, progress=False)  # fmt: skip
    f, sup = ctx.encoder("f"), ctx.encoder("supervised")
    result = cka(data, f, sup, **opts)
    result.save(out / "cka")
    plot_cka(result, out / "cka.png", "CKA: f (SSL, rows) vs supervised (columns)")
    layers = list(result.layers_a)
    same = torch.diagonal(result.matrix)
    folds = []
    for start in range(0, len(data) - m + 1, m):
        part = torch.utils.data.Subset(data, range(start, start + m))
        folds.append(torch.diagonal(cka(part, f, sup, **opts).matrix).tolist())
    rows = [{"layer": name, "cka": float(v)} for name, v in zip(layers, same)]
    write_table(out / "cka_by_depth", rows)
    return {"cka": {name: float(v) for name, v in zip(layers, same)}, "folds": folds,
            "minibatch": m}  # fmt: skip


def _evaluate(ctx: _Context, out: Path) -> dict:
    from memprune.probe import knn_probe, linear_probe

    r, e = ctx.recipe, ctx.recipe.evaluation
    encoders = ["f"] + (["g"] if r.encoder.pretrain or r.encoder.reference else [])
    encoders += ["supervised"] if r.encoder.supervised.enabled else []
    rows, metrics = [], {}
    for which in encoders:
        row = {"encoder": which}
        if e.linear:
            lin = linear_probe(ctx.encoder(which), ctx.train, ctx.test, backend=e.backend,
                               Cs=e.cs, seed=r.seed, device=r.device,
                               precision=r.precision)  # fmt: skip
            row["linear"] = lin.accuracy
        if e.knn:
            row["knn"] = knn_probe(ctx.encoder(which), ctx.train, ctx.test, seed=r.seed,
                                   device=r.device, precision=r.precision).accuracy  # fmt: skip
        rows.append(row)
        metrics[which] = {k: v for k, v in row.items() if k != "encoder"}
    write_table(out / "probes", rows)
    return metrics


def _prune(ctx: _Context, out: Path) -> dict:
    from memprune.probe import linear_probe
    from memprune.pruning import (
        GRADIENT_STRATEGIES,
        SCORE_STRATEGIES,
        compare_pruning,
        recovery,
        ssl_gradients,
    )
    from memprune.report import plot_prune_tradeoff

    r, p = ctx.recipe, ctx.recipe.actions.prune
    f = ctx.encoder("f")

    def evaluate(model) -> float:
        return linear_probe(model, ctx.train, ctx.test, seed=r.seed, device=r.device,
                            backend=r.evaluation.backend, Cs=r.evaluation.cs,
                            precision=r.precision).accuracy  # fmt: skip

    def rescore(model):  # UnitMem of the shrunken encoder
        return _unit_mem(ctx, model, progress=False)

    grads = None
    if any(s in GRADIENT_STRATEGIES for s in p.strategies):
        grads = ssl_gradients(ctx.train, seed=r.seed)
    recover = None
    if p.recover is not None:
        options = dataclasses.asdict(p.recover)
        method = options.pop("method")
        precision = r.encoder.pretrain.mixed_precision if r.encoder.pretrain else "auto"
        recover = recovery(ctx.train, f, method, progress=False, mixed_precision=precision,
                           **options)  # fmt: skip
    iterative = max(p.schedules) > 1 and any(s in SCORE_STRATEGIES for s in p.strategies)
    rows, runs = compare_pruning(
        f, ctx.result("unitmem", "unitmem"), evaluate, p.ratios, p.strategies, out / "models",
        log=ctx.log, recover=recover, seeds=p.seeds, schedules=p.schedules, export=p.export,
        scope=p.scope, gradients=grads, rescore=rescore if iterative else None,
        max_layer_ratio=p.max_layer_ratio, heads=p.heads, keep_output_width=p.keep_output_width,
        latency_batch=p.latency_batch,
    )  # fmt: skip
    write_json(out / "runs.json", runs)
    write_table(out / "comparison", rows)
    plot_prune_tradeoff(rows, out / "tradeoff.png", f"pruning f, linear probe on {r.data.name}")
    return {"rows": rows}


def _rankings(ctx: _Context, train, out: Path) -> dict:
    """The layer rankings ``top`` fine-tunes by, each from its scores stage (Auto-RGN is
    computed here, on the fine-tuning data); saved beside the comparison."""
    from memprune.recipes._schema import finetune_rankings
    from memprune.tuning import auto_rgn, ranking_values, unitmem_profile

    f, made = ctx.encoder("f"), {}
    for by in finetune_rankings(ctx.recipe):
        if by in ("delta", "layermem"):
            made[by] = ctx.result("layermem", "layermem")
        elif by in ("gap", "auc"):
            made[by] = ctx.result("membergap", "membergap")
        elif by in ("unitmem", "unitmem_frac"):
            made[by] = made.get("unitmem") or made.get("unitmem_frac") or unitmem_profile(
                ctx.result("unitmem", "unitmem"), f)  # fmt: skip
        else:
            made[by] = auto_rgn(f, train, seed=ctx.recipe.seed, device=ctx.recipe.device)
    rows = {}
    for by, result in made.items():
        for layer, value in zip(result.layers, ranking_values(result, by)[1].tolist()):
            if layer != "output":
                rows.setdefault(layer, {"layer": layer})[by] = value
    write_table(out / "rankings", list(rows.values()))
    return made


def _finetune(ctx: _Context, out: Path) -> dict:
    from memprune.probe import linear_probe
    from memprune.report import plot_finetune
    from memprune.tuning import compare_finetuning

    r, c = ctx.recipe, ctx.recipe.actions.finetune
    name = r.data.downstream or r.data.name
    train, test = ctx.dataset(name, "train"), ctx.dataset(name, "test")

    def baseline(encoder, seed: int) -> float:  # the probes of the evaluate stage's kind
        res = linear_probe(encoder, train, test, seed=seed, device=r.device,
                           backend=r.evaluation.backend, Cs=r.evaluation.cs,
                           precision=r.precision)  # fmt: skip
        return res.accuracy

    rankings = _rankings(ctx, train, out)
    rows, runs = compare_finetuning(
        ctx.encoder("f"), rankings, train, test, c.k, c.strategies, c.seeds,
        baseline=baseline, log=ctx.log, epochs=c.epochs, lr=c.lr, batch_size=c.batch_size,
        augment=c.augment,
    )  # fmt: skip
    write_json(out / "runs.json", runs)
    write_table(out / "comparison", rows)
    plot_finetune(rows, out / "comparison.png", f"fine-tuning f on {name}")
    return {"data": name, "rows": rows}


RUNNERS = {
    "pretrain": _pretrain, "supervised": _supervised, "unitmem": _unitmem,
    "classmem": _classmem, "sslmem": _sslmem, "layermem": _layermem,
    "membergap": _membergap, "cka": _cka, "evaluate": _evaluate,
    "prune": _prune, "finetune": _finetune,
}  # fmt: skip


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


def _preflight(ctx: _Context) -> None:
    """Build what every stage starts from (data, encoders named by the recipe) so that a bad
    name or path fails before the run directory is made."""
    from memprune.encoders import load_encoder
    from memprune.report import check_writable

    recipe = ctx.recipe
    check_writable(ctx.run)
    ctx.train, ctx.test  # noqa: B018  (loads both splits: an unknown data set fails here)
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
    if recipe.scores.membergap.enabled and enc.pretrain is None:
        from memprune.scores.membership import check_disjoint

        check_disjoint(ctx.points("members"), ctx.points("nonmembers"))


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


def _as_current(saved: dict) -> dict:
    """A saved recipe as this version reads it: a key added since it was written takes the
    value that reproduces what that run did, so an older run can be resumed exactly. One that
    no longer validates is compared as it is (and differs)."""
    from memprune.recipes._schema import validate

    saved = copy.deepcopy(saved)
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
    from memprune.data import native_size
    from memprune.encoders import resolve_device
    from memprune.engine import autocast_dtype
    from memprune.train import resolve_mixed_precision

    out = copy.deepcopy(recipe)
    if out.get("precision") == "auto":
        bf16 = autocast_dtype("auto", resolve_device(out.get("device"))) is not None
        out["precision"] = "bf16" if bf16 else "fp32"
    pretrain = (out.get("encoder") or {}).get("pretrain")
    if isinstance(pretrain, dict) and "mixed_precision" in pretrain:
        pretrain["mixed_precision"] = resolve_mixed_precision(pretrain["mixed_precision"])
    data = out.get("data") or {}
    if native_size(str(data.get("name")), 1) is None or data.get("img_size") is not None:
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
    ctx = _Context(recipe, run, log)
    _preflight(ctx)
    clear = _check_run(run, recipe, resume, force)
    barrier()  # every process has checked the directory before the main one changes it
    _start_run(run, recipe, clear)
    write_json(run / "environment.json", environment(recipe.device))
    barrier()
    stages = enabled_stages(recipe)
    metrics = {}
    for i, name in enumerate(stages, 1):
        stage_dir = run / name
        done = stage_dir / DONE
        if done.is_file():
            metrics[name] = read_json(done)
            log(f"[{i}/{len(stages)}] {name}: done earlier, skipped")
            continue
        if stage_dir.exists() and name not in ("pretrain", "supervised") and is_main():
            shutil.rmtree(stage_dir)  # an interrupted stage restarts cleanly
        barrier()
        stage_dir.mkdir(parents=True, exist_ok=True)
        log(f"[{i}/{len(stages)}] {name} ...")
        start = time.perf_counter()
        result = RUNNERS[name](ctx, stage_dir)
        barrier()  # done.json only once every process has finished the stage
        result["seconds"] = round(time.perf_counter() - start, 1)
        write_json(done, result)
        barrier()
        metrics[name] = result
        log(f"[{i}/{len(stages)}] {name}: {result['seconds']} s")
    write_json(run / "metrics.json", metrics)
    write_text(run / "metrics.csv", _metrics_csv(metrics))
    if is_main():
        render_report(run)
    barrier()  # the run is whole before any process reads it back
    return run


def _run_seeds(recipe: Recipe, run: Path, resume: bool, force: bool, log) -> Path:
    """``seeds``: one whole run per seed into ``RUN/seed_<s>/``, then the report over seeds
    (memprune.recipes._seeds). Resuming resumes every seed's run."""
    from memprune.recipes._seeds import clear_seeds, render_seeds_report, seed_dir, seed_recipe

    _preflight(_Context(seed_recipe(recipe, recipe.seeds[0]), seed_dir(run, recipe.seeds[0]), log))
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
