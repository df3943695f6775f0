"""The ``memprune`` command. Each verb that computes maps its flags onto the recipe schema and
runs the same stages ``memprune run`` runs (:func:`memprune.recipes.run_verb`): one set of
defaults (the schema's) and one set of output files, whichever door a user comes in by. The
verb's own stage writes into ``--out``; a stage it needs first, into ``--out/<stage>/``.

Errors a user can fix (:class:`MemPruneError`) print one line and exit with status 2; a
recipe key in an error is named by its flag.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from memprune._dist import is_main
from memprune.errors import ConfigError, MemPruneError

#: The prefix of the destinations of options that set a recipe key.
SET = "set:"


# ---------------------------------------------------------------- flags onto recipe keys


def _default(key: str) -> str:
    from memprune.recipes import schema_default

    value = schema_default(key)
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _opt(p, *flags: str, key: str, help: str, **kw) -> None:
    """An option that sets recipe ``key`` (shown with the schema's default; unset: that
    default)."""
    if kw.get("action") in ("store_true", "store_false"):
        kw["action"], kw["const"] = "store_const", kw["action"] == "store_true"
    p.add_argument(*flags, dest=SET + key, default=None, help=f"{help} [{key}, default:"
                   f" {_default(key.replace('TRAIN', 'pretrain').replace('LAYERS', 'layermem'))}]",
                   **kw)  # fmt: skip


def _recipe_keys(args: argparse.Namespace, **names: str) -> dict:
    """The recipe mapping the set options give (``names`` fill placeholders in keys)."""
    out: dict = {}
    for dest, value in vars(args).items():
        if not dest.startswith(SET) or value is None:
            continue
        key = dest[len(SET) :]
        for placeholder, name in names.items():
            key = key.replace(placeholder, name)
        _put(out, key, value)
    return out


def _given(args: argparse.Namespace, key: str):
    """The value of the option that sets recipe ``key`` (None: not given)."""
    return getattr(args, SET + key, None)


def _put(tree: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def _merge(base: dict, more: dict) -> dict:
    out = dict(base)
    for k, v in more.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _key_values(pairs: list[str] | None, flag: str = "--timm") -> dict:
    """``KEY=VALUE`` strings (values parsed as YAML) into a mapping."""
    import yaml

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} takes KEY=VALUE (e.g. scale=[0.3,1.0]), got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def _augment(tokens: list[str]):
    """``--augment PRESET KEY=VALUE ...`` as a recipe's augmentation (a preset or a mapping)."""
    presets = [t for t in tokens if "=" not in t]
    if len(presets) > 1:
        raise ConfigError(f"--augment takes one preset name, got {presets}")
    params = _key_values([t for t in tokens if "=" in t], "--augment")
    if not params:
        return presets[0] if presets else None
    return {**({"preset": presets[0]} if presets else {}), **params}


def _fraction(text: str) -> int | float:
    """``"0.5"`` is a fraction, ``"100"`` a count."""
    return float(text) if "." in text else int(text)


#: Stages a verb does not run are switched off in its recipe.
OFF = {
    "encoder": {"pretrain": None, "supervised": {"enabled": False}},
    "scores": {s: {"enabled": False}
               for s in ("unitmem", "classmem", "sslmem", "layermem", "membergap", "cka")},
    "actions": {"prune": {"enabled": False}, "finetune": {"enabled": False}},
    "evaluation": {"linear": False, "knn": False},
}  # fmt: skip


def _encoder(f: str | None, args, g: str | None = None) -> dict:
    """``encoder`` of a recipe from the encoder flags: a checkpoint (or random init); a run
    or pruned directory records its model and size, so the defaults must not contradict it."""
    recorded = f is not None and (Path(f).is_dir() or str(f).endswith(".json"))
    out = {"checkpoint": f, "reference": g, "random_init": f is None,
           "timm": _key_values(getattr(args, "timm", None)),
           "trust_pickle": bool(getattr(args, "trust_pickle", False)),
           "entry": getattr(args, "entry", None), "strict": getattr(args, "strict", True)}  # fmt: skip
    for key in ("model", "img_size"):
        given = getattr(args, key, None)
        if given is not None or recorded:
            out[key] = given
    return out


