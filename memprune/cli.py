"""The ``memprune`` command. A verb that computes maps its flags onto recipe keys and runs the
stages ``memprune run`` runs (:func:`memprune.recipes.run_verb`): the schema's defaults, types
and output files, whichever door a user comes in by. The verb's own stage writes into
``--out``; a stage it needs first, into ``--out/<stage>/``.

Errors a user can fix (:class:`MemPruneError`) print one line and exit with status 2; a recipe
key in an error is named by the flag that set it.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path

from memprune._dist import is_main
from memprune.errors import ConfigError, MemPruneError

#: The prefix of the destinations of options that set a recipe key.
SET = "set:"
#: Placeholders in the keys of options shared by stages (the verb names the stage), and the
#: stage whose default the help shows.
HOLES = {"STAGE": "unitmem", "LAYERS": "layermem", "TRAIN": "pretrain"}

# ---------------------------------------------------------------- flags onto recipe keys


def _fill(key: str, names: dict) -> str:
    for hole, name in names.items():
        key = key.replace(hole, name)
    return key


def _encoder(f: str | None, args, g: str | None = None) -> dict:
    """``encoder`` of a recipe from the encoder flags: a checkpoint (or random init); a run
    or pruned directory records its model and size, so the defaults must not contradict it."""
    from memprune.recipes import parse_key_values

    recorded = f is not None and (Path(f).is_dir() or str(f).endswith(".json"))
    out = {"checkpoint": f, "reference": g, "random_init": f is None,
           "timm": parse_key_values(args.timm, "--timm"), "trust_pickle": bool(args.trust_pickle),
           "entry": args.entry, "strict": args.strict}  # fmt: skip
    for key in ("model", "img_size"):
        if getattr(args, key) is not None or recorded:
            out[key] = getattr(args, key)
    return out


def _recipe(args, enable: dict, **names: str):
    """The validated recipe of a verb: every stage off but those ``enable`` turns on, then
    the flags; a bad value is named by its flag."""
    from memprune.recipes import STAGES_OFF, RecipeError, merge, parse_augment, put_key, validate

    data = merge(merge(STAGES_OFF, enable), {"name": args.verb})
    for dest, value in vars(args).items():
        if dest.startswith(SET) and value is not None:
            put_key(data, _fill(dest[len(SET) :], names), value)
    if args.augment:
        put_key(data, _fill(VERBS[args.verb][3], names), parse_augment(args.augment))
    if getattr(args, "recover_augment", None) and args.recover:
        put_key(data, "actions.prune.recover.augment", parse_augment(args.recover_augment))
    args.names = names
    try:
        return validate(data)
    except RecipeError as err:
        raise ConfigError(_flagged(str(err), args)) from None


def _flagged(message: str, args) -> str:
    """``message`` with the recipe key it starts with replaced by its flag, where a flag
    sets that key."""
    for action in args.parser._actions:
        key = _fill(action.dest[len(SET) :], getattr(args, "names", {}))
        if action.dest.startswith(SET) and message.startswith((key + ":", key + "[")):
            return action.option_strings[0] + message[len(key) :]
    for key, flag in getattr(args, "flags", {}).items():  # keys a verb filled from a flag
        if message.startswith(key + ":"):
            return flag + message[len(key) :]
    for key, flag in ENCODER_FLAGS.items():  # the encoder flags every verb shares
        if (
            message.startswith(key + ":")
            and getattr(args, flag[2:].replace("-", "_"), None) is not None
        ):
            return flag + message[len(key) :]
    return message


#: recipe keys the encoder flags set (through :func:`_encoder`, not a key of their own)
ENCODER_FLAGS = {"encoder.img_size": "--img-size", "encoder.model": "--model"}


def _run(args, recipe, main: str) -> int:
    """Run the verb's stages into --out and print its table."""
    from memprune.recipes import STAGES, run_verb

    command = {"verb": args.verb, "recipe": recipe.to_dict()}
    try:
        out = run_verb(recipe, args.out, main, command, force=bool(args.force),
                       log=lambda m: print(m, flush=True))  # fmt: skip
    except ConfigError as err:  # a check that needs the data or the encoder
        raise type(err)(_flagged(str(err), args)) from None
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
    from memprune._table import format_table
    from memprune.hooks import describe_sites
    from memprune.recipes import Context

    recipe = _recipe(args, {"encoder": _encoder(args.checkpoint, args)})
    ctx, split = Context(recipe, Path(".")), args.split or "train"
    data = ctx.dataset(recipe.data.name, split)
    d = describe_sites(ctx.encoder("f"), data, args.views or 4, args.points or 8, recipe.seed)
    print(f"{ctx.model_name()}: {d['params'] / 1e6:.2f}M parameters, input {d['input']},"
          f" output dim {d['output']}")  # fmt: skip
    print(f"{data.name} ({split}): {len(data)} images; one batch of {d['points']} points x"
          f" {d['views']} views\n")  # fmt: skip
    print(format_table(["site", "kind", "role", "units", "output shape", "captured"], d["rows"]))
    units = [r[3] for r in d["rows"] if r[1] == "units"]
    print(f"\n{len(units)} unit sites ({sum(units)} units), {len(d['rows']) - len(units)} layer"
          " sites")  # fmt: skip
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """UnitMem (``score units``) or ClassMem (``score classes``) into ``--out``."""
    stage = "unitmem" if args.what == "units" else "classmem"
    enable = {"encoder": _encoder(args.checkpoint, args), "scores": {stage: {"enabled": True}}}
    return _run(args, _recipe(args, enable, STAGE=stage), stage)


