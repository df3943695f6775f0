"""The recipe schema: typed dataclasses with defaults, validated before anything runs.

A recipe is YAML whose sections mirror :class:`Recipe`. Validation walks the dataclasses:
an unknown key, a value of the wrong type or outside its allowed values or range is a
:class:`RecipeError` naming the dotted path of the key (``actions.prune.ratios[1]``) and what
is allowed there. ``--set key=value`` overrides are applied before validation.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from memprune.data import AUGMENTS, SETS
from memprune.engine import PRECISIONS
from memprune.errors import ConfigError, first_line
from memprune.hooks import REPRESENTATIONS, SIGNED
from memprune.probe import BACKENDS, DEFAULT_CS
from memprune.pruning import DEFAULT_STRATEGIES as DEFAULT_PRUNE
from memprune.pruning import DISTILL_LOSSES, PRUNING_STRATEGIES, RECOVERY, SCOPES
from memprune.recipes._values import put_key
from memprune.scores import PAIRS
from memprune.stats import RESTS
from memprune.train import MIXED_PRECISION
from memprune.tuning import BY, LAYER_STRATEGIES


def _names(registry) -> Any:
    """The recipe type of an option: the names of its registry."""
    return Literal.__getitem__(tuple(registry))


Rest, Signed, Representation = _names(RESTS), _names(SIGNED), _names(REPRESENTATIONS)
Precision, Backend, Scope = _names(MIXED_PRECISION), _names(BACKENDS), _names(SCOPES)
PruneStrategy, LayerStrategy, By = _names(PRUNING_STRATEGIES), _names(LAYER_STRATEGIES), _names(BY)
Preset, ComputePrecision = _names(AUGMENTS), _names(PRECISIONS)
Recovery, DistillLoss = _names(RECOVERY), _names(DISTILL_LOSSES)
Pair = _names(PAIRS)


class RecipeError(ConfigError):
    """A recipe (or a ``--set`` override) that does not fit the schema."""


#: A layer ranking -> the scores stage it needs (None: made by the fine-tuning stage).
RANKED_BY = {"delta": "layermem", "layermem": "layermem", "gap": "membergap", "auc": "membergap",
             "unitmem": "unitmem", "unitmem_frac": "unitmem", "rgn": None}  # fmt: skip


def _range(lo=None, hi=None, hi_open=False, lo_open=False) -> dict:
    return {"min": lo, "max": hi, "max_open": hi_open, "min_open": lo_open}


@dataclass
class PointsCfg:
    """Points of the data set: a split, restricted to the indices of a file when given (a JSON
    list of ints, or a memprune ``splits.json`` with ``part``), then to ``n`` drawn by seed."""

    split: Literal["train", "test"] = "train"
    indices: str | None = None
    part: Literal[SETS] | None = None
    n_points: int | None = field(default=None, metadata=_range(2))


@dataclass
class CanariesCfg:
    """Canaries appended to the train split (docs/method.md §8b): ``n`` atypical points of
    ``kind`` (``pattern``, ``mix``, ``noise``, ``smooth``, ``collage`` or ``shuffle``), each
    included in f's training set by its own coin of probability ``p``, ``repeat`` times per
    epoch; g never sees one. The ``canaries`` stage audits them.
    ``strength``: the pattern's share of a ``pattern`` canary; ``seed``: which images and
    patterns (None: the recipe's seed). ``n_typical``: f's other training points that UnitMem
    scores beside the canaries; ``views`` / ``pairs``: UnitMem views and SSLMem view pairs;
    ``seeds``: the random-unit ablations."""

    n: int = field(default=40, metadata=_range(2))
    kind: Literal["pattern", "mix", "noise", "smooth", "collage", "shuffle"] = "pattern"
    p: float = field(default=0.5, metadata=_range(0, 1, hi_open=True, lo_open=True))
    repeat: int = field(default=1, metadata=_range(1))
    strength: float = field(default=0.5, metadata=_range(0, 1, lo_open=True))
    seed: int | None = None
    n_typical: int = field(default=100, metadata=_range(2))
    views: int = field(default=10, metadata=_range(1))
    pairs: int = field(default=10, metadata=_range(1))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])


@dataclass
class DataCfg:
    """The data set the encoders are scored on (its train split) and probed on.

    ``members`` / ``nonmembers``: the points the encoder was trained on and points of the same
    distribution it never saw, for the reference-free member gap (default with
    ``encoder.pretrain``: the candidates and the extras of its split)."""

    name: str = "digits"
    root: str | None = None
    img_size: int | None = field(default=None, metadata=_range(1))
    #: torchvision / folder data: ``encoder`` = the encoder's own eval preprocessing (timm's
    #: data config: resize, centre crop, interpolation); ``resize`` = resize and centre-crop
    #: to img_size. An explicit data.img_size always resizes; the built-in data sets come at
    #: their own size either way.
    transform: Literal["encoder", "resize"] = "encoder"
    shared: int | float = field(default=0.5, metadata=_range(0))
    candidate: int | float = field(default=0.1, metadata=_range(0))
    extra: int | float = field(default=0.1, metadata=_range(0))
    #: points held out from both f and g (a count or a fraction)
    test: int | float = field(default=0, metadata=_range(0))
    split_seed: int = 0
    downstream: str | None = "digits-shift"  # fine-tuning data (None: the same data set)
    members: PointsCfg | None = None
    nonmembers: PointsCfg | None = None
    canaries: CanariesCfg | None = None


@dataclass
class PretrainCfg:
    """SimCLR pretraining of f (shared + candidates) and g (shared + extras)."""

    epochs: int = field(default=30, metadata=_range(1))
    lr: float = field(default=3e-3, metadata=_range(0, lo_open=True))
    batch_size: int = field(default=128, metadata=_range(2))
    temperature: float = field(default=0.5, metadata=_range(0))
    proj_dim: int = field(default=64, metadata=_range(1))
    augment: Preset | dict[str, Any] = field(default_factory=lambda: {"scale": [0.3, 1.0]})
    mixed_precision: Precision = "auto"
    #: the pair f / g on the split of ``data``; false: one encoder (``encoder/``) on the
    #: whole train split
    pair: bool = True
    keep_checkpoints: bool = False
    #: many processes: ``batch_size`` is the global batch split among them (``global``) or
    #: each process's (``process``); ``sync_bn``: BatchNorm over the global batch
    batch_scope: Literal["global", "process"] = "global"
    sync_bn: bool = False


@dataclass
class SupervisedCfg:
    """A supervised baseline on the same points as f (for ClassMem vs UnitMem), or on the
    whole train split (``points: all``)."""

    enabled: bool = False
    epochs: int = field(default=15, metadata=_range(1))
    lr: float = field(default=1e-3, metadata=_range(0, lo_open=True))
    batch_size: int = field(default=128, metadata=_range(2))
    points: Literal["f", "all"] = "f"
    random_labels: bool = False
    augment: Preset | dict[str, Any] = "crop_flip"
    mixed_precision: Precision = "auto"
    keep_checkpoints: bool = False


@dataclass
class EncoderCfg:
    """The encoder: a timm name, made by ``pretrain`` or loaded from ``checkpoint`` (any layout
    :func:`memprune.load_encoder` reads; ``entry`` picks DINO's teacher or student, ``strict:
    false`` loads what fits; ``checkpoint_from``: the recipe that makes the checkpoint, named
    when it is missing); ``reference``: the encoder g trained without the candidates, for
    SSLMem / LayerMem."""

    #: null with a checkpoint that records its model (a memprune run or pruned directory)
    model: str | None = "resnet18"
    img_size: int | None = field(default=32, metadata=_range(1))
    timm: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    checkpoint_from: str | None = None
    entry: str | None = None
    strict: bool = True
    #: read pickled checkpoints (unsafe: only files you trust)
    trust_pickle: bool = False
    #: no pretrain, no checkpoint: timm's random init, seeded by ``seed``
    random_init: bool = False
    #: the input normalization of a loaded encoder (null: what its checkpoint says, e.g. the
    #: ImageNet statistics of DINO / MAE / MoCo v3, else timm's default for the model)
    mean: list[float] | None = None
    std: list[float] | None = None
    reference: str | None = None
    pretrain: PretrainCfg | None = field(default_factory=PretrainCfg)
    supervised: SupervisedCfg = field(default_factory=SupervisedCfg)


@dataclass
class UnitMemCfg:
    """UnitMem of f on ``n_points`` of ``split`` (all when null), drawn by seed; ``sites``:
    site-name patterns (null: every unit site)."""

    enabled: bool = True
    views: int = field(default=10, metadata=_range(1))
    rest: Rest = "mean"
    signed: Signed = "abs"
    n_points: int | None = field(default=None, metadata=_range(1))
    sites: list[str] | None = None
    augment: Preset | dict[str, Any] = "simclr"
    split: Literal["train", "test"] = "train"


@dataclass
class ClassMemCfg:
    """ClassMem on the points UnitMem scores (of f, and of the supervised encoder)."""

    enabled: bool = True
    views: int = field(default=4, metadata=_range(1))
    augment: Preset | dict[str, Any] = "none"


@dataclass
class SSLMemCfg:
    enabled: bool = True
    pairs: int = field(default=10, metadata=_range(1))


@dataclass
class LayerMemCfg:
    """LayerMem / ΔLayerMem of f against g on ``points`` of the train split (default: the
    candidates of the pretrain split; all points without one)."""

    enabled: bool = True
    pairs: int = field(default=10, metadata=_range(1))
    representation: Representation = "flatten"
    top_k: int = field(default=50, metadata=_range(1))
    layers: list[str] | None = None
    pair: Pair = "views"
    points: PointsCfg | None = None
    n_points: int | None = field(default=None, metadata=_range(1))


@dataclass
class MemberGapCfg:
    """Member gap and membership AUC per layer of f alone (``data.members`` vs
    ``data.nonmembers``): the reference-free layer ranking."""

    enabled: bool = False
    pairs: int = field(default=10, metadata=_range(1))
    representation: Representation = "flatten"
    n_boot: int = field(default=1000, metadata=_range(10))
    layers: list[str] | None = None
    pair: Pair = "views"
    n_points: int | None = field(default=None, metadata=_range(1))


@dataclass
class CKACfg:
    """CKA between the layers of f and ``against`` (the supervised encoder, when the recipe
    trains one; the reference g; or f itself), on ``split``: ``minibatch`` points per HSIC
    estimate. Layers at the same depth are also compared on disjoint minibatches for the
    spread; ``invariance``: CKA of each layer between two views too."""

    enabled: bool = True
    against: Literal["supervised", "g", "self"] = "supervised"
    minibatch: int = field(default=64, metadata=_range(4))
    representation: Representation = "flatten"
    split: Literal["train", "test"] = "test"
    layers_a: list[str] | None = None
    layers_b: list[str] | None = None
    invariance: bool = False
    augment: Preset | dict[str, Any] = "simclr"


@dataclass
class ScoresCfg:
    """Scores of f; ``augment`` sets the views of SSLMem and LayerMem (a preset name, or the
    SimCLR preset's parameters); ``chunk_size``: points per forward pass (never changes a
    score)."""

    unitmem: UnitMemCfg = field(default_factory=UnitMemCfg)
    classmem: ClassMemCfg = field(default_factory=ClassMemCfg)
    sslmem: SSLMemCfg = field(default_factory=SSLMemCfg)
    layermem: LayerMemCfg = field(default_factory=LayerMemCfg)
    membergap: MemberGapCfg = field(default_factory=MemberGapCfg)
    cka: CKACfg = field(default_factory=CKACfg)
    augment: Preset | dict[str, Any] = field(default_factory=lambda: {"scale": [0.3, 1.0]})
    chunk_size: int = field(default=32, metadata=_range(1))


@dataclass
class RecoverCfg:
    """A short training of every pruned encoder (memprune.pruning.recover): ``distill`` from f
    on the training split, ``supervised`` on its labels, or ``simclr``."""

    method: Recovery = "distill"
    epochs: int = field(default=3, metadata=_range(1))
    steps: int | None = field(default=None, metadata=_range(1))  # replaces epochs when set
    lr: float = field(default=1e-3, metadata=_range(0, lo_open=True))
    batch_size: int = field(default=64, metadata=_range(2))
    loss: DistillLoss = "cosine"
    sites: list[str] = field(default_factory=list)
    augment: Preset | dict[str, Any] | None = None  # None: the method's default


@dataclass
class PruneCfg:
    enabled: bool = True
    ratios: list[float] = field(default_factory=lambda: [0.2, 0.5], metadata=_range(0, 1, True))
    strategies: list[PruneStrategy] = field(default_factory=lambda: list(DEFAULT_PRUNE))
    scope: Scope = "layer"
    max_layer_ratio: float | None = field(default=None, metadata=_range(0, 1))
    heads: bool = False
    keep_output_width: bool = True
    latency_batch: int | None = field(default=64, metadata=_range(0))  # 0: not measured
    seeds: list[int] = field(default_factory=lambda: [0])  # random pruning, recovery
    #: numbers of pruning steps compared (1: one shot; N: N equal steps, recovered between)
    steps: list[int] = field(default_factory=lambda: [1], metadata=_range(1))
    recover: RecoverCfg | None = None
    export: bool = False
    onnx: bool = False  # with export: also ONNX (needs onnx)
    #: a saved UnitMem of f to rank by (a result stem, or a directory holding one); null:
    #: the run's unitmem stage
    scores: str | None = None
    #: per test example, what each pruned encoder forgets against f (flips of the probe's
    #: outcome, PIEs over seeds, how atypical points concentrate among them; McNemar's test
    #: in the verdicts between deterministic criteria): forgetting.md, pies.md
    forgetting: bool = False


@dataclass
class FinetuneCfg:
    enabled: bool = True
    k: list[int] = field(default_factory=lambda: [1, 2], metadata=_range(1))
    strategies: list[LayerStrategy] = field(
        default_factory=lambda: ["top", "last", "random", "all"]
    )
    by: By | list[By] | None = None  # rankings `top` uses (None: every one this run has)
    epochs: int = field(default=20, metadata=_range(1))
    lr: float = field(default=1e-2, metadata=_range(0, lo_open=True))
    batch_size: int = field(default=32, metadata=_range(2))
    augment: Preset | dict[str, Any] = "none"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    #: saved scores of f to rank layers by (LayerMem, member gap or UnitMem results, or
    #: directories holding one), beside the run's own scores stages
    scores: list[str] = field(default_factory=list)


@dataclass
class ShiftsCfg:
    """Which layers to fine-tune, by kind of shift (docs/method.md §10b): each of ``shifts``
    (made from ``data.name``: ``turn``, ``corrupt:CORRUPTION:SEVERITY``, ``subpopulation``,
    ``relabel``) is fine-tuned by every block (the oracle) and every rule, at one budget over
    ``seeds``; ``shift`` is the user's shift for the recommendation: a family (``input``,
    ``feature``, ``output``), one of ``shifts``, or None to estimate it from where f's features
    move. ``n_points``: fine-tuning training points per shift (a seeded subset; None: all)."""

    enabled: bool = False
    shifts: list[str] = field(
        default_factory=lambda: ["turn", "corrupt:gaussian_noise:3", "subpopulation", "relabel"]
    )
    shift: str | None = None
    k: list[int] = field(default_factory=lambda: [1, 2], metadata=_range(1))
    strategies: list[LayerStrategy] = field(
        default_factory=lambda: ["top", "last", "first", "random", "all"]
    )
    by: By | list[By] | None = None  # rankings `top` uses (None: every one this run has)
    epochs: int = field(default=8, metadata=_range(1))
    lr: float = field(default=1e-2, metadata=_range(0, lo_open=True))
    batch_size: int = field(default=32, metadata=_range(2))
    augment: Preset | dict[str, Any] = "none"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_points: int | None = field(default=None, metadata=_range(2))


@dataclass
class ActionsCfg:
    prune: PruneCfg = field(default_factory=PruneCfg)
    finetune: FinetuneCfg = field(default_factory=FinetuneCfg)
    shifts: ShiftsCfg = field(default_factory=ShiftsCfg)


@dataclass
class EvaluationCfg:
    """The probes of the evaluate stage, and those the prune and finetune stages compare by."""

    linear: bool = True
    knn: bool = True
    backend: Backend = "auto"
    #: the inverse L2 strengths the linear probe sweeps, chosen on a validation split
    cs: list[float] = field(default_factory=lambda: list(DEFAULT_CS),
                            metadata=_range(0, lo_open=True))  # fmt: skip
    #: the encoders probed: f, g, supervised or checkpoint paths (null: f, and g and the
    #: supervised encoder where the run has them)
    encoders: list[str] | None = None
    chunk_size: int = field(default=256, metadata=_range(1))
    cache_dir: str | None = None
    #: features memory-mapped on disk in this directory, probes read in chunks of rows
    store: str | None = None


@dataclass
class Recipe:
    """Data -> encoders -> scores -> actions -> evaluation -> report."""

    name: str = "run"
    seed: int = 0
    #: several seeds: the whole loop once per seed into RUN/seed_<s>/, and a report with
    #: confidence intervals over them (memprune.recipes._seeds); replaces ``seed``
    seeds: list[int] | None = None
    device: str | None = None
    #: what encoders compute in while scoring and extracting features (auto: bf16 on a CUDA
    #: device that supports it, else fp32); training follows encoder.pretrain.mixed_precision
    precision: ComputePrecision = "auto"
    #: DataLoader workers of scoring and training (null: 0 on CPU, several per GPU)
    workers: int | None = field(default=None, metadata=_range(0))
    data: DataCfg = field(default_factory=DataCfg)
    encoder: EncoderCfg = field(default_factory=EncoderCfg)
    scores: ScoresCfg = field(default_factory=ScoresCfg)
    actions: ActionsCfg = field(default_factory=ActionsCfg)
    evaluation: EvaluationCfg = field(default_factory=EvaluationCfg)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _check_range(value, meta: dict, path: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{path}: {value!r} must be a finite number")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and meta.get("min_open") and value <= lo:
        raise RecipeError(f"{path}: {value!r} must be above {lo}")
    if lo is not None and value < lo:
        raise RecipeError(f"{path}: {value!r} is below the minimum {lo}")
    if hi is not None and (value >= hi if meta.get("max_open") else value > hi):
        bound = f"below {hi}" if meta.get("max_open") else f"at most {hi}"
        raise RecipeError(f"{path}: {value!r} must be {bound}")


def _build_union(tp, value, path: str, meta: dict):
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise RecipeError(f"{path}: may not be null; expected {_type_name(tp)}")
    errors = []
    for arm in (a for a in args if a is not type(None)):
        try:
            return _build(arm, value, path, meta)
        except RecipeError as err:
            errors.append(err)
    if len(errors) == 1:
        raise errors[0]
    raise RecipeError(f"{path}: {value!r} is not {_type_name(tp)}")


def _build_literal(tp, value, path: str, meta: dict):
    allowed = typing.get_args(tp)
    if value not in allowed:
        raise RecipeError(
            f"{path}: {value!r} is not allowed; use one of {', '.join(map(repr, allowed))}"
        )
    return value


def _build_list(tp, value, path: str, meta: dict):
    if not isinstance(value, list):
        raise RecipeError(f"{path}: expected a list ({_type_name(tp)}), got {value!r}")
    (item,) = typing.get_args(tp)
    return [_build(item, v, f"{path}[{i}]", meta) for i, v in enumerate(value)]


def _build_dict(tp, value, path: str, meta: dict):
    if not isinstance(value, dict):
        raise RecipeError(f"{path}: expected a mapping, got {value!r}")
    return dict(value)


def _build_scalar(tp, value, path: str, meta: dict):
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp in (int, float):
        ok = isinstance(value, int) if tp is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok:
            raise RecipeError(f"{path}: expected {tp.__name__}, got {value!r}")
        _check_range(value, meta, path)
        return tp(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{path}: expected a string, got {value!r}")
        return value
    raise RecipeError(f"{path}: unsupported schema type {tp}")  # pragma: no cover


#: How a value of each kind of type is checked and converted.
_BUILDERS = {Union: _build_union, types.UnionType: _build_union, Literal: _build_literal,
             list: _build_list, dict: _build_dict}  # fmt: skip


def _build(tp, value, path: str, meta: dict):
    """``value`` converted to type ``tp`` or a RecipeError naming ``path``."""
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path)
    return _BUILDERS.get(typing.get_origin(tp), _build_scalar)(tp, value, path, meta)


def _build_dataclass(cls, value, path: str):
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise RecipeError(f"{path or 'recipe'}: expected a mapping of keys, got {value!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in value if k not in fields]
    if unknown:
        where = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise RecipeError(f"{where}: unknown key; allowed here: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            sub = f"{path}.{name}" if path else name
            kwargs[name] = _build(hints[name], value[name], sub, dict(f.metadata))
    return cls(**kwargs)


def validate(data: dict) -> Recipe:
    """A :class:`Recipe` from a plain mapping, or a RecipeError with the bad key's path."""
    recipe = _build_dataclass(Recipe, data, "")
    for cfg in (recipe.actions.finetune, recipe.actions.shifts):
        if isinstance(cfg.by, str):
            cfg.by = [cfg.by]
    for check in (_check_name, _check_seeds, _check_encoder, _check_scores, _check_actions):
        check(recipe)
    check_needs(recipe)
    return recipe