def _recipe(args, verb: str, enable: dict, augment: str | None = None, **names: str):
    """The validated recipe of a verb: every stage off but those ``enable`` turns on, then
    the flags (``--augment`` sets ``augment``); a bad value is named by its flag."""
    from memprune.recipes import RecipeError, validate

    data = _merge(_merge(OFF, enable), _recipe_keys(args, **names))
    data["name"] = verb
    if getattr(args, "augment", None):
        _put(data, augment, _augment(args.augment))
    if getattr(args, "recover_augment", None) and args.recover:
        _put(data, "actions.prune.recover.augment", _augment(args.recover_augment))
    try:
        return validate(data)
    except RecipeError as err:
        raise ConfigError(_flagged(str(err), args, names)) from None


def _flagged(message: str, args, names: dict) -> str:
    """A recipe error with its key replaced by the flag that set it."""
    parser = getattr(args, "_parser", None)
    for action in parser._actions if parser else ():
        if not action.dest.startswith(SET):
            continue
        key = action.dest[len(SET) :]
        for placeholder, name in names.items():
            key = key.replace(placeholder, name)
        if message.startswith(key + ":") or message.startswith(key + "["):
            return action.option_strings[0] + message[len(key) :]
    return message


def _run(args, recipe, main: str) -> int:
    """Run the verb's stages into --out and print its table."""
    from memprune.recipes import STAGES, run_verb

    command = {"verb": " ".join(v for v in (args.command, getattr(args, "what", None)) if v),
               "recipe": recipe.to_dict()}  # fmt: skip
    out = run_verb(recipe, args.out, main, command, force=args.force,
                   log=lambda m: print(m, flush=True))  # fmt: skip
    if not is_main():
        return 0
    printed = STAGES[main].printed
    if printed and (out / printed).is_file():
        print("\n" + (out / printed).read_text().rstrip())
    files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    print(f"\nwrote {', '.join(files)} to {out}")
    return 0


# ---------------------------------------------------------------- the verbs


def cmd_sites(args: argparse.Namespace) -> int:
    """List the unit and layer sites and push one batch of views through them."""
    import torch

    from memprune._table import format_table
    from memprune.data import MultiView
    from memprune.encoders import normalization
    from memprune.hooks import capture
    from memprune.recipes import Context
    from memprune.sites import find_sites

    recipe = _recipe(args, "sites", {"encoder": _encoder(args.checkpoint, args)})
    ctx = Context(recipe, Path("."))
    model, data = ctx.encoder("f"), ctx.dataset(recipe.data.name, args.split)
    sites = find_sites(model, "units") + find_sites(model, "layers")
    views = MultiView(data, n_views=args.views, seed=recipe.seed)
    batch = torch.stack([views[i][0] for i in range(min(args.points, len(views)))])
    b, k = batch.shape[:2]  # [B, K, 3, H, W]
    mean, std = (torch.tensor(v)[:, None, None] for v in normalization(model))
    x = (batch.flatten(0, 1) - mean) / std
    with torch.inference_mode(), capture(model, sites) as acts:
        out = model(x)
    rows = [(s.name, s.kind, s.role, s.n_units, "x".join(map(str, acts.shapes[s.name])),
             tuple(acts[s.name].shape)) for s in sites]  # fmt: skip
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{ctx.model_name()}: {n_params / 1e6:.2f}M parameters, input {tuple(x.shape[1:])},"
          f" output dim {out.shape[1]}")  # fmt: skip
    print(f"{data.name} ({args.split}): {len(data)} images; one batch of {b} points x {k} views\n")
    print(format_table(["site", "kind", "role", "units", "output shape", "captured"], rows))
    n_units = sum(s.n_units for s in sites if s.kind == "units")
    print(f"\n{sum(s.kind == 'units' for s in sites)} unit sites ({n_units} units),"
          f" {sum(s.kind == 'layers' for s in sites)} layer sites")  # fmt: skip
    return 0


