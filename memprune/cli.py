"""The ``memprune`` command: parse arguments, make a config, call one library function.

Errors a user can fix (:class:`MemPruneError`) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from memprune._dist import is_main
from memprune.errors import MemPruneError

DEFAULT_MODEL = "resnet18"
DEFAULT_IMG_SIZE = 32
DEFAULT_DATA = "digits"


def _add_model_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    p.add_argument("--model", default=None, help=f"timm model name (default: {DEFAULT_MODEL}, or"
                   " the one a --checkpoint run or pruned directory records)")  # fmt: skip
    p.add_argument("--checkpoint", default=None, nargs="+" if several else None,
                   help="weights: .safetensors, a torch state dict, a memprune run or a pruned"
                   f" directory{' (several: one table)' if several else ''}")  # fmt: skip
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default:"
                   f" {DEFAULT_IMG_SIZE}, or the checkpoint directory's)")  # fmt: skip
    p.add_argument("--trust-pickle", action="store_true", help="allow pickled checkpoints (unsafe)")
    p.add_argument("--timm", nargs="+", default=None, metavar="KEY=VALUE", help="timm arguments")
    _add_checkpoint_options(p)


def _add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--entry", default=None, help="which model of a checkpoint holding several"
                   " (DINO: teacher, the default, or student)")  # fmt: skip
    p.add_argument(
        "--no-strict",
        dest="strict",
        action="store_false",
        help="load the tensors that fit a checkpoint and warn about the rest",
    )


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", default=DEFAULT_DATA, help="data set name or image folder (default: %(default)s)"
    )
    p.add_argument("--root", default=None, help="folder of a torchvision data set's files")
    p.add_argument(
        "--split", default="train", choices=("train", "test"), help="(default: %(default)s)"
    )


def _encoder(args):
    """The encoder of --model/--checkpoint; without a checkpoint its random init is seeded by
    --seed, so that a rerun scores the same encoder."""
    import torch

    from memprune.encoders import load_encoder

    if args.checkpoint is None:
        torch.manual_seed(getattr(args, "seed", 0))
    # a run or pruned directory records its model and size: defaults must not contradict it
    ckpt = args.checkpoint
    recorded = ckpt is not None and (Path(ckpt).is_dir() or str(ckpt).endswith(".json"))
    return load_encoder(
        args.model if recorded else (args.model or DEFAULT_MODEL),
        checkpoint=ckpt,
        img_size=args.img_size if recorded else (args.img_size or DEFAULT_IMG_SIZE),
        trust_pickle=args.trust_pickle,
        entry=args.entry,
        strict=args.strict,
        **_key_values(args.timm),
    )


def _model_name(args, model) -> str:
    """The timm name of ``model`` (for tables and metadata)."""
    build = (getattr(model, "pretrained_cfg", None) or {}).get("memprune_build") or {}
    return build.get("model") or args.model or DEFAULT_MODEL


def _img_size(args) -> int | None:
    """Built-in data sets come at their own size; others are resized to ``--img-size``."""
    from memprune.data import native_size

    return native_size(args.data, args.img_size or DEFAULT_IMG_SIZE)


def _augment(tokens: list[str] | None, default: str | None):
    """``--augment PRESET KEY=VALUE ...`` as the library's one spelling of an augmentation
    (``default`` None: the library function's own default, also for a mapping's preset)."""
    from memprune.errors import ConfigError

    if not tokens:
        return default
    presets = [t for t in tokens if "=" not in t]
    if len(presets) > 1:
        raise ConfigError(f"--augment takes one preset name, got {presets}")
    params = _key_values([t for t in tokens if "=" in t], "--augment")
    preset = presets[0] if presets else default
    return {**({"preset": preset} if preset else {}), **params}


def _dataset(args):
    from memprune.data import load_dataset

    img_size = _img_size(args)
    return load_dataset(args.data, split=args.split, root=args.root, img_size=img_size)


def _command(args: argparse.Namespace) -> dict:
    """The command and its arguments, as recorded in (and matched against) an output marker."""
    skip = {"func", "force", "out", "resume"}
    verb = " ".join(v for v in (args.command, getattr(args, "what", None)) if v)
    return {
        "verb": verb,
        "args": {
            k: v for k, v in sorted(vars(args).items()) if k not in skip and not k.startswith("_")
        },
    }


def _check_out(args: argparse.Namespace) -> None:
    """Refuse a bad --out before any work (nothing is created)."""
    from memprune.report import check_output

    check_output(args.out, _command(args), args.force)


def _open_out(args: argparse.Namespace):
    """The output directory, created just before the first write (see :func:`open_output`)."""
    from memprune.report import open_output

    return open_output(args.out, _command(args), args.force)


def _positive(args: argparse.Namespace, *names: str, allow_none: bool = True) -> None:
    """Refuse counts below 1 (``--views 0``, ``--max-points -5``) before any work."""
    from memprune.errors import ConfigError

    for name in names:
        value = getattr(args, name, None)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is None and allow_none:
                continue
            if not isinstance(v, int) or v < 1:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be an integer >= 1, got {v!r}")


def cmd_sites(args: argparse.Namespace) -> int:
    """List the unit and layer sites and push one batch of views through them."""
    import torch

    from memprune._table import format_table
    from memprune.data import MultiView
    from memprune.encoders import normalization
    from memprune.hooks import capture
    from memprune.sites import find_sites

    model = _encoder(args)
    data = _dataset(args)
    sites = find_sites(model, "units") + find_sites(model, "layers")
    views = MultiView(data, n_views=args.views, seed=args.seed)
    batch = torch.stack([views[i][0] for i in range(min(args.points, len(views)))])
    b, k = batch.shape[:2]  # [B, K, 3, H, W]
    mean, std = normalization(model)
    x = (batch.flatten(0, 1) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.inference_mode(), capture(model, sites) as acts:
        out = model(x)
    rows = [
        (
            s.name,
            s.kind,
            s.role,
            s.n_units,
            "x".join(map(str, acts.shapes[s.name])),
            tuple(acts[s.name].shape),
        )
        for s in sites
    ]
    n_params = sum(p.numel() for p in model.parameters())
    shape = tuple(x.shape[1:])
    print(
        f"{_model_name(args, model)}: {n_params / 1e6:.2f}M parameters, input {shape},"
        f" output dim {out.shape[1]}"
    )
    print(f"{data.name} ({args.split}): {len(data)} images; one batch of {b} points x {k} views\n")
    print(format_table(["site", "kind", "role", "units", "output shape", "captured"], rows))
    n_units = sum(s.n_units for s in sites if s.kind == "units")
    print(
        f"\n{sum(s.kind == 'units' for s in sites)} unit sites ({n_units} units),"
        f" {sum(s.kind == 'layers' for s in sites)} layer sites"
    )
    return 0


def cmd_score_units(args: argparse.Namespace) -> int:
    """UnitMem (``score units``) or ClassMem (``score classes``) into ``--out``."""
    from memprune._dist import rank_world
    from memprune._table import write_table
    from memprune.data import seeded_subset
    from memprune.report import plot_unit_scores
    from memprune.scores import class_mem, unit_mem

    rank, _ = rank_world()
    _positive(args, "views", "chunk_size", "max_points")
    if rank == 0:
        _check_out(args)
    model = _encoder(args)
    data = seeded_subset(_dataset(args), args.max_points, args.seed)
    fn, kind = (unit_mem, "unitmem") if args.what == "units" else (class_mem, "classmem")
    result = fn(
        model,
        data,
        n_views=args.views,
        sites=args.sites,
        rest=args.rest,
        signed=args.signed,
        augment=_augment(args.augment, "simclr" if args.what == "units" else "none"),
        chunk_size=args.chunk_size,
        precision=args.precision,
        seed=args.seed,
        device=args.device,
        num_workers=args.workers,
    )
    if rank != 0:
        return 0
    out = _open_out(args)
    result.meta.update(model=_model_name(args, model), checkpoint=args.checkpoint, data=args.data)
    result.save(out / kind)
    rows = result.to_rows()
    printed = write_table(out / "summary", rows)
    plot_unit_scores(result, out / f"{kind}_per_site.png")
    out.finish()
    print(printed)
    files = f"{kind}.safetensors, {kind}.json, summary.md, summary.csv, {kind}_per_site.png"
    print(f"\nwrote {files} to {out}")
    return 0


def _key_values(pairs: list[str] | None, flag: str = "--timm") -> dict:
    """``KEY=VALUE`` strings (values parsed as YAML) into keyword arguments."""
    import yaml

    from memprune.errors import ConfigError

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} takes KEY=VALUE (e.g. scale=[0.3,1.0]), got {pair!r}")
        value = yaml.safe_load(value)
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def _check_pretrain(args: argparse.Namespace, out: Path) -> None:
    """Refuse bad training options and a --resume without a run to continue, before any work."""
    from memprune.errors import ConfigError
    from memprune.report import read_marker

    _positive(args, "epochs", "batch_size")
    if not args.supervised and args.batch_size < 2:
        raise ConfigError(
            f"--batch-size {args.batch_size}: SimCLR needs at least 2 points per batch (the other"
            " points are each view's negatives); use --batch-size 2 or more"
        )
    if not args.lr > 0:
        raise ConfigError(f"--lr must be > 0, got {args.lr}")
    if args.resume:
        marker = read_marker(out)
        if marker is None or marker.get("command", {}).get("verb") != "pretrain":
            raise ConfigError(
                f"--resume: {out} holds no run of `memprune pretrain` to continue;"
                " drop --resume to start a new run there"
            )


def cmd_pretrain(args: argparse.Namespace) -> int:
    """SimCLR (or supervised) training of one encoder, or of the pair f / g."""
    from memprune._dist import rank_world
    from memprune.encoders import load_encoder
    from memprune.report import open_output
    from memprune.train import pretrain_pair, pretrain_simclr, train_supervised

    rank, _ = rank_world()
    out = Path(args.out)
    _check_pretrain(args, out)
    data = _dataset(args)
    load_encoder(args.model, img_size=args.img_size, **_key_values(args.timm))  # a bad name fails
    if rank == 0:  # validated: from here on files are written (training resumes from them)
        open_output(out, _command(args), force=args.force or args.resume)
    common = dict(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        img_size=args.img_size, mixed_precision=args.mixed_precision,
        keep_checkpoints=args.keep_checkpoints, resume=True, num_workers=args.workers,
        augment=_augment(args.augment, "crop_flip" if args.supervised else "simclr"),
        **_key_values(args.timm),
    )  # fmt: skip
    if args.supervised:
        result = train_supervised(
            args.model, data, out_dir=out, random_labels=args.random_labels, **common
        )
        runs = {"encoder": result}
    else:
        simclr = dict(common, temperature=args.temperature, proj_dim=args.proj_dim)
        if args.pair:
            sizes = {
                k: _fraction(getattr(args, k)) for k in ("shared", "candidate", "extra", "test")
            }
            f, g, splits = pretrain_pair(
                args.model, data, out, **sizes, split_seed=args.seed, **simclr
            )
            runs = {"f": f, "g": g}
            if rank == 0:
                print(
                    f"splits: shared {len(splits.shared)}, candidate {len(splits.candidate)},"
                    f" extra {len(splits.extra)}, test {len(splits.test)} -> {out / 'splits.json'}"
                )
        else:
            runs = {"encoder": pretrain_simclr(args.model, data, out_dir=out, **simclr)}
    if rank == 0:
        from memprune.report import OutputDir

        OutputDir(out, overwrite=True).finish()
        for name, run in runs.items():
            losses = ", ".join(f"{h:.3f}" for h in run.history)
            print(f"{name}: {run.path} (loss per epoch: {losses})")
    return 0


def _fraction(text: str) -> int | float:
    """``"0.5"`` is a fraction, ``"100"`` a count."""
    return float(text) if "." in text else int(text)


def _encoder_arg(path: str, args: argparse.Namespace):
    from memprune.encoders import load_encoder

    return load_encoder(args.model, checkpoint=path, img_size=args.img_size, entry=args.entry,
                        strict=args.strict, **_key_values(args.timm))  # fmt: skip


def _points(args, flag: str):
    """``--members`` / ``--nonmembers SPLIT[:FILE[:PART]]``: a split of ``--data``, restricted
    to the indices of FILE (a JSON list, or a memprune splits.json and which PART of it)."""
    from torch.utils.data import Subset

    from memprune.data import load_dataset, read_indices
    from memprune.errors import ConfigError

    spec = getattr(args, flag)
    split, _, rest = spec.partition(":")
    path, _, part = rest.rpartition(":") if rest.count(":") else (rest, "", "")
    if split not in ("train", "test"):
        raise ConfigError(f"--{flag} {spec!r}: write SPLIT[:FILE[:PART]] with SPLIT train or test")
    loaded = vars(args).setdefault("_loaded", {})  # one data set per split, so that
    if split not in loaded:  # members and non-members of one split are checked for overlap
        loaded[split] = load_dataset(args.data, split, root=args.root, img_size=_img_size(args))
    data = loaded[split]
    if not path:
        return data
    try:
        return Subset(data, read_indices(path, part or None))
    except ConfigError as err:
        raise ConfigError(f"--{flag} {spec!r}: {err}") from None


def cmd_score_gap(args: argparse.Namespace) -> int:
    """Member gap and membership AUC per layer of one encoder (no reference encoder)."""
    from memprune._dist import rank_world
    from memprune._table import write_table
    from memprune.errors import ConfigError
    from memprune.report import plot_member_gap
    from memprune.scores import member_gap

    rank, _ = rank_world()
    if not (args.members and args.nonmembers) or args.f or args.g:
        raise ConfigError(
            "score layers takes either --f and --g (LayerMem), or --encoder with --members and"
            " --nonmembers (member gap, no reference encoder)"
        )
    if rank == 0:
        _check_out(args)
    encoder = _encoder_arg(args.encoder, args)
    result = member_gap(
        encoder, _points(args, "members"), _points(args, "nonmembers"), n_pairs=args.pairs,
        layers=args.layers, representation=args.representation, pair=args.pair,
        n_points=args.n_points, chunk_size=args.chunk_size, seed=args.seed, device=args.device,
        num_workers=args.workers, augment=_augment(args.augment, "simclr"),
        precision=args.precision,
    )  # fmt: skip
    if rank != 0:
        return 0
    out = _open_out(args)
    result.meta.update(encoder=str(args.encoder), members=args.members, nonmembers=args.nonmembers)
    result.save(out / "membergap")
    printed = write_table(out / "membergap", result.to_rows())
    plot_member_gap(result, out / "membergap.png")
    out.finish()
    print(printed)
    print(f"\nwrote membergap.safetensors, membergap.json, membergap.md, membergap.csv,"
          f" membergap.png to {out}")  # fmt: skip
    return 0


def cmd_score_layers(args: argparse.Namespace) -> int:
    """LayerMem / ΔLayerMem of the pair f, g on the candidates (or, with --encoder, the member
    gap of one encoder)."""
    from memprune._dist import rank_world

    if args.encoder:
        return cmd_score_gap(args)
    if not (args.f and args.g):
        from memprune.errors import ConfigError

        raise ConfigError(
            "score layers needs --f and --g (LayerMem of a pair), or --encoder CKPT --members"
            " SPLIT[:FILE[:PART]] --nonmembers ... (member gap of one encoder)"
        )
    from memprune._table import write_table
    from memprune.data import Splits
    from memprune.report import plot_consistency, plot_layer_mem
    from memprune.scores import layer_mem

    rank, _ = rank_world()
    _positive(args, "pairs", "chunk_size", "n_points", "top_k")
    if rank == 0:
        _check_out(args)
    if Path(args.f).resolve() == Path(args.g).resolve():
        from memprune.errors import ConfigError

        raise ConfigError(
            f"--f and --g are the same encoder ({args.f}): LayerMem would be 0 in every layer;"
            " pass as --g the encoder trained without the candidates"
        )
    f, g = _encoder_arg(args.f, args), _encoder_arg(args.g, args)
    data = _dataset(args)
    splits_path = args.splits or (Path(args.f).parent / "splits.json")
    indices = None
    if Path(splits_path).is_file():
        indices = getattr(Splits.load(splits_path), args.part)
        if not indices:
            from memprune.errors import ConfigError

            raise ConfigError(
                f"{splits_path} has no {args.part} points: choose another --part (shared,"
                " candidate, extra) or pretrain with a --test share"
            )
    elif args.splits:
        from memprune.errors import ConfigError

        raise ConfigError(f"--splits {args.splits} does not exist")
    result = layer_mem(
        f, g, data, indices, n_pairs=args.pairs, layers=args.layers,
        representation=args.representation, pair=args.pair, n_points=args.n_points,
        chunk_size=args.chunk_size, seed=args.seed, device=args.device, num_workers=args.workers,
        top_k=args.top_k, augment=_augment(args.augment, "simclr"), precision=args.precision,
    )  # fmt: skip
    if rank != 0:
        return 0
    scored = f"{args.part} of {splits_path}" if indices is not None else "all"
    out = _open_out(args)
    result.meta.update(f=str(args.f), g=str(args.g), data=args.data, scored=scored)
    result.save(out / "layermem")
    rows = result.to_rows()
    printed = write_table(out / "layermem", rows)
    plot_layer_mem(result, out / "layermem.png")
    plot_consistency(result, out / "consistency.png")
    out.finish()
    print(printed)
    print(f"\nwrote layermem.safetensors, layermem.json, layermem.md, layermem.csv, layermem.png,"
          f" consistency.png to {out}")  # fmt: skip
    return 0


def cmd_score_cka(args: argparse.Namespace) -> int:
    """CKA between the layers of --a and --b (or within --a), with labels and view invariance."""
    from memprune.report import plot_cka
    from memprune.scores import cka

    _positive(args, "minibatch")
    _check_out(args)
    a = _encoder_arg(args.a, args)
    b = _encoder_arg(args.b, args) if args.b else None
    data = _dataset(args)
    result = cka(data, a, b, layers_a=args.layers_a, layers_b=args.layers_b,
                 minibatch=args.minibatch, representation=args.representation,
                 invariance=not args.no_invariance, seed=args.seed, device=args.device,
                 augment=_augment(args.augment, "simclr"))  # fmt: skip
    result.meta.update(name_a=Path(args.a).name, name_b=Path(args.b or args.a).name,
                       a=args.a, b=args.b, data=args.data)  # fmt: skip
    out = _open_out(args)
    result.save(out / "cka")
    from memprune._table import write_table

    printed = write_table(out / "cka", result.to_rows())
    plot_cka(result, out / "cka.png", f"CKA on {args.data} ({args.split})")
    out.finish()
    print(printed)
    print(f"\nwrote cka.safetensors, cka.json, cka.md, cka.csv, cka.png to {out}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    """Linear-probe (and kNN) accuracy of frozen encoders on train -> test, one table."""
    from memprune._dist import rank_world
    from memprune._io import write_json
    from memprune._table import write_table
    from memprune.data import load_dataset, native_size
    from memprune.probe import knn_probe, linear_probe
    from memprune.report import plot_confusion

    rank, _ = rank_world()
    _positive(args, "chunk_size")
    if rank == 0:
        _check_out(args)
    checkpoints = args.checkpoint or [None]
    encoders = [
        _encoder(argparse.Namespace(**{**vars(args), "checkpoint": c})) for c in checkpoints
    ]  # fmt: skip  (every checkpoint is read before any work)
    built_in = native_size(args.data, 1) is None  # the built-in data come at their own size
    if args.transform == "encoder" and not built_in:
        from memprune.encoders import eval_transform

        size = {"transform": eval_transform(encoders[0])}  # the first encoder's preprocessing
    else:
        size = {"img_size": _img_size(args)}
    train = load_dataset(args.data, "train", root=args.root, **size)
    test = load_dataset(args.data, "test", root=args.root, **size)
    common = dict(seed=args.seed, chunk_size=args.chunk_size, cache_dir=args.cache_dir,
                  device=args.device, precision=args.precision, store=args.store)  # fmt: skip
    probes = []
    for model in encoders:
        linear = linear_probe(model, train, test, backend=args.backend, **common)
        probes.append((linear, knn_probe(model, train, test, **common) if args.knn else None))
    if rank != 0:
        return 0
    out = _open_out(args)
    n_classes = len(probes[0][0].confusion)
    classes = [str(c) for c in (getattr(train, "classes", None) or range(n_classes))]
    records, rows = [], []
    for i, (model, ckpt, (linear, knn)) in enumerate(zip(encoders, checkpoints, probes)):
        name = _model_name(args, model)
        record = {"model": name, "checkpoint": ckpt}
        for kind, r in (("linear", linear), ("knn", knn)):
            if r is None:
                continue
            record[kind] = {
                "accuracy": r.accuracy, **r.choice, **r.meta, "n_train": r.n_train,
                "n_test": r.n_test, "val_scores": r.val_scores, "timings": r.timings,
                "confusion": r.confusion.tolist(),
            }  # fmt: skip
            title = f"{kind} probe: {ckpt or name} on {args.data}, accuracy {r.accuracy:.4f}"
            png = f"confusion_{kind}.png" if len(encoders) == 1 else f"confusion_{kind}_{i}.png"
            plot_confusion(r.confusion, out / png, title, classes=classes)
        records.append(record)
        row = {"encoder": ckpt or name, "backend": linear.meta["backend"],
               "linear": linear.accuracy, "C": linear.choice["C"]}  # fmt: skip
        if knn is not None:
            row.update(knn=knn.accuracy, k=knn.choice["k"])
        rows.append(row)
    write_json(out / "probe.json", {"data": args.data, "classes": classes, "n_train": len(train),
                                    "n_test": len(test), "encoders": records})  # fmt: skip
    printed = write_table(out / "probe", rows)
    out.finish()
    print(printed)
    print(f"\nwrote probe.json, probe.md/.csv and confusion plots to {out}")
    return 0


def _write_comparison(out, rows: list[dict], report: dict, also: str) -> None:
    """``report.json`` and the comparison table (Markdown, CSV, terminal)."""
    from memprune._io import write_json
    from memprune._table import write_table

    write_json(out / "report.json", report)
    printed = write_table(out / "comparison", rows)
    out.finish()
    print(printed)
    print(f"\nwrote report.json, comparison.md/.csv, {also} to {out.path}")


def _unit_scores(path: str):
    """A saved UnitMemResult: ``score units --out DIR`` or its ``unitmem`` file stem."""
    from memprune.errors import ConfigError
    from memprune.scores import UnitMemResult

    stem = Path(path) / "unitmem" if Path(path).is_dir() else Path(str(path).removesuffix(".json"))
    if not stem.with_suffix(".json").is_file():
        raise ConfigError(
            f"no UnitMem scores at {path}: pass the --out directory of `memprune score units`"
        )
    return UnitMemResult.load(stem)


def _check_scores_match(scores, args: argparse.Namespace) -> None:
    """Scores saved by ``score units`` record the encoder they were made on: it must be this one."""
    from memprune.errors import ConfigError

    def same(a, b) -> bool:
        if a is None or b is None:
            return a is b
        return Path(a).resolve() == Path(b).resolve()

    made_on = scores.meta.get("checkpoint")
    if "checkpoint" in scores.meta and not same(made_on, args.checkpoint):
        raise ConfigError(
            f"--scores {args.scores} were computed on checkpoint {made_on or '(random init)'},"
            f" not on --checkpoint {args.checkpoint or '(random init)'}: score this encoder"
            " with `memprune score units` first, or pass its own --scores"
        )


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune by each strategy and ratio; probe every pruned encoder; one comparison table."""
    from functools import partial

    from memprune.data import load_dataset, seeded_subset
    from memprune.encoders import resolve_device
    from memprune.probe import linear_probe
    from memprune.pruning import (
        GRADIENT_STRATEGIES,
        SCORE_STRATEGIES,
        check_options,
        compare_pruning,
        prune_verdicts,
        recovery,
        ssl_gradients,
    )
    from memprune.report import plot_prune_tradeoff, plot_unit_scores
    from memprune.scores import unit_mem

    _positive(args, "views", "chunk_size", "max_points", "recover_epochs", "recover_steps")
    for strategy in args.strategy:  # validate the whole sweep before any work or any file
        for ratio in args.ratio:
            for steps in args.iterative_steps:
                # scores=True, gradients: UnitMem and the SSL gradients are made below if needed
                check_options(ratio, strategy, args.scope, args.max_layer_ratio, steps,
                              scores=True, gradients=print)  # fmt: skip
    if args.onnx and not args.export:
        from memprune.errors import ConfigError

        raise ConfigError("--onnx exports beside the torch.export program: add --export")
    _check_out(args)
    device = resolve_device(args.device)
    model = _encoder(args).to(device)
    img_size = _img_size(args)
    train = load_dataset(args.data, "train", root=args.root, img_size=img_size)
    test = load_dataset(args.data, "test", root=args.root, img_size=img_size)

    def score(m, progress=None):  # UnitMem of an encoder (iterative schedules: each step's)
        return unit_mem(m, seeded_subset(train, args.max_points, args.seed), n_views=args.views,
                        chunk_size=args.chunk_size, seed=args.seed, device=device,
                        progress=progress, precision=args.precision)  # fmt: skip

    scores = None
    if args.scores:
        scores = _unit_scores(args.scores)
        _check_scores_match(scores, args)
    elif any(s in SCORE_STRATEGIES for s in args.strategy):
        scores = score(model)
        scores.meta.update(model=_model_name(args, model), checkpoint=args.checkpoint,
                           data=args.data)  # fmt: skip
    out = _open_out(args)
    if scores is not None and not args.scores:
        scores.save(out / "unitmem")
        plot_unit_scores(scores, out / "unitmem_per_site.png")

    def evaluate(encoder) -> float:
        return linear_probe(encoder, train, test, seed=args.seed, device=device,
                            backend=args.backend, precision=args.precision).accuracy  # fmt: skip

    options = dict(
        scope=args.scope,
        max_layer_ratio=args.max_layer_ratio,
        heads=args.heads,
        keep_output_width=not args.prune_output_width,
        seeds=args.seeds or [args.seed],
        schedules=args.iterative_steps,
        latency_batch=args.latency_batch,
        export=args.export,
        onnx=args.onnx,
    )
    # taylor, hessian: the gradient of the SimCLR loss on the training data (no labels needed)
    grads = None
    if any(s in GRADIENT_STRATEGIES for s in args.strategy):
        grads = ssl_gradients(train, seed=args.seed)
    recover = None
    if args.recover:
        recover = recovery(train, model, args.recover, epochs=args.recover_epochs,
                           steps=args.recover_steps, lr=args.recover_lr, progress=False,
                           augment=_augment(args.recover_augment, None))  # fmt: skip
    iterative = max(args.iterative_steps) > 1 and scores is not None and not args.scores
    rows, reports = compare_pruning(model, scores, evaluate, args.ratio, args.strategy,
                                    out / "models", overwrite=out.overwrite, gradients=grads,
                                    recover=recover,
                                    rescore=partial(score, progress=False) if iterative else None,
                                    log=lambda m: print(m, flush=True), **options)  # fmt: skip
    verdicts = prune_verdicts(rows)
    print("\n".join(verdicts))
    recovered = args.recover and {"method": args.recover, "epochs": args.recover_epochs,
                                  "steps": args.recover_steps, "lr": args.recover_lr}  # fmt: skip
    report = {
        "model": _model_name(args, model), "checkpoint": args.checkpoint, "data": args.data,
        "probe": args.backend, "options": {**options, "recovery": recovered or None},
        "table": rows, "verdicts": verdicts, "runs": reports,
    }  # fmt: skip
    title = f"pruning {_model_name(args, model)} ({args.scope} scope), linear probe on {args.data}"
    plot_prune_tradeoff(rows, out / "tradeoff.png", title)
    _write_comparison(out, rows, report, "tradeoff.png and models/")
    return 0