def _check_name(recipe: Recipe) -> None:
    """The name is the run's folder under runs/: a plain name, not a path."""
    name = recipe.name
    if not name or name in (".", "..") or any(c in name for c in "/\\") or name.startswith("."):
        raise RecipeError(
            f"name: {name!r} names the run's folder under runs/, so it is a plain name (letters,"
            " digits, -, _, .); choose where the run goes with --out"
        )


def _check_seeds(recipe: Recipe) -> None:
    if recipe.seeds is not None:
        if not recipe.seeds or len(set(recipe.seeds)) != len(recipe.seeds):
            raise RecipeError(f"seeds: {recipe.seeds!r} must list distinct seeds, e.g. [0, 1, 2]")
        if any(s < 0 for s in recipe.seeds):
            raise RecipeError(f"seeds: {recipe.seeds!r} must be >= 0")


def _check_encoder(recipe: Recipe) -> None:
    enc = recipe.encoder
    if enc.pretrain is None and enc.checkpoint is None and not enc.random_init:
        raise RecipeError(
            "encoder: give encoder.pretrain (make f and g) or encoder.checkpoint (or"
            " random_init: true for timm's random init)"
        )
    if enc.random_init and (enc.pretrain is not None or enc.checkpoint is not None):
        raise RecipeError("encoder.random_init: only without encoder.pretrain and checkpoint")
    if enc.pretrain is not None and enc.checkpoint is not None:
        raise RecipeError("encoder: give encoder.pretrain or encoder.checkpoint, not both")
    if (enc.mean is None) != (enc.std is None) or (enc.mean and len(enc.mean) != len(enc.std)):
        raise RecipeError(f"encoder.std: {enc.std} does not go with encoder.mean {enc.mean}:"
                          " give both, one value per channel")  # fmt: skip
    if enc.mean is not None and enc.pretrain is not None:
        raise RecipeError("encoder.mean / std: set the normalization of a loaded checkpoint;"
                          " pretraining uses the model's own")  # fmt: skip
    if enc.supervised.enabled and enc.supervised.points == "f" and enc.pretrain is None:
        raise RecipeError("encoder.supervised: trains on f's points; needs encoder.pretrain")