def cmd_score_units(args: argparse.Namespace) -> int:
    """UnitMem (``score units``) or ClassMem (``score classes``) into ``--out``."""
    stage = "unitmem" if args.what == "units" else "classmem"
    enable = {"encoder": _encoder(args.checkpoint, args), "scores": {stage: {"enabled": True}}}
    recipe = _recipe(args, f"score {args.what}", enable, f"scores.{stage}.augment")
    return _run(args, recipe, stage)


def cmd_score_layers(args: argparse.Namespace) -> int:
    """LayerMem / ΔLayerMem of the pair --f, --g; or (--encoder) the member gap of one
    encoder, its --members against --nonmembers."""
    if args.encoder and (args.f or args.g) or not (args.encoder or (args.f and args.g)):
        raise ConfigError(
            "score layers takes either --f and --g (LayerMem), or --encoder with --members and"
            " --nonmembers (member gap, no reference encoder)"
        )
    enable: dict = {}
    if args.encoder:
        if not (args.members and args.nonmembers):
            raise ConfigError("score layers --encoder needs --members and --nonmembers")
        stage, enable["encoder"] = "membergap", _encoder(args.encoder, args)
        enable["data"] = {k: _points(getattr(args, k), k) for k in ("members", "nonmembers")}
    else:
        stage, enable["encoder"] = "layermem", _encoder(args.f, args, args.g)
        splits = Path(args.splits or Path(args.f).parent / "splits.json")
        if args.splits and not splits.is_file():
            raise ConfigError(f"--splits {args.splits} does not exist")
        if splits.is_file():
            enable["scores"] = {"layermem": {"points": {"indices": str(splits), "part": args.part}}}
    enable = _merge(enable, {"scores": {stage: {"enabled": True}}})
    return _run(args, _recipe(args, "score layers", enable, "scores.augment", LAYERS=stage), stage)


def _points(spec: str, flag: str) -> dict:
    """``SPLIT[:FILE[:PART]]``: a split, restricted to the indices of FILE (a JSON list, or a
    memprune splits.json and which PART of it)."""
    split, _, rest = spec.partition(":")
    path, _, part = rest.rpartition(":") if rest.count(":") else (rest, "", "")
    if split not in ("train", "test"):
        raise ConfigError(f"--{flag} {spec!r}: write SPLIT[:FILE[:PART]] with SPLIT train or test")
    if path and part:
        from memprune.data import read_indices

        try:
            read_indices(path, part)
        except ConfigError as err:
            raise ConfigError(f"--{flag} {spec!r}: {err}") from None
    return {"split": split, "indices": path or None, "part": part or None}


def cmd_score_cka(args: argparse.Namespace) -> int:
    """CKA between the layers of --a and --b (or within --a)."""
    enable = {"encoder": _encoder(args.a, args, args.b),
              "scores": {"cka": {"enabled": True, "against": "g" if args.b else "self"}}}  # fmt: skip
    return _run(args, _recipe(args, "score cka", enable, "scores.cka.augment"), "cka")