def _layer_scores(args):
    """A layer ranking from ``--layer-scores DIR`` (LayerMem or member gap), or LayerMem
    computed for ``--f`` / ``--g``; None without either."""
    from memprune.data import Splits, load_dataset
    from memprune.errors import ConfigError
    from memprune.results import load_any
    from memprune.scores import layer_mem

    if args.layer_scores:
        stem = Path(args.layer_scores)
        if stem.is_dir():
            found = [stem / n for n in ("layermem", "membergap") if (stem / f"{n}.json").is_file()]
            stem = found[0] if found else stem / "layermem"
        else:
            stem = Path(str(stem).removesuffix(".json"))
        if not stem.with_suffix(".json").is_file():
            raise ConfigError(
                f"no layer scores at {args.layer_scores}: pass the --out of `memprune score"
                " layers` (with --f/--g, or --encoder)"
            )
        return load_any(stem)
    if not args.g:
        return None
    f, g = _encoder_arg(args.f, args), _encoder_arg(args.g, args)
    splits = Path(args.f).parent / "splits.json"
    indices = Splits.load(splits).candidate if splits.is_file() else None
    data = load_dataset(args.score_data, "train", root=args.root)
    return layer_mem(f, g, data, indices, n_pairs=args.pairs, seed=0)


def _finetune_rankings(args, encoder, train) -> dict:
    """``--by`` name -> the result ranking by it (default: every ranking the given scores
    offer, then Auto-RGN, which needs only the downstream data)."""
    from memprune.errors import ConfigError
    from memprune.scores import UnitMemResult
    from memprune.tuning import auto_rgn, unitmem_profile

    sources = []
    if (scores := _layer_scores(args)) is not None:
        sources.append(scores)
    if args.unit_scores:
        stem = Path(args.unit_scores)
        stem = stem / "unitmem" if stem.is_dir() else Path(str(stem).removesuffix(".json"))
        sources.append(unitmem_profile(UnitMemResult.load(stem), encoder))
    offered = {by: result for result in sources for by in result.rankings}
    wanted = args.by or [*[r.rankings[0] for r in sources], "rgn"]
    made = {}
    for by in wanted:
        if by == "rgn":
            made[by] = auto_rgn(encoder, train, seed=args.seeds[0])
        elif by in offered:
            made[by] = offered[by]
        else:
            raise ConfigError(
                f"--by {by}: no scores rank by it; pass --layer-scores (score layers --out: delta,"
                " layermem with --f/--g; gap, auc with --encoder), --unit-scores (score units"
                " --out: unitmem, unitmem_frac), --g, or rank by rgn"
            )
    return made


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune the chosen layers by each rule, k and seed; one comparison table."""
    from memprune.data import load_dataset
    from memprune.probe import linear_probe
    from memprune.report import plot_finetune
    from memprune.tuning import compare_finetuning, ranking_values

    _positive(args, "pairs", "k", "epochs", "batch_size")
    if not args.lr > 0:
        from memprune.errors import ConfigError

        raise ConfigError(f"--lr must be > 0, got {args.lr}")
    _check_out(args)
    encoder = _encoder_arg(args.f, args)
    train = load_dataset(args.data, "train", root=args.root, img_size=_img_size(args))
    test = load_dataset(args.data, "test", root=args.root, img_size=_img_size(args))
    rankings = _finetune_rankings(args, encoder, train)
    augment = _augment(args.augment, "crop_flip")
    budget = dict(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, augment=augment)

    def baseline(model, seed: int) -> float:
        return linear_probe(model, train, test, seed=seed).accuracy

    rows, runs = compare_finetuning(encoder, rankings, train, test, args.k, args.strategy,
                                    args.seeds, baseline=baseline,
                                    log=lambda m: print(m, flush=True), **budget)  # fmt: skip
    values = {by: dict(zip(r.layers, ranking_values(r, by)[1].tolist()))
              for by, r in rankings.items()}  # fmt: skip
    report = {
        "f": args.f, "data": args.data, "by": list(rankings), "seeds": args.seeds, **budget,
        "layer_values": values, "table": rows, "runs": runs,
    }  # fmt: skip
    title = f"fine-tuning {args.f} on {args.data} ({args.epochs} epochs, lr {args.lr:g})"
    out = _open_out(args)
    plot_finetune(rows, out / "comparison.png", title)
    _write_comparison(out, rows, report, "comparison.png")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run a YAML recipe end to end into a run directory and print the headline findings."""
    from memprune.recipes import headlines, load_recipe, read_metrics, run_recipe

    recipe = load_recipe(args.recipe, args.set or [])
    out = Path(args.out or Path("runs") / recipe.name)
    run = run_recipe(recipe, out, resume=args.resume, force=args.force,
                     log=lambda m: print(m, flush=True))  # fmt: skip
    if not is_main():  # under a launcher the main process reports
        return 0
    print("\nheadline findings:")
    for line in headlines(read_metrics(run)):
        print(f"- {line}")
    print(f"\nreport: {run / 'report.md'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Re-render ``report.md`` of a run directory."""
    from memprune.recipes import render_report, unfinished_stages

    path = render_report(args.run_dir)
    missing = unfinished_stages(args.run_dir)
    if missing:
        print(f"warning: the run is incomplete (unfinished: {', '.join(missing)}); the report"
              " says so. Finish it with `memprune run RECIPE --out RUN --resume`.")  # fmt: skip
    print(f"wrote {path}")
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to every option's help, except where the help already says it or
    there is no default to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every verb's ``--help`` lists its options with their defaults; a bad argument is one
    line naming it and pointing to ``--help``, with exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------- option groups


def _add_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")


def _add_run(p, seed_help: str, chunk: int | None = 32, workers: bool = True) -> None:
    """--seed, --device and (how a pass runs, never what it gives) --chunk-size, --workers."""
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA if any)")
    if chunk is not None:
        p.add_argument("--chunk-size", type=int, default=chunk,
                       help="points per forward pass (never changes a result)")  # fmt: skip
        p.add_argument("--precision", default="auto", choices=_registry("engine", "PRECISIONS"),
                       help="what the encoder computes in: auto = bf16 on a CUDA device that"
                       " supports it, else fp32 (statistics stay float32)")  # fmt: skip
    if workers:
        p.add_argument("--workers", type=int, default=None,
                       help="DataLoader workers (default: 0 on CPU, several per GPU)")  # fmt: skip