def cmd_score_layers(args: argparse.Namespace) -> int:
    """LayerMem / ΔLayerMem of the pair --f, --g; or (--encoder) the member gap of one
    encoder, its --members against --nonmembers."""
    from memprune.recipes import parse_points

    pair = bool(args.f and args.g) and not (args.encoder or args.members or args.nonmembers)
    gap = bool(args.encoder and args.members and args.nonmembers) and not (args.f or args.g)
    if not (pair or gap):
        raise ConfigError(
            "score layers takes either --f and --g (LayerMem), or --encoder with --members and"
            " --nonmembers (member gap, no reference encoder)"
        )
    if args.encoder:
        stage, enable = "membergap", {"encoder": _encoder(args.encoder, args)}
        enable["data"] = {k: parse_points(getattr(args, k), f"--{k}")
                          for k in ("members", "nonmembers")}  # fmt: skip
    else:
        stage, enable = "layermem", {"encoder": _encoder(args.f, args, args.g)}
        splits = Path(args.splits or Path(args.f).parent / "splits.json")
        if args.splits and not splits.is_file():
            raise ConfigError(f"--splits {args.splits} does not exist")
        if splits.is_file():
            points = {"indices": str(splits), "part": args.part or "candidate"}
            enable["scores"] = {"layermem": {"points": points}}
    enable.setdefault("scores", {}).setdefault(stage, {})["enabled"] = True
    return _run(args, _recipe(args, enable, LAYERS=stage), stage)


def cmd_score_cka(args: argparse.Namespace) -> int:
    """CKA between the layers of --a and --b (or within --a)."""
    cka = {"enabled": True, "against": "g" if args.b else "self"}
    enable = {"encoder": _encoder(args.a, args, args.b), "scores": {"cka": cka}}
    return _run(args, _recipe(args, enable), "cka")


def cmd_pretrain(args: argparse.Namespace) -> int:
    """SimCLR training of the pair f / g (or of one encoder), or a supervised encoder."""
    from memprune.recipes import parse_count
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
    sizes = {k: parse_count(getattr(args, k)) for k in ("shared", "candidate", "extra", "test")
             if getattr(args, k) is not None}  # fmt: skip
    return _run(args, _recipe(args, {"encoder": encoder, "data": sizes}, TRAIN=stage), stage)