def cmd_pretrain(args: argparse.Namespace) -> int:
    """SimCLR training of the pair f / g (or of one encoder), or a supervised encoder."""
    from memprune.report import read_marker

    if args.resume and (read_marker(args.out) or {}).get("command", {}).get("verb") != "pretrain":
        raise ConfigError(f"--resume: {args.out} holds no run of `memprune pretrain` to continue;"
                          " drop --resume to start a new run there")  # fmt: skip
    stage = "supervised" if args.supervised else "pretrain"
    encoder = _encoder(None, args)  # supervised: f is not used
    if args.supervised:
        encoder["supervised"] = {"enabled": True, "points": "all"}
    else:
        encoder.update(pretrain={}, random_init=False)
    sizes = {k: _fraction(getattr(args, k)) for k in ("shared", "candidate", "extra", "test")
             if getattr(args, k) is not None}  # fmt: skip
    recipe = _recipe(args, "pretrain", {"encoder": encoder, "data": sizes},
                     f"encoder.{stage}.augment", TRAIN=stage)  # fmt: skip
    return _run(args, recipe, stage)


def cmd_probe(args: argparse.Namespace) -> int:
    """Linear-probe (and kNN) accuracy of frozen encoders on train -> test, one table."""
    paths = args.checkpoint or []
    enable = {"encoder": _encoder(paths[0] if paths else None, args),
              "evaluation": {"linear": True, "knn": True, "encoders": paths or None}}  # fmt: skip
    return _run(args, _recipe(args, "probe", enable), "evaluate")


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune by each strategy and ratio (UnitMem first, into --out/unitmem/, unless --scores
    names saved scores); probe every pruned encoder; one comparison table."""
    from memprune.pruning import PRUNING_STRATEGIES
    from memprune.recipes import schema_default

    strategies = _given(args, "actions.prune.strategies") or schema_default(
        "actions.prune.strategies")
    by_score = any(PRUNING_STRATEGIES[s].needs == "scores" for s in strategies)
    recover = {"method": args.recover} if args.recover else None
    if not args.recover and any(getattr(args, SET + f"actions.prune.recover.{k}") is not None
                                for k in ("epochs", "steps", "lr")):  # fmt: skip
        raise ConfigError("--recover-epochs, --recover-steps and --recover-lr set --recover")
    enable = {"encoder": _encoder(args.checkpoint, args),
              "actions": {"prune": {"enabled": True, "recover": recover}},
              "scores": {"unitmem": {"enabled": by_score and not _given(args, "actions.prune.scores")}}}
    return _run(args, _recipe(args, "prune", enable), "prune")


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune the layers each rule chooses, at each k and seed; one comparison table
    (LayerMem of --f against --g first, into --out/layermem/, when --g is given)."""
    scores = [s for s in (args.layer_scores, args.unit_scores) if s]
    layermem: dict = {"enabled": bool(args.g)}
    if args.g and (Path(args.f).parent / "splits.json").is_file():  # f's candidates
        layermem["points"] = {"indices": str(Path(args.f).parent / "splits.json"),
                              "part": "candidate"}  # fmt: skip
    enable = {"encoder": _encoder(args.f, args, args.g), "scores": {"layermem": layermem},
              "actions": {"finetune": {"enabled": True, "scores": scores}}}  # fmt: skip
    return _run(args, _recipe(args, "finetune", enable, "actions.finetune.augment"), "finetune")


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


# ---------------------------------------------------------------- the parser


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: X)" once, where there is one to show
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every option's help shows its default; a bad argument is one line naming it and
    pointing to ``--help``, with exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _verb(sub, name: str, func, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    p.set_defaults(func=func, _verb_parser=p)
    return p


def _registry(module: str, name: str) -> tuple[str, ...]:
    """The names of an option registry: the CLI's ``choices`` come from the library."""
    import importlib

    return tuple(getattr(importlib.import_module(f"memprune.{module}"), name))


def _model_opts(p, several: bool = False, flags: tuple[str, ...] = ("--checkpoint",)) -> None:
    if flags == ("--checkpoint",):
        p.add_argument("--checkpoint", default=None, nargs="+" if several else None,
                       help="weights: .safetensors, a torch state dict, a memprune run or a"
                       " pruned directory; none: timm's random init, seeded by --seed"
                       f"{' (several: one table)' if several else ''}")  # fmt: skip
    p.add_argument("--model", default=None, help="timm model name (default: resnet18, or the"
                   " one a memprune run or pruned directory records)")  # fmt: skip
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: 32,"
                   " or the one a checkpoint directory records)")  # fmt: skip
    p.add_argument("--timm", nargs="+", default=None, metavar="KEY=VALUE", help="timm arguments")
    p.add_argument("--trust-pickle", action="store_true", help="allow pickled checkpoints (unsafe)")
    p.add_argument("--entry", default=None, help="which model of a checkpoint holding several"
                   " (DINO: teacher, the default, or student)")  # fmt: skip
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="load the tensors that fit a checkpoint and warn about the rest")