def _add_augment(p, default: str, what: str) -> None:
    presets = ", ".join(_registry("data", "AUGMENTS"))
    p.add_argument("--augment", nargs="+", default=[default], metavar="PRESET|KEY=VALUE",
                   help=f"{what}: a preset ({presets}) and/or its parameters, e.g."
                   f" --augment {default} scale=[0.3,1.0]")  # fmt: skip


def _add_weight_files(p, *flags: str) -> None:
    """Encoders given as run directories or weight files (``--f``/``--g``, ``--a``/``--b``)."""
    p.add_argument("--model", default=None, help=f"timm name, when {'/'.join(flags)} are plain"
                   " weight files")  # fmt: skip
    p.add_argument("--img-size", type=int, default=None, help="input size for plain weight files")
    p.add_argument("--timm", nargs="+", default=None, metavar="KEY=VALUE", help="timm arguments")
    _add_checkpoint_options(p)


def _registry(module: str, name: str) -> tuple[str, ...]:
    """The names of an option registry: the CLI's ``choices`` come from the library."""
    import importlib

    return tuple(getattr(importlib.import_module(f"memprune.{module}"), name))


# ---------------------------------------------------------------- one builder per verb


def _build_sites(sub) -> None:
    p = sub.add_parser("sites", help="list an encoder's unit and layer sites")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--views", type=int, default=4, help="views per point")
    p.add_argument("--points", type=int, default=8, help="points in the batch pushed through")
    p.add_argument("--seed", type=int, default=0, help="view seed")
    p.set_defaults(func=cmd_sites)