def _check_scores(recipe: Recipe) -> None:
    enc, scores = recipe.encoder, recipe.scores
    has_g = enc.pretrain is not None or enc.reference is not None
    needs_g = [n for n, on in (("scores.sslmem", scores.sslmem.enabled),
                               ("scores.layermem", scores.layermem.enabled)) if on]  # fmt: skip
    if needs_g and not has_g:
        raise RecipeError(
            f"{needs_g[0]}: needs the reference encoder g; add encoder.pretrain or"
            " encoder.reference, or set enabled: false"
        )
    if scores.sslmem.enabled and enc.pretrain is None:
        raise RecipeError(
            "scores.sslmem: compares f's candidates with the extras of encoder.pretrain's"
            " split; add encoder.pretrain or set enabled: false"
        )
    pair = enc.pretrain.pair if enc.pretrain is not None else enc.checkpoint is not None
    if recipe.data.canaries is not None and not pair:
        raise RecipeError(
            "data.canaries: canaries are included in f's training by a coin, so the recipe"
            " must train the pair (encoder.pretrain with pair: true) or name an f such a"
            " pair trained (encoder.checkpoint, with its splits.json beside it)"
        )
    if recipe.data.canaries is not None and enc.pretrain is None and enc.reference is None:
        raise RecipeError(
            "data.canaries: the canary audit scores f against the g of its pair: add"
            " encoder.reference (beside encoder.checkpoint)"
        )
    if scores.membergap.enabled and enc.pretrain is None:
        missing = [k for k in ("members", "nonmembers") if getattr(recipe.data, k) is None]
        if missing:
            raise RecipeError(
                f"data.{missing[0]}: scores.membergap needs the points f was trained on"
                " (data.members) and points it never saw (data.nonmembers), e.g. {split:"
                " train} and {split: test}"
            )
    for key in ("members", "nonmembers"):
        points = getattr(recipe.data, key)
        unresolved = points is not None and points.part is not None and points.indices is None
        if unresolved and enc.pretrain is None:
            raise RecipeError(
                f"data.{key}.part: names a set of a splits.json; give data.{key}.indices"
            )