def _data_opts(p, split: str | None = None) -> None:
    _opt(p, "--data", key="data.name", help="data set name or image folder")
    _opt(p, "--root", key="data.root", help="folder of a torchvision data set's files")
    if split:
        _opt(p, "--split", key=split, choices=("train", "test"), help="which split")


def _run_opts(p, chunk: str | None = "scores.chunk_size", out: bool = True) -> None:
    _opt(p, "--seed", key="seed", type=int, help="seed of views, subsets, init and probes")
    _opt(p, "--device", key="device", help="cpu, cuda, cuda:1 (null: CUDA if any)")
    _opt(p, "--precision", key="precision", choices=_registry("engine", "PRECISIONS"),
         help="what encoders compute in: auto = bf16 on a CUDA device that supports it")
    _opt(p, "--workers", key="workers", type=int, help="DataLoader workers (null: 0 on CPU)")
    if chunk:
        _opt(p, "--chunk-size", key=chunk, type=int, help="points per forward pass (never"
             " changes a result)")  # fmt: skip
    if out:
        p.add_argument("--out", required=True, help="output directory (must be new or empty)")
        p.add_argument("--force", action="store_true", help="write into a non-empty --out")


def _augment_opt(p, key: str, what: str) -> None:
    presets = ", ".join(_registry("data", "AUGMENTS"))
    p.add_argument("--augment", nargs="+", default=None, metavar="PRESET|KEY=VALUE",
                   help=f"{what}: a preset ({presets}) and/or its parameters, e.g. --augment"
                   f" crop_flip scale=[0.6,1.0] [{key}, default: {_default(key)}]")  # fmt: skip