def _build_score_units(score, what: str, views: int, augment: str, helptext: str) -> None:
    p = score.add_parser(what, help=helptext)
    _add_model_args(p)
    _add_data_args(p)
    _add_out(p)
    p.add_argument("--views", type=int, default=views, help="views per point")
    _add_augment(p, augment, "view augmentation")
    p.add_argument("--sites", nargs="+", default=None, help="site name patterns (default: all)")
    p.add_argument("--rest", default="mean", choices=_registry("stats", "RESTS"),
                   help="mu_rest statistic")  # fmt: skip
    p.add_argument("--signed", default="abs", choices=_registry("hooks", "SIGNED"),
                   help="signed-activation rule")  # fmt: skip
    p.add_argument("--max-points", type=int, default=None,
                   help="score a seeded subset of this many points")  # fmt: skip
    _add_run(p, "view and subset seed")
    p.set_defaults(func=cmd_score_units)


def _build_score_layers(score) -> None:
    p = score.add_parser("layers", help="LayerMem / ΔLayerMem of an encoder pair, or the member"
                         " gap of one encoder")  # fmt: skip
    p.add_argument("--f", default=None,
                   help="encoder trained WITH the candidates: run dir or weights")  # fmt: skip
    p.add_argument("--g", default=None, help="encoder trained WITHOUT them: run dir or weights")
    p.add_argument("--encoder", default=None, help="one encoder, no reference: the member gap of"
                   " --members against --nonmembers (any checkpoint layout)")  # fmt: skip
    p.add_argument(
        "--members",
        default=None,
        metavar="SPLIT[:FILE[:PART]]",
        help="points --encoder trained on, e.g. train:runs/x/splits.json:candidate",
    )
    p.add_argument(
        "--nonmembers",
        default=None,
        metavar="SPLIT[:FILE[:PART]]",
        help="points it never saw, e.g. test or train:runs/x/splits.json:extra",
    )
    _add_weight_files(p, "--f", "--g", "--encoder")
    _add_data_args(p)
    p.add_argument("--splits", default=None, help="splits.json (default: beside --f, if present)")
    p.add_argument("--part", default="candidate", choices=_registry("data", "PARTS"),
                   help="which points of splits.json to score")  # fmt: skip
    p.add_argument("--n-points", type=int, default=None, help="score a seeded subset of this many")
    p.add_argument("--pairs", type=int, default=10, help="view pairs per point")
    p.add_argument("--layers", nargs="+", default=None, help="layer-site patterns (default: all)")
    p.add_argument("--representation", default="flatten",
                   choices=_registry("hooks", "REPRESENTATIONS"),
                   help="layer output as: whole, spatial/token mean, class token")  # fmt: skip
    p.add_argument("--pair", default="views", choices=_registry("scores", "PAIRS"),
                   help="two views per pair (paper) or the clean image and one view")  # fmt: skip
    p.add_argument("--top-k", type=int, default=50, help="size of the top / least sets")
    _add_augment(p, "simclr", "view augmentation")
    _add_out(p)
    _add_run(p, "view seed")
    p.set_defaults(func=cmd_score_layers)