def cmd_probe(args: argparse.Namespace) -> int:
    """Linear-probe (and kNN) accuracy of frozen encoders on train -> test, one table."""
    paths = args.checkpoint or []
    enable = {"encoder": _encoder(paths[0] if paths else None, args),
              "evaluation": {"linear": True, "knn": True, "encoders": paths or None}}  # fmt: skip
    return _run(args, _recipe(args, enable), "evaluate")


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune by each strategy and ratio (UnitMem first, into --out/unitmem/, unless --scores
    names saved scores); probe every pruned encoder; one comparison table."""
    from memprune.pruning import PRUNING_STRATEGIES
    from memprune.recipes import schema_default

    given = {d[len(SET) :]: v for d, v in vars(args).items() if d.startswith(SET) and v is not None}
    key = "actions.prune.strategies"
    needs = {PRUNING_STRATEGIES[s].needs for s in given.get(key) or schema_default(key)}
    recover = {"method": args.recover} if args.recover else None
    if not args.recover and any(k.startswith("actions.prune.recover.") for k in given):
        raise ConfigError(
            "--recover-epochs, --recover-steps, --recover-lr and --recover-batch-size"
            " need --recover"
        )
    unitmem = "scores" in needs and not given.get("actions.prune.scores")
    enable = {"encoder": _encoder(args.checkpoint, args),
              "scores": {"unitmem": {"enabled": unitmem}},
              "actions": {"prune": {"enabled": True, "recover": recover}}}  # fmt: skip
    return _run(args, _recipe(args, enable), "prune")


def _tuning(args: argparse.Namespace, stage: str) -> dict:
    """The recipe keys of a verb that fine-tunes --f by layer rankings: the encoder, LayerMem
    of --f against --g (on f's candidates when its splits.json is there) and saved scores
    (--layer-scores, --unit-scores) in ``actions.finetune.scores``, with ``stage`` enabled."""
    layermem: dict = {"enabled": bool(args.g)}
    if args.g and (Path(args.f).parent / "splits.json").is_file():  # f's candidates
        layermem["points"] = {"indices": str(Path(args.f).parent / "splits.json"),
                              "part": "candidate"}  # fmt: skip
    given = [(flag, s) for flag, s in (("--layer-scores", args.layer_scores),
                                       ("--unit-scores", args.unit_scores)) if s]  # fmt: skip
    # a message about actions.finetune.scores[i] names the flag that gave it
    args.flags = {f"actions.finetune.scores[{i}]": flag for i, (flag, _) in enumerate(given)}
    actions = {"finetune": {"enabled": stage == "finetune", "scores": [s for _, s in given]}}
    if stage != "finetune":
        actions[stage] = {"enabled": True}
    return {"encoder": _encoder(args.f, args, args.g), "scores": {"layermem": layermem},
            "actions": actions}  # fmt: skip


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune the layers each rule chooses, at each k and seed; one comparison table
    (LayerMem of --f against --g first, into --out/layermem/, when --g is given)."""
    return _run(args, _recipe(args, _tuning(args, "finetune")), "finetune")


def cmd_shifts(args: argparse.Namespace) -> int:
    """Fine-tune f on each shift of the data set: every block (the oracle) and every rule, with
    its regret; the recommendation for --shift (LayerMem of --f against --g first, when given)."""
    enable = {**_tuning(args, "shifts"), "data": {"downstream": None}}
    return _run(args, _recipe(args, enable), "shifts")


def cmd_run(args: argparse.Namespace) -> int:
    """Run a YAML recipe end to end into a run directory and print the headline findings."""
    from memprune.recipes import headlines, load_recipe, read_metrics, run_recipe

    recipe = load_recipe(args.recipe, args.set or [])
    out = Path(args.out or Path("runs") / recipe.name)
    run = run_recipe(recipe, out, resume=bool(args.resume), force=bool(args.force),
                     log=lambda m: print(m, flush=True))  # fmt: skip
    if not is_main():  # under a launcher the main process reports
        return 0
    lines = "".join(f"\n- {line}" for line in headlines(read_metrics(run)))
    print(f"\nheadline findings:{lines}\n\nreport: {run / 'report.md'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Re-render ``report.md`` of a run directory."""
    from memprune.recipes import render_report, unfinished_stages

    path = render_report(args.run_dir)
    if missing := unfinished_stages(args.run_dir):
        print(f"warning: the run is incomplete (unfinished: {', '.join(missing)}); the report"
              " says so. Finish it with `memprune run RECIPE --out RUN --resume`.")  # fmt: skip
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------- the options

# fmt: off
#: Option rows: (flags, recipe key or =KIND, help). A recipe key gives the option the key's
#: type, choices and (unset) default from the schema. Verb-own options name their kind: =str,
#: =int, =on (a switch), =MODULE.NAME (a registry's names), with + (several) or ! (required).
MODEL = [("--model", "=str", "timm name (default: resnet18, or what a checkpoint dir records)"),
         ("--img-size", "=int", "input size (default: 32, or what a checkpoint dir records)"),
         ("--timm", "=str+", "timm arguments, KEY=VALUE"),
         ("--entry", "=str", "the model of a checkpoint holding several (DINO: teacher)"),
         ("--mean", "encoder.mean", "input normalization (null: the checkpoint's or timm's)"),
         ("--std", "encoder.std", "input normalization, with --mean"),
         ("--trust-pickle", "=on", "allow pickled checkpoints (unsafe)"),
         ("--no-strict", "=off", "load what fits a checkpoint, warn about the rest (default:"
          " strict)")]
CHECKPOINT = [("--checkpoint", "=str", "weights file, memprune run or pruned directory (none:"
               " timm's random init, seeded by --seed)")]
DATA = [("--data", "data.name", "data set name or image folder"),
        ("--root", "data.root", "folder of a torchvision data set's files")]
RUN = [("--seed", "seed", "seed of views, subsets, init and probes"),
       ("--device", "device", "cpu, cuda, cuda:1 (null: CUDA if any)"),
       ("--precision", "precision", "what encoders compute in"),
       ("--workers", "workers", "DataLoader workers (null: 0 on CPU, several per GPU)")]
CHUNK = [("--chunk-size", "scores.chunk_size", "points per forward pass (same results)")]
OUT = [("--out", "=str!", "output directory (must be new or empty)"),
       ("--force", "=on", "write into a non-empty --out")]
UNITS = [("--split", "scores.unitmem.split", "which split to score"),
         ("--views", "scores.STAGE.views", "views per point"),
         ("--sites", "scores.unitmem.sites", "site name patterns"),
         ("--rest", "scores.unitmem.rest", "mu_rest statistic"),
         ("--signed", "scores.unitmem.signed", "signed-activation rule"),
         ("--n-points --max-points", "scores.unitmem.n_points", "a seeded subset of the points")]
LAYERS = [("--f", "=str", "encoder trained WITH the candidates: run dir or weights"),
          ("--g", "=str", "encoder trained WITHOUT them"),
          ("--encoder", "=str", "one encoder, no reference: its member gap"),
          ("--members", "=str", "SPLIT[:FILE[:PART]] --encoder trained on"),
          ("--nonmembers", "=str", "SPLIT[:FILE[:PART]] it never saw, e.g. test"),
          ("--splits", "=str", "splits.json of --f (default: beside --f, if there)"),
          ("--part", "=data.PARTS", "which points of splits.json (default: candidate)"),
          ("--n-points", "scores.LAYERS.n_points", "a seeded subset of the points"),
          ("--pairs", "scores.LAYERS.pairs", "view pairs per point"),
          ("--layers", "scores.LAYERS.layers", "layer-site patterns"),
          ("--representation", "scores.LAYERS.representation", "layer output as"),
          ("--pair", "scores.LAYERS.pair", "two views per pair, or the image and a view"),
          ("--top-k", "scores.layermem.top_k", "size of the top / least sets")]
CKA = [("--a", "=str!", "encoder: run dir or weights"),
       ("--b", "=str", "second encoder (default: --a with itself)"),
       ("--split", "scores.cka.split", "which split"),
       ("--layers-a", "scores.cka.layers_a", "layer-site patterns of --a"),
       ("--layers-b", "scores.cka.layers_b", "layer-site patterns of --b"),
       ("--representation", "scores.cka.representation", "layer output as"),
       ("--minibatch", "scores.cka.minibatch", "points per HSIC estimate"),
       ("--invariance", "scores.cka.invariance", "also each layer's CKA between two views")]
PRETRAIN = [("--resume", "=on", "continue an interrupted run in --out"),
            ("--pair", "encoder.pretrain.pair", "f and g on the split, or one encoder"),
            *[(f"--{n}", "=str", f"count or fraction of the train split [data.{n}]")
              for n in ("shared", "candidate", "extra", "test")],
            ("--supervised", "=on", "cross-entropy training on every point instead"),
            ("--random-labels", "encoder.supervised.random_labels", "supervised, random labels"),
            ("--epochs", "encoder.TRAIN.epochs", "training epochs"),
            ("--batch-size", "encoder.TRAIN.batch_size", "points per batch, all processes"),
            ("--lr", "encoder.TRAIN.lr", "AdamW learning rate (cosine schedule)"),
            ("--temperature", "encoder.pretrain.temperature", "NT-Xent temperature"),
            ("--proj-dim", "encoder.pretrain.proj_dim", "projection head output width"),
            ("--mixed-precision", "encoder.TRAIN.mixed_precision", "of training"),
            ("--keep-checkpoints", "encoder.TRAIN.keep_checkpoints", "keep every epoch's encoder"),
            ("--batch-scope", "encoder.pretrain.batch_scope", "many processes: --batch-size is"
             " the global batch (split among them) or each process's"),
            ("--sync-bn", "encoder.pretrain.sync_bn", "many processes: BatchNorm over the"
             " global batch")]
PROBE = [("--checkpoint", "=str+", "encoders: weights, runs or pruned dirs (one table)"),
         ("--backend", "evaluation.backend", "linear-probe fit"),
         ("--cs", "evaluation.cs", "inverse L2 strengths the linear probe sweeps"),
         ("--knn", "evaluation.knn", "the weighted kNN probe too"),
         ("--cache-dir", "evaluation.cache_dir", "cache extracted features here"),
         ("--store", "evaluation.store", "features on disk here, read in chunks of rows"),
         ("--transform", "data.transform", "encoder (its eval preprocessing) or resize"),
         ("--chunk-size", "evaluation.chunk_size", "points per forward pass")]
A, F = "actions.prune.", "actions.finetune."
PRUNE = [("--scores", A + "scores", "saved UnitMem of this encoder (score units --out)"),
         ("--ratio --ratios", A + "ratios", "fractions of units removed"),
         ("--strategy", A + "strategies", "which units go first"),
         ("--scope", A + "scope", "the ratio per layer, or one global ranking"),
         ("--max-layer-ratio", A + "max_layer_ratio", "cap per layer (global scope)"),
         ("--heads", A + "heads", "also prune ViT attention heads"),
         ("--keep-output-width", A + "keep_output_width", "leave the feature width alone"),
         ("--steps", A + "steps", "prune in this many steps (several: compared)"),
         ("--seeds", A + "seeds", "seeds of random pruning and recovery"),
         ("--recover", "=pruning.RECOVERY", "recover every pruned encoder by this method"),
         ("--recover-epochs", A + "recover.epochs", "recovery epochs"),
         ("--recover-steps", A + "recover.steps", "recovery steps (not epochs)"),
         ("--recover-lr", A + "recover.lr", "recovery learning rate"),
         ("--recover-batch-size", A + "recover.batch_size", "recovery batch size"),
         ("--recover-augment", "=str+", "recovery views, PRESET|KEY=VALUE (default: the"
          " method's)"),
         ("--export", A + "export", "also each pruned encoder as a torch.export program"),
         ("--onnx", A + "onnx", "with --export: ONNX too (needs onnx)"),
         ("--forgetting", A + "forgetting", "per test example: what each pruned encoder"
          " forgets against f (forgetting.md, pies.md)"),
         ("--reference", "encoder.reference", "g of f's pair: with --forgetting, each pruned"
          " encoder's SSLMem of f's candidates (splits.json beside f) against it"),
         ("--views", "scores.unitmem.views", "views per point for UnitMem"),
         ("--n-points --max-points", "scores.unitmem.n_points", "UnitMem of a seeded subset"),
         ("--latency-batch", A + "latency_batch", "batch for latency (0: skip)"),
         ("--backend", "evaluation.backend", "linear-probe fit"),
         ("--cs", "evaluation.cs", "inverse L2 strengths the linear probe sweeps")]
FINETUNE = [("--f", "=str!", "the pretrained encoder: run dir or weights"),
            ("--g", "=str", "reference encoder, to compute LayerMem"),
            ("--layer-scores", "=str", "LayerMem or member gap of f (score layers --out)"),
            ("--unit-scores", "=str", "UnitMem of f (score units --out), for its profile"),
            ("--score-data", "data.name", "pretraining data (with --g)"),
            ("--data", "data.downstream", "downstream data set"),
            ("--root", "data.root", "folder of a torchvision data set's files"),
            ("--pairs", "scores.layermem.pairs", "view pairs per point (with --g)"),
            ("--k", F + "k", "layers to fine-tune"),
            ("--strategy", F + "strategies", "layer choices compared"),
            ("--by", F + "by", "rankings `top` uses (null: every one on offer, and rgn)"),
            ("--epochs", F + "epochs", "epochs per run"),
            ("--lr", F + "lr", "AdamW learning rate"),
            ("--batch-size", F + "batch_size", "batch size"),
            ("--seeds", F + "seeds", "one run per seed"),
            ("--cs", "evaluation.cs", "inverse L2 strengths of the linear-probe baseline")]
S = "actions.shifts."
SHIFTS = [*FINETUNE[:4], ("--data", "data.name", "the data set f was trained on (shifts are"
                          " made from it)"),
          FINETUNE[6], FINETUNE[7],
          ("--shifts", S + "shifts", "turn, corrupt:CORRUPTION:SEVERITY, subpopulation, relabel"),
          ("--shift", S + "shift", "your shift: input, feature, output or one of --shifts"
           " (default: estimated from the features)"),
          ("--k", S + "k", "layers to fine-tune (the oracle: every block of each k)"),
          ("--strategy", S + "strategies", "layer choices compared"),
          ("--by", S + "by", "rankings `top` uses (null: every one on offer, and rgn)"),
          ("--epochs", S + "epochs", "epochs per run"),
          ("--lr", S + "lr", "AdamW learning rate"),
          ("--batch-size", S + "batch_size", "batch size"),
          ("--seeds", S + "seeds", "one run per seed"),
          ("--n-points", S + "n_points", "fine-tuning points per shift (a seeded subset)"),
          ("--cs", "evaluation.cs", "inverse L2 strengths of the linear-probe baseline")]
SITES = [("--split", "=str", "which split (default: train)"),
         ("--views", "=int", "views per point (default: 4)"),
         ("--points", "=int", "points in the batch pushed through (default: 8)")]
RECIPE = [("recipe", "=str", "recipe file (see recipes/)"),
          ("--set", "=str+", "override recipe keys, e.g. actions.prune.ratios=[0.5]"),
          ("--out", "=str", "run directory (default: runs/NAME)"),
          ("--resume", "=on", "finish an interrupted run"),
          ("--force", "=on", "start an existing run over")]
#: verb -> (function, help, its option rows, the recipe key --augment sets)
VERBS = {
    "sites": (cmd_sites, "list an encoder's unit and layer sites",
              [*CHECKPOINT, *MODEL, *DATA, *SITES, *RUN[:1]], None),
    "score units": (cmd_score, "UnitMem of every unit",
                    [*CHECKPOINT, *MODEL, *DATA, *UNITS, *RUN, *CHUNK, *OUT],
                    "scores.STAGE.augment"),
    "score classes": (cmd_score, "ClassMem of every unit",
                      [*CHECKPOINT, *MODEL, *DATA, *UNITS, *RUN, *CHUNK, *OUT],
                      "scores.STAGE.augment"),
    "score layers": (cmd_score_layers, "LayerMem / ΔLayerMem of a pair, or one encoder's member"
                     " gap", [*LAYERS, *MODEL, *DATA, *RUN, *CHUNK, *OUT], "scores.augment"),
    "score cka": (cmd_score_cka, "CKA between layers (within --a, or --a vs --b)",
                  [*CKA, *MODEL, *DATA, *RUN, *OUT], "scores.cka.augment"),
    "pretrain": (cmd_pretrain, "SimCLR-train the pair f / g (or one encoder)",
                 [*PRETRAIN, *MODEL, *DATA, *RUN, *OUT], "encoder.TRAIN.augment"),
    "probe": (cmd_probe, "linear-probe and kNN accuracy of frozen encoders",
              [*MODEL, *DATA, *PROBE, *RUN, *OUT], None),
    "prune": (cmd_prune, "prune units by UnitMem, random, magnitude, ...; compare probes",
              [*CHECKPOINT, *MODEL, *DATA, *PRUNE, *RUN, *CHUNK, *OUT], None),
    "finetune": (cmd_finetune, "fine-tune the top layers by each ranking against last-k,"
                 " first-k, random-k, all", [*FINETUNE, *MODEL, *RUN, *OUT],
                 "actions.finetune.augment"),
    "shifts": (cmd_shifts, "which layers to fine-tune by kind of shift: the oracle and every"
               " rule's regret", [*SHIFTS, *MODEL, *RUN, *OUT], "actions.shifts.augment"),
    "run": (cmd_run, "run a YAML recipe: data -> scores -> actions -> report", RECIPE, None),
    "report": (cmd_report, "re-render report.md of a run directory",
               [("run_dir", "=str", "a directory written by memprune run")], None),
}
# fmt: on


def _registry(module: str, name: str) -> tuple[str, ...]:
    """The names of an option registry: the CLI's ``choices`` come from the library."""
    import importlib

    return tuple(getattr(importlib.import_module(f"memprune.{module}"), name))


def _from_schema(key: str) -> dict:
    """argparse settings of recipe ``key``: its type, choices, several values for a list, a
    ``--x`` / ``--no-x`` pair for a bool."""
    from memprune.recipes import schema_field

    tp, kw = schema_field(key)[0], {}
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    arms = [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]
    lists = [a for a in arms if typing.get_origin(a) is list]
    if lists:
        kw["nargs"], arms = "+", list(typing.get_args(lists[0]))
    literals = [a for a in arms if typing.get_origin(a) is typing.Literal]
    if literals:
        kw["choices"] = typing.get_args(literals[0])
    elif arms[0] is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif arms[0] in (int, float):
        kw["type"] = arms[0]
    return kw


def _add(p: argparse.ArgumentParser, rows) -> None:
    from memprune.recipes import schema_default

    for flags, key, text in rows:
        flags, kw = flags.split(), {}
        if key.startswith("="):
            kind = key[1:].rstrip("+!")
            kw = {"nargs": "+", "action": "extend"} if key.endswith("+") else {}
            if kind in ("on", "off"):
                kw.update(action="store_const", const=kind == "on")
            elif kind in ("int", "str"):
                kw.update(type=int) if kind == "int" else None
            else:
                kw.update(choices=_registry(*kind.split(".")))
            dest = "strict" if flags[0] == "--no-strict" else None
            if flags[0].startswith("-"):
                kw.update(required=key.endswith("!"), dest=dest or flags[0][2:].replace("-", "_"))
            p.add_argument(*flags, **kw, help=text, default=True if dest else None)
            continue
        kw = _from_schema(_fill(key, HOLES))
        if "choices" not in kw and kw.get("action") is None:
            kw["metavar"] = flags[0].lstrip("-").upper().replace("-", "_")
        shown = schema_default(_fill(key, HOLES))
        shown = "null" if shown is None else str(shown).lower() if shown in (True, False) else shown
        p.add_argument(*flags, dest=SET + key, default=None, **kw,
                       help=f"{text} [{key}, default: {shown}]")  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """A bad argument is one line naming it and pointing to ``--help``, with exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="memprune", description="Localize memorization in vision encoders and act on it."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)  # fmt: skip
    score = sub.add_parser("score", help="compute memorization scores").add_subparsers(
        dest="what", required=True, metavar="SCORE", parser_class=_Parser)  # fmt: skip
    presets = ", ".join(_registry("data", "AUGMENTS"))
    for verb, (func, text, rows, augment) in VERBS.items():
        parent, name = (score, verb[6:]) if verb.startswith("score ") else (sub, verb)
        p = parent.add_parser(name, help=text, description=text)
        _add(p, rows)
        if augment:
            stage = {"score classes": "classmem"}.get(verb, "unitmem")
            shown = _fill(augment, {**HOLES, "STAGE": stage})
            p.add_argument("--augment", nargs="+", metavar="PRESET|KEY=VALUE",
                           help=f"views: a preset ({presets}) and/or its parameters, e.g."
                           f" --augment crop_flip scale=[0.6,1.0] [{shown}]")  # fmt: skip
        p.set_defaults(func=func, verb=verb, parser=p, augment=None)
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
    except KeyboardInterrupt:  # what finished is on disk, whole (files are written atomically)
        print(f"memprune {args.command}: interrupted; the finished parts are kept: run the same"
              " command again to finish (memprune run: --resume)", file=sys.stderr)  # fmt: skip
        return 130
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # under torchrun: exit cleanly
            dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