def _build_score(sub) -> None:
    score = sub.add_parser("score", help="compute memorization scores").add_subparsers(
        dest="what", required=True, metavar="SCORE", parser_class=_Parser)
    for what, stage, helptext in (("units", "unitmem", "UnitMem of every unit"),
                                  ("classes", "classmem", "ClassMem of every unit")):  # fmt: skip
        p = _verb(score, what, cmd_score_units, helptext)
        _model_opts(p)
        _data_opts(p, "scores.unitmem.split")
        _opt(p, "--views", key=f"scores.{stage}.views", type=int, help="views per point")
        _augment_opt(p, f"scores.{stage}.augment", "view augmentation")
        _opt(p, "--sites", key="scores.unitmem.sites", nargs="+", help="site name patterns")
        _opt(p, "--rest", key="scores.unitmem.rest", choices=_registry("stats", "RESTS"),
             help="mu_rest statistic")
        _opt(p, "--signed", key="scores.unitmem.signed", choices=_registry("hooks", "SIGNED"),
             help="signed-activation rule")
        _opt(p, "--n-points", "--max-points", key="scores.unitmem.n_points", type=int,
             help="score a seeded subset of this many points")
        _run_opts(p)
    p = _verb(score, "layers", cmd_score_layers, "LayerMem / ΔLayerMem of an encoder pair, or"
              " the member gap of one encoder")  # fmt: skip
    p.add_argument("--f", default=None, help="encoder trained WITH the candidates")
    p.add_argument("--g", default=None, help="encoder trained WITHOUT them")
    p.add_argument("--encoder", default=None, help="one encoder, no reference: the member gap")
    for flag in ("--members", "--nonmembers"):
        p.add_argument(flag, default=None, metavar="SPLIT[:FILE[:PART]]", help="points"
                       f" --encoder {'trained on' if flag == '--members' else 'never saw'}, e.g."
                       " train:runs/x/splits.json:candidate")  # fmt: skip
    _model_opts(p, flags=())
    _data_opts(p)
    p.add_argument("--splits", default=None, help="splits.json (default: beside --f, if present)")
    p.add_argument("--part", default="candidate", choices=_registry("data", "PARTS"),
                   help="which points of splits.json to score")  # fmt: skip
    _opt(p, "--n-points", key="scores.LAYERS.n_points", type=int, help="a seeded subset")
    _opt(p, "--pairs", key="scores.LAYERS.pairs", type=int, help="view pairs per point")
    _opt(p, "--layers", key="scores.LAYERS.layers", nargs="+", help="layer-site patterns")
    _opt(p, "--representation", key="scores.LAYERS.representation",
         choices=_registry("hooks", "REPRESENTATIONS"), help="layer output as")
    _opt(p, "--pair", key="scores.LAYERS.pair", choices=_registry("scores", "PAIRS"),
         help="two views per pair, or the clean image and one view")
    _opt(p, "--top-k", key="scores.layermem.top_k", type=int, help="size of the top/least sets")
    _augment_opt(p, "scores.augment", "view augmentation")
    _run_opts(p)
    p = _verb(score, "cka", cmd_score_cka, "CKA between layers (within --a, or --a vs --b)")
    p.add_argument("--a", required=True, help="encoder: run dir or weights")
    p.add_argument("--b", default=None, help="second encoder (default: --a with itself)")
    _model_opts(p, flags=())
    _data_opts(p, "scores.cka.split")
    _opt(p, "--layers-a", key="scores.cka.layers_a", nargs="+", help="layer patterns of --a")
    _opt(p, "--layers-b", key="scores.cka.layers_b", nargs="+", help="layer patterns of --b")
    _opt(p, "--representation", key="scores.cka.representation",
         choices=_registry("hooks", "REPRESENTATIONS"), help="layer output as")
    _opt(p, "--minibatch", key="scores.cka.minibatch", type=int, help="points per HSIC estimate")
    _opt(p, "--invariance", key="scores.cka.invariance", action="store_true",
         help="also the CKA of each layer between two views")
    _augment_opt(p, "scores.cka.augment", "views of the invariance")
    _run_opts(p, chunk=None)