def _build_score_cka(score) -> None:
    p = score.add_parser("cka", help="CKA between layers (within --a, or --a vs --b)")
    p.add_argument("--a", required=True, help="encoder: run dir or weights")
    p.add_argument("--b", default=None, help="second encoder (default: --a with itself)")
    _add_weight_files(p, "--a", "--b")
    _add_data_args(p)
    p.add_argument("--layers-a", nargs="+", default=None, help="layer-site patterns of --a")
    p.add_argument("--layers-b", nargs="+", default=None, help="layer-site patterns of --b")
    p.add_argument("--representation", default="flatten",
                   choices=_registry("hooks", "REPRESENTATIONS"),
                   help="layer output as: whole, spatial/token mean, class token")  # fmt: skip
    p.add_argument("--minibatch", type=int, default=256,
                   help="points per HSIC estimate (>= 4; changes the estimate)")  # fmt: skip
    p.add_argument("--no-invariance", action="store_true", help="skip the two-view CKA")
    _add_augment(p, "simclr", "views of the invariance")
    _add_out(p)
    _add_run(p, "view seed", chunk=None, workers=False)
    p.set_defaults(func=cmd_score_cka)


def _build_score(sub) -> None:
    score = sub.add_parser("score", help="compute memorization scores").add_subparsers(
        dest="what", required=True, metavar="SCORE", parser_class=_Parser
    )
    _build_score_units(
        score, "units", 10, "simclr", "UnitMem of every unit (per-point selectivity)"
    )
    _build_score_units(score, "classes", 1, "none", "ClassMem of every unit (class selectivity)")
    _build_score_layers(score)
    _build_score_cka(score)