#: lists whose entries each name one run or row: a repeat would write or count it twice
DISTINCT = ("actions.prune.ratios", "actions.prune.strategies", "actions.prune.seeds",
            "actions.prune.steps", "actions.finetune.k", "actions.finetune.strategies",
            "actions.finetune.seeds", "actions.shifts.shifts", "actions.shifts.k",
            "actions.shifts.strategies", "actions.shifts.seeds", "evaluation.cs")  # fmt: skip


def _check_actions(recipe: Recipe) -> None:
    act, scores = recipe.actions, recipe.scores
    for key in DISTINCT:
        values = _value(recipe, key)
        repeated = sorted({v for v in values if values.count(v) > 1}, key=values.index)
        if repeated:
            raise RecipeError(f"{key}: {values!r} repeats {repeated[0]!r}; list each once")
    for name, cfg in (("finetune", act.finetune), ("shifts", act.shifts)):
        if not (cfg.enabled and cfg.by and not act.finetune.scores):
            continue
        for i, by in enumerate(cfg.by):
            stage = RANKED_BY[by]
            if stage and not getattr(scores, stage).enabled:
                raise RecipeError(
                    f"actions.{name}.by[{i}]: {by!r} ranks layers by scores.{stage}; enable"
                    f" it, or rank by another of {', '.join(BY)}"
                )
    if act.shifts.enabled:
        _check_shifts(act.shifts)
    if act.prune.onnx and not act.prune.export:
        raise RecipeError("actions.prune.onnx: exports beside the torch.export program; set"
                          " actions.prune.export")  # fmt: skip