def _build_pretrain(sub) -> None:
    p = _verb(sub, "pretrain", cmd_pretrain, "SimCLR-train the pair f / g (or one encoder)")
    _model_opts(p, flags=())
    _data_opts(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    _opt(p, "--pair", key="encoder.pretrain.pair", action=argparse.BooleanOptionalAction,
         help="f (shared + candidate) and g (shared + extra), or one encoder on all points")
    for name in ("shared", "candidate", "extra", "test"):
        p.add_argument(f"--{name}", default=None, help=f"count (100) or fraction (0.5) [data."
                       f"{name}, default: {_default('data.' + name)}]")  # fmt: skip
    p.add_argument("--supervised", action="store_true", help="cross-entropy training instead")
    _opt(p, "--random-labels", key="encoder.supervised.random_labels", action="store_true",
         help="supervised with random labels")
    _opt(p, "--epochs", key="encoder.TRAIN.epochs", type=int, help="training epochs")
    _opt(p, "--batch-size", key="encoder.TRAIN.batch_size", type=int, help="points per batch")
    _opt(p, "--lr", key="encoder.TRAIN.lr", type=float, help="AdamW learning rate")
    _opt(p, "--temperature", key="encoder.pretrain.temperature", type=float, help="NT-Xent")
    _opt(p, "--proj-dim", key="encoder.pretrain.proj_dim", type=int, help="projection width")
    _opt(p, "--mixed-precision", key="encoder.TRAIN.mixed_precision",
         choices=_registry("train", "MIXED_PRECISION"), help="accelerate's mixed precision")
    _opt(p, "--keep-checkpoints", key="encoder.TRAIN.keep_checkpoints", action="store_true",
         help="keep every epoch's encoder")
    _augment_opt(p, "encoder.pretrain.augment", "training views")
    _run_opts(p, chunk=None)


def _build_probe(sub) -> None:
    p = _verb(sub, "probe", cmd_probe, "linear-probe and kNN accuracy of frozen encoders")
    _model_opts(p, several=True)
    _data_opts(p)
    _opt(p, "--backend", key="evaluation.backend", choices=_registry("probe", "BACKENDS"),
         help="linear-probe fit (auto: sklearn on CPU, torch on a GPU)")
    _opt(p, "--cs", key="evaluation.cs", type=float, nargs="+", help="C values the probe sweeps")
    _opt(p, "--knn", key="evaluation.knn", action=argparse.BooleanOptionalAction,
         help="the weighted kNN probe too")
    _opt(p, "--cache-dir", key="evaluation.cache_dir", help="cache extracted features here")
    _opt(p, "--store", key="evaluation.store", metavar="DIR",
         help="features memory-mapped on disk in DIR, probes read in chunks of rows")
    _opt(p, "--transform", key="data.transform", choices=("encoder", "resize"),
         help="torchvision / folder data: the first encoder's eval preprocessing, or a resize")
    _run_opts(p, chunk="evaluation.chunk_size")


def _build_prune(sub) -> None:
    p = _verb(sub, "prune", cmd_prune, "prune units by UnitMem / random / magnitude / ... and"
              " compare probe accuracy")  # fmt: skip
    _model_opts(p)
    _data_opts(p)
    a = "actions.prune."
    _opt(p, "--scores", key=a + "scores", help="saved UnitMem of this encoder (score units --out)")
    _opt(p, "--ratio", "--ratios", key=a + "ratios", type=float, nargs="+",
         help="fractions of units removed")
    _opt(p, "--strategy", key=a + "strategies", nargs="+",
         choices=_registry("pruning", "PRUNING_STRATEGIES"), help="which units go first")
    _opt(p, "--scope", key=a + "scope", choices=_registry("pruning", "SCOPES"),
         help="the ratio per layer, or one global ranking")
    _opt(p, "--max-layer-ratio", key=a + "max_layer_ratio", type=float, help="cap per layer")
    _opt(p, "--heads", key=a + "heads", action="store_true", help="also ViT attention heads")
    _opt(p, "--prune-output-width", key=a + "keep_output_width", action="store_false",
         help="prune the feature width too")
    _opt(p, "--steps", "--iterative-steps", key=a + "schedules", type=int, nargs="+",
         help="prune in this many steps (1: one shot; several compared)")
    _opt(p, "--seeds", key=a + "seeds", type=int, nargs="+", help="random pruning, recovery")
    p.add_argument("--recover", default=None, choices=_registry("pruning", "RECOVERY"),
                   help="recover every pruned encoder: distill from the unpruned one,"
                   " supervised on the labels, or simclr")  # fmt: skip
    _opt(p, "--recover-epochs", key=a + "recover.epochs", type=int, help="recovery epochs")
    _opt(p, "--recover-steps", key=a + "recover.steps", type=int, help="steps (not epochs)")
    _opt(p, "--recover-lr", key=a + "recover.lr", type=float, help="recovery learning rate")
    p.add_argument("--recover-augment", nargs="+", default=None, metavar="PRESET|KEY=VALUE",
                   help="recovery views (default: the method's)")
    _opt(p, "--export", key=a + "export", action="store_true", help="torch.export programs too")
    _opt(p, "--onnx", key=a + "onnx", action="store_true", help="with --export: ONNX too")
    _opt(p, "--views", key="scores.unitmem.views", type=int, help="views per point (UnitMem)")
    _opt(p, "--n-points", "--max-points", key="scores.unitmem.n_points", type=int,
         help="UnitMem of a seeded subset")
    _opt(p, "--latency-batch", key=a + "latency_batch", type=int, help="latency batch")
    _opt(p, "--backend", key="evaluation.backend", choices=_registry("probe", "BACKENDS"),
         help="linear-probe fit")
    _run_opts(p)


def _build_finetune(sub) -> None:
    p = _verb(sub, "finetune", cmd_finetune, "fine-tune the top layers by each ranking against"
              " last-k, first-k, random-k, all and the linear probe")  # fmt: skip
    p.add_argument("--f", required=True, help="the pretrained encoder: run dir or weights")
    p.add_argument("--g", default=None, help="reference encoder, to compute LayerMem")
    p.add_argument("--layer-scores", default=None, help="LayerMem or member gap of f")
    p.add_argument("--unit-scores", default=None, help="UnitMem of f, for its profile")
    _model_opts(p, flags=())
    _opt(p, "--score-data", key="data.name", help="pretraining data (with --g)")
    _opt(p, "--data", key="data.downstream", help="downstream data set")
    _opt(p, "--root", key="data.root", help="folder of a torchvision data set's files")
    _opt(p, "--pairs", key="scores.layermem.pairs", type=int, help="view pairs (with --g)")
    f = "actions.finetune."
    _opt(p, "--k", key=f + "k", type=int, nargs="+", help="layers to fine-tune")
    _opt(p, "--strategy", key=f + "strategies", nargs="+",
         choices=_registry("tuning", "LAYER_STRATEGIES"), help="layer choices compared")
    _opt(p, "--by", key=f + "by", nargs="+", choices=_registry("tuning", "BY"),
         help="rankings `top` uses (null: every one the scores offer, and rgn)")
    _opt(p, "--epochs", key=f + "epochs", type=int, help="epochs per run")
    _opt(p, "--lr", key=f + "lr", type=float, help="AdamW learning rate")
    _opt(p, "--batch-size", key=f + "batch_size", type=int, help="batch size")
    _opt(p, "--seeds", key=f + "seeds", type=int, nargs="+", help="one run per seed")
    _augment_opt(p, f + "augment", "training views")
    _run_opts(p, chunk=None)


def _build_misc(sub) -> None:
    p = _verb(sub, "sites", cmd_sites, "list an encoder's unit and layer sites")
    _model_opts(p)
    _data_opts(p)
    p.add_argument("--split", default="train", choices=("train", "test"), help="which split")
    p.add_argument("--views", type=int, default=4, help="views per point")
    p.add_argument("--points", type=int, default=8, help="points in the batch pushed through")
    _opt(p, "--seed", key="seed", type=int, help="view and init seed")
    p = _verb(sub, "run", cmd_run, "run a YAML recipe: data -> scores -> actions -> report")
    p.add_argument("recipe", help="recipe file (see recipes/)")
    p.add_argument("--set", nargs="+", action="extend", default=None, metavar="KEY=VALUE",
                   help="override recipe keys, e.g. actions.prune.ratios=[0.5]")  # fmt: skip
    p.add_argument("--out", default=None, help="run directory (default: runs/NAME)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run")
    p.add_argument("--force", action="store_true", help="start an existing run over")
    p = _verb(sub, "report", cmd_report, "re-render report.md of a run directory")
    p.add_argument("run_dir", help="a directory written by memprune run")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="memprune",
                     description="Localize memorization in vision encoders and act on it.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)  # fmt: skip
    for build in (_build_misc, _build_score, _build_pretrain, _build_probe, _build_prune,
                  _build_finetune):  # fmt: skip
        build(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a bad argument (2, already printed)
        return int(exit_.code or 0)
    args._parser = getattr(args, "_verb_parser", None)
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