def _build_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="SimCLR-train an encoder or the pair f / g")
    p.add_argument("--model", default=DEFAULT_MODEL, help="timm model name")
    p.add_argument("--img-size", type=int, default=None, help="input size (ViTs)")
    p.add_argument("--timm", nargs="+", default=None, metavar="KEY=VALUE", help="timm arguments")
    _add_data_args(p)
    p.add_argument("--out", required=True, help="run directory (f/, g/, splits.json for --pair)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.add_argument("--pair", action="store_true",
                   help="train f (shared+candidate) and g (shared+extra)")  # fmt: skip
    p.add_argument("--shared", default="0.5", help="count (100) or fraction (0.5)")
    p.add_argument("--candidate", default="0.1", help="count or fraction")
    p.add_argument("--extra", default="0.1", help="count or fraction")
    p.add_argument("--test", default="0", help="count or fraction held out from both")
    p.add_argument("--supervised", action="store_true", help="cross-entropy training instead")
    p.add_argument("--random-labels", action="store_true", help="supervised with random labels")
    p.add_argument("--epochs", type=int, default=20, help="training epochs")
    p.add_argument("--batch-size", type=int, default=128, help="points per batch, per process")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (cosine schedule)")
    p.add_argument("--temperature", type=float, default=0.5, help="NT-Xent temperature")
    p.add_argument("--proj-dim", type=int, default=128, help="projection head output width")
    p.add_argument("--mixed-precision", default="auto",
                   choices=_registry("train", "MIXED_PRECISION"),
                   help="accelerate's mixed precision; auto = bf16 on a CUDA device that"
                   " supports it, else none")  # fmt: skip
    p.add_argument("--keep-checkpoints", action="store_true", help="keep every epoch's encoder")
    p.add_argument("--augment", nargs="+", default=None, metavar="PRESET|KEY=VALUE",
                   help="training views (default: simclr; crop_flip with --supervised), e.g."
                   " --augment scale=[0.3,1.0]")  # fmt: skip
    _add_run(p, "split, init, order and view seed", chunk=None)
    p.set_defaults(func=cmd_pretrain)