def _check_shifts(cfg: ShiftsCfg) -> None:
    from memprune.data import FAMILIES, Shift

    if not cfg.shifts:
        raise RecipeError("actions.shifts.shifts: list at least one shift, e.g. [turn, relabel]")
    names = []
    for i, spec in enumerate(cfg.shifts):
        try:
            names.append(Shift.parse(spec).name)
        except ConfigError as err:
            raise RecipeError(f"actions.shifts.shifts[{i}]: {err}") from None
    if cfg.shift is not None and cfg.shift not in (*FAMILIES, *names):
        raise RecipeError(
            f"actions.shifts.shift: {cfg.shift!r} is neither a family ({', '.join(FAMILIES)})"
            f" nor one of actions.shifts.shifts ({', '.join(names)}); or leave it out to"
            " estimate the shift from the features"
        )


def check_needs(recipe) -> None:
    """Every enabled stage's inputs come from an earlier enabled stage or from a saved result
    the recipe names; otherwise a RecipeError says which stage to enable or key to set."""
    from memprune.recipes._stages import STAGES, enabled_stages

    stages = enabled_stages(recipe)
    for name in stages:
        for need, key in STAGES[name].needs(recipe):
            earlier = need in stages and stages.index(need) < stages.index(name)
            if earlier or (key is not None and _value(recipe, key)):
                continue
            where = f", or name its saved result in {key}" if key else ""
            raise RecipeError(f"the {name} stage needs the results of the {need} stage: enable"
                              f" it{where}")  # fmt: skip


def _value(recipe, key: str):
    node = recipe
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _set(data: dict, assignment: str) -> None:
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set {assignment!r}: write KEY=VALUE, e.g. actions.prune.ratios=[0.5]")
    try:
        put_key(data, key, yaml.safe_load(text))
    except ConfigError as err:
        raise RecipeError(f"--set {err}") from None


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last
    one silently, so a second ``actions:`` would drop the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise RecipeError(
                    f"line {key_node.start_mark.line + 1}: key {key!r} is given twice in one"
                    f" mapping (first at line {seen[key] + 1}); merge the two"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path):
    """A recipe file's contents; a syntax error or a repeated key as one line."""
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeys)
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or first_line(err)
        raise RecipeError(f"{path} is not valid YAML{where}: {problem}") from None


def load_recipe(path: str | os.PathLike | None = None, overrides=()) -> Recipe:
    """Read YAML at ``path`` (None: all defaults), apply ``--set`` overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe {path} does not exist (see recipes/ for examples)")
        data = read_yaml(path)
        if data is None or data == {}:
            raise RecipeError(
                f"recipe {path} is empty: start from one in recipes/ (e.g."
                " recipes/digits-resnet.yaml)"
            )
        if not isinstance(data, dict):
            raise RecipeError(
                f"{path}: a recipe is a mapping of sections, got a {type(data).__name__}"
            )
    for assignment in overrides:
        _set(data, assignment)
    return validate(data)


def schema_field(key: str) -> tuple[object, object]:
    """The type and the default of a dotted recipe key."""
    cls, tp, value = Recipe, None, None
    for part in key.split("."):
        if cls is None:
            raise ConfigError(f"{key}: {part} is not a section of the recipe")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise ConfigError(f"{key}: unknown key {part!r}; allowed: {', '.join(fields)}")
        f, tp = fields[part], typing.get_type_hints(cls)[part]
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        sections = [a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)]
        cls = sections[0] if sections else None
        if cls is not None and value is None:  # an optional section: its defaults
            value = cls()
    return tp, value


def schema_default(key: str):
    """The default of a dotted recipe key (``actions.prune.ratios``)."""
    return schema_field(key)[1]