def _build_probe(sub) -> None:
    p = sub.add_parser("probe", help="linear-probe and kNN accuracy of frozen encoders")
    _add_model_args(p, several=True)
    p.add_argument("--data", default=DEFAULT_DATA, help="data set with train and test splits")
    p.add_argument("--root", default=None, help="folder of a torchvision data set's files")
    p.add_argument("--backend", default="auto", choices=_registry("probe", "BACKENDS"),
                   help="linear-probe fit (auto: sklearn on CPU, torch on a GPU)")  # fmt: skip
    p.add_argument("--knn", action="store_true", help="also the weighted kNN probe")
    p.add_argument("--cache-dir", default=None, help="cache extracted features here")
    p.add_argument("--store", default=None, metavar="DIR",
                   help="data too large for memory: features memory-mapped on disk in DIR,"
                   " probes read in chunks of rows (not with --cache-dir)")  # fmt: skip
    p.add_argument("--transform", default="encoder", choices=("encoder", "resize"),
                   help="torchvision / folder data: the (first) encoder's eval preprocessing"
                   " from its timm data config, or a resize to --img-size")  # fmt: skip
    _add_out(p)
    _add_run(p, "validation-split seed", chunk=256, workers=False)
    p.set_defaults(func=cmd_probe)


def _build_prune(sub) -> None:
    p = sub.add_parser(
        "prune", help="prune units by UnitMem / random / magnitude and compare probe accuracy"
    )
    _add_model_args(p)
    p.add_argument("--data", default=DEFAULT_DATA, help="data set with train and test splits")
    p.add_argument("--root", default=None, help="folder of a torchvision data set's files")
    p.add_argument("--scores", default=None, help="UnitMem of this encoder (score units --out)")
    p.add_argument("--ratio", "--ratios", dest="ratio", type=float, nargs="+", default=[0.2, 0.5],
                   help="fractions of units removed")  # fmt: skip
    strategies = _registry("pruning", "STRATEGIES")
    default = list(_registry("pruning", "DEFAULT_STRATEGIES"))
    p.add_argument("--strategy", nargs="+", default=default, choices=strategies,
                   help="which units go first")  # fmt: skip
    p.add_argument("--scope", default="layer", choices=_registry("pruning", "SCOPES"),
                   help="the ratio per layer, or one global ranking")  # fmt: skip
    p.add_argument("--max-layer-ratio", type=float, default=None, help="cap per layer (global)")
    p.add_argument("--heads", action="store_true", help="also prune ViT attention heads")
    p.add_argument("--prune-output-width", action="store_true", help="prune the feature width too")
    p.add_argument(
        "--iterative-steps",
        type=int,
        nargs="+",
        default=[1],
        help="schedules: prune in this many steps (1: one shot; several compared)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds of random pruning and recovery (default: --seed)",
    )
    p.add_argument(
        "--recover",
        default=None,
        choices=_registry("pruning", "RECOVERY"),
        help="recover every pruned encoder: distill from the unpruned one, supervised"
        " on the labels, or simclr",
    )
    p.add_argument("--recover-epochs", type=int, default=3, help="recovery epochs")
    p.add_argument("--recover-steps", type=int, default=None, help="recovery steps (not epochs)")
    p.add_argument("--recover-lr", type=float, default=1e-3, help="recovery learning rate")
    p.add_argument(
        "--recover-augment",
        nargs="+",
        default=None,
        metavar="PRESET|KEY=VALUE",
        help="recovery views (default: the method's)",
    )
    p.add_argument(
        "--export",
        action="store_true",
        help="also write each pruned encoder as a torch.export program (encoder.pt2)",
    )
    p.add_argument("--onnx", action="store_true", help="with --export: also ONNX (needs onnx)")
    p.add_argument("--views", type=int, default=10, help="views per point for UnitMem")
    p.add_argument("--max-points", type=int, default=None, help="score a seeded subset")
    p.add_argument("--latency-batch", type=int, default=64, help="batch for latency (0: skip)")
    p.add_argument("--backend", default="auto", choices=_registry("probe", "BACKENDS"),
                   help="linear-probe fit (auto: sklearn on CPU, torch on a GPU)")  # fmt: skip
    _add_out(p)
    _add_run(p, "view, random-strategy and probe seed", workers=False)
    p.set_defaults(func=cmd_prune)


def _build_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune the top layers by each ranking against last-k, first-k,"
        " random-k, all and the linear probe",
    )
    p.add_argument("--f", required=True, help="the pretrained encoder: run dir or weights")
    p.add_argument("--g", default=None, help="reference encoder, to compute LayerMem")
    p.add_argument("--layer-scores", default=None, help="LayerMem or member gap of f (score"
                   " layers --out)")  # fmt: skip
    p.add_argument("--unit-scores", default=None, help="UnitMem of f (score units --out), for"
                   " the UnitMem profile")  # fmt: skip
    p.add_argument("--score-data", default=DEFAULT_DATA, help="pretraining data (with --g)")
    p.add_argument("--pairs", type=int, default=10, help="view pairs per point (with --g)")
    _add_weight_files(p, "--f", "--g")
    p.add_argument("--data", default="digits-shift", help="downstream data set")
    p.add_argument("--root", default=None, help="folder of a torchvision data set's files")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2], help="layers to fine-tune")
    strategies = _registry("tuning", "STRATEGIES")
    p.add_argument("--strategy", nargs="+", default=["top", "last", "random", "all"],
                   choices=strategies, help="layer choices compared at each k")  # fmt: skip
    p.add_argument("--by", nargs="+", default=None, choices=_registry("tuning", "BY"),
                   help="rankings `top` uses, one row each (default: every one the given scores"
                   " offer, and rgn)")  # fmt: skip
    p.add_argument("--epochs", type=int, default=20, help="epochs per run (as the recipes)")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (as the recipes)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (as the recipes)")
    _add_augment(p, "crop_flip", "training views (none: the plain images)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per seed")
    _add_out(p)
    p.set_defaults(func=cmd_finetune)


def _build_run(sub) -> None:
    p = sub.add_parser("run", help="run a YAML recipe: data -> scores -> actions -> report")
    p.add_argument("recipe", help="recipe file (see recipes/)")
    p.add_argument("--set", nargs="+", action="extend", default=None, metavar="KEY=VALUE",
                   help="override recipe keys, e.g. actions.prune.ratios=[0.5]")  # fmt: skip
    p.add_argument("--out", default=None, help="run directory (default: runs/NAME)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run")
    p.add_argument("--force", action="store_true", help="start an existing run over")
    p.set_defaults(func=cmd_run)


def _build_report(sub) -> None:
    p = sub.add_parser("report", help="re-render report.md of a run directory")
    p.add_argument("run_dir", help="a directory written by memprune run")
    p.set_defaults(func=cmd_report)


#: Verb -> the builder of its options (each verb imports only what its choices need).
VERBS = {
    "sites": _build_sites, "score": _build_score, "pretrain": _build_pretrain,
    "probe": _build_probe, "prune": _build_prune, "finetune": _build_finetune,
    "run": _build_run, "report": _build_report,
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="memprune", description="Localize memorization in vision encoders and act on it."
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    for build in VERBS.values():
        build(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a bad argument (2, already printed)
        return int(exit_.code or 0)
    try:
        return args.func(args)
    except MemPruneError as err:
        print(f"memprune {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # under torchrun: exit cleanly
            dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
