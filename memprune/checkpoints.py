"""Encoder checkpoints on disk: what a path holds and how to read it, without unpickling code.

Three layouts are understood (:func:`checkpoint_kind`):

* ``run``: a memprune training run, ``card.json`` (model name, image size, timm arguments,
  training record) beside ``encoder.safetensors``;
* ``pruned``: a pruned encoder, ``pruned.json`` (the base model and every resized module's
  structural sizes) beside ``encoder.safetensors``;
* ``timm``: a directory as a timm hub download leaves it, ``model.safetensors`` or
  ``pytorch_model.bin`` with (or without) its ``config.json``;
* ``weights``: a ``.safetensors`` file or a torch file read with ``weights_only=True``, as
  people's training scripts write them: a bare state dict, or a checkpoint of DINO, MoCo v3,
  MAE, solo-learn or lightly, a torchvision ResNet (:func:`read_checkpoint`,
  :func:`load_state`).

This module only reads and checks files; :func:`memprune.load_encoder` builds the model.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import pickle
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from memprune._io import read_json
from memprune.attention import fit_forwards
from memprune.errors import CheckpointError, CheckpointWarning, ConfigError

#: Keys under which training scripts nest a state dict.
NESTED_KEYS = ("state_dict", "model", "model_state_dict", "encoder", "backbone")
#: Whole models side by side in one checkpoint (DINO); the first is read unless told otherwise.
ENTRIES = ("teacher", "student")
#: Key components (shell patterns) of parts that only training uses: classifier and SSL heads,
#: projectors, predictors, MAE's decoder and mask token, momentum encoders, prototypes, queues.
HEAD_PARTS = ("head", "heads", "fc", "classifier", "projector", "projection*", "proj_head",
              "predictor", "prediction*", "decoder*", "mask_token", "momentum*", "*_momentum",
              "prototypes", "last_layer", "queue*", "*_head", "online_classifier",
              "criterion")  # fmt: skip
#: The children of a torchvision ResNet in order: ``nn.Sequential(*list(resnet.children())
#: [:-1])`` (lightly's tutorials) names its weights by these indices.
RESNET_CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
#: Weight files of a timm hub download, in timm's order of preference.
TIMM_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")

#: A training run's files (written by memprune.train).
CARD, WEIGHTS, CARD_FORMAT = "card.json", "encoder.safetensors", "memprune-encoder/1"
#: A pruned encoder's files (written by memprune.save_pruned).
SPEC, PRUNED_FORMAT = "pruned.json", "memprune-pruned/1"


def checkpoint_kind(path: str | os.PathLike) -> str:
    """``pruned``, ``run``, ``timm`` or ``weights``: what ``path`` holds (module docstring)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(
            f"checkpoint must be a path (str or os.PathLike), got {type(path).__name__} {path!r}"
        )
    path = Path(path)
    if (path / SPEC).is_file():
        return "pruned"
    timm_files = ("config.json", *TIMM_FILES)
    if (
        path.is_dir()
        and not (path / CARD).is_file()
        and any((path / f).is_file() for f in timm_files)
    ):
        return "timm"
    if path.is_dir() or path.suffix == ".json":
        return "run"
    return "weights"


def read_card(path: str | os.PathLike) -> tuple[dict, Path]:
    """The card of a training run (a run directory or its ``card.json``) and the weights path."""
    path = Path(path)
    card_path = path / CARD if path.is_dir() else path
    if not card_path.is_file():
        raise ConfigError(
            f"no encoder card at {card_path}: pass a run directory written by memprune"
            " pretraining (holding card.json and encoder.safetensors)"
        )
    card = read_json(card_path)
    if card.get("format") != CARD_FORMAT:
        raise ConfigError(
            f"{card_path} is not a memprune encoder card (format {card.get('format')!r})"
        )
    return card, card_path.parent / WEIGHTS


def read_pruned_spec(path: str | os.PathLike) -> dict:
    """The structure spec of a pruned encoder's directory."""
    path = Path(path)
    if not (path / SPEC).is_file():
        raise CheckpointError(f"{path} holds no pruned encoder ({SPEC} missing)")
    spec = read_json(path / SPEC)
    if spec.get("format") != PRUNED_FORMAT:
        raise CheckpointError(f"{path / SPEC} is not a memprune pruned-encoder spec")
    return spec


def _resize(module: nn.Module, name: str, shape: torch.Size) -> None:
    old = getattr(module, name)
    new = torch.empty(shape, dtype=old.dtype, device=old.device)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        module._buffers[name] = new


def restore_pruned(model: nn.Module, path: str | os.PathLike, spec: dict) -> nn.Module:
    """Resize the modules of the unpruned ``model`` to the saved structure and load the
    pruned weights of ``path`` into it (safetensors, no unpickling)."""
    from safetensors.torch import load_file

    modules = dict(model.named_modules())
    unknown = [n for n in spec["structure"] if n not in modules]
    if unknown:
        raise CheckpointError(f"{path}: modules {unknown[:5]} are not in {spec['model']}")
    for name, attrs in spec["structure"].items():
        for attr, value in attrs.items():
            keep_list = isinstance(getattr(modules[name], attr, None), list)  # MixedConv splits
            setattr(
                modules[name],
                attr,
                tuple(value) if isinstance(value, list) and not keep_list else value,
            )
    state = load_file(str(Path(path) / WEIGHTS))
    current = model.state_dict()
    for key, tensor in state.items():
        if key in current and current[key].shape != tensor.shape:
            owner, _, leaf = key.rpartition(".")
            _resize(modules[owner], leaf, tensor.shape)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing keys {missing[:5]}, unexpected {unexpected[:5]}")
    _check_widths(model, path)
    fit_forwards(model)  # BEiT / EVA / CaiT / ConViT / XCiT attention that lost heads
    if spec.get("mean"):
        model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(spec["mean"]),
                                "std": tuple(spec["std"])}  # fmt: skip
    return model


def _check_widths(model: nn.Module, path) -> None:
    """The widths the spec declared must be those of the weights (an edited ``pruned.json``
    would otherwise describe a model that is not the one loaded)."""
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            real = {"out_channels": w.shape[0], "in_channels": w.shape[1] * m.groups}
        elif isinstance(m, nn.Linear):
            real = {"out_features": w.shape[0], "in_features": w.shape[1]}
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            real = {"num_features": w.shape[0]}
        elif isinstance(m, nn.GroupNorm):
            real = {"num_channels": w.shape[0]}
        elif isinstance(m, nn.LayerNorm):
            real = {"normalized_shape": tuple(w.shape)}
        else:
            continue
        for attr, width in real.items():
            declared = getattr(m, attr)
            declared = tuple(declared) if isinstance(declared, (list, tuple)) else declared
            if declared != width:
                raise CheckpointError(
                    f"{path}: {SPEC} declares {name}.{attr} = {declared} but its weights hold"
                    f" {width}: the spec was edited or belongs to other weights; save the"
                    " encoder again"
                )


def _unwrap(obj, path: Path, entry: str | None):
    """The state dict inside a training script's checkpoint: ``entry`` (or DINO's ``teacher``)
    when the checkpoint holds whole models side by side, then the usual nesting keys."""
    if entry is not None:
        if not isinstance(obj, Mapping) or not isinstance(obj.get(entry), Mapping):
            found = [k for k, v in obj.items() if isinstance(v, Mapping)] if isinstance(
                obj, Mapping) else []  # fmt: skip
            raise CheckpointError(
                f"{path} has no entry {entry!r}; its entries holding weights: {found or 'none'}"
            )
        obj = obj[entry]
    elif isinstance(obj, Mapping) and all(isinstance(obj.get(e), Mapping) for e in ENTRIES):
        obj = obj[ENTRIES[0]]  # DINO: the teacher is the encoder people evaluate
    for key in NESTED_KEYS:
        while isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    held = [k for k, v in obj.items() if isinstance(v, Mapping)] if isinstance(obj, Mapping) else []
    if len(held) == 1 and str(held[0]).endswith("parameters"):  # {"resnet18_parameters": ...}
        obj = obj[held[0]]
    return obj


#: The ImageNet mean / std the reference training scripts of DINO, MAE and MoCo v3 normalize
#: with (timm's own default for some ViTs is 0.5 / 0.5).
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
#: Framework -> the architecture names its scripts record -> attention heads of that ViT (the
#: shapes of a ViT's weights do not tell the head count: a wrong one loads and computes
#: something else). MoCo v3's ViT-S has 12 heads where DINO's and timm's have 6.
FRAMEWORK_HEADS = {
    "DINO": {"vit_tiny": 3, "vit_small": 6, "vit_base": 12},
    "MoCo v3": {"vit_small": 12, "vit_base": 12, "vit_conv_small": 12, "vit_conv_base": 12},
    "MAE": {"vit_base": 12, "vit_large": 16, "vit_huge": 16},
    # solo-learn builds MoCo v3's own ViT for method mocov3, a timm-like one otherwise
    "solo-learn": {"mocov3:vit_tiny": 12, "mocov3:vit_small": 12, "mocov3:vit_base": 12,
                   "mocov3:vit_large": 16, "vit_tiny": 3, "vit_small": 6, "vit_base": 12,
                   "vit_large": 16},
}  # fmt: skip
#: solo-learn's normalization per data set (its pretraining pipelines); others: the cfg's own
#: ``data.mean`` / ``data.std``, else ImageNet's.
SOLO_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4914, 0.4823, 0.4466), (0.247, 0.243, 0.261)),
}


def _field(obj, key: str):
    """``obj[key]`` or ``obj.key`` (a dict, an argparse Namespace or an OmegaConf config)."""
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _solo_learn(obj: Mapping) -> dict:
    """solo-learn's Lightning checkpoint: ``hyper_parameters.cfg`` names the backbone, the
    method and the data set (an OmegaConf config: readable only with ``trust_pickle``)."""
    cfg = _field(_field(obj, "hyper_parameters"), "cfg")
    name = _field(_field(cfg, "backbone"), "name")
    if not isinstance(name, str):
        return {}
    method = str(_field(cfg, "method") or "")
    info = {"framework": "solo-learn", "arch": f"{method}:{name}" if method == "mocov3" else name}
    data = _field(cfg, "data")
    dataset = str(_field(data, "dataset") or "").lower()
    mean, std = _field(data, "mean"), _field(data, "std")
    if dataset in SOLO_STATS:
        info["mean"], info["std"] = SOLO_STATS[dataset]
    elif mean is not None and std is not None:
        info["mean"], info["std"] = tuple(mean), tuple(std)
    return info


def framework_info(obj) -> dict:
    """What a training script's checkpoint says about itself: ``framework`` (DINO: teacher and
    student with ``args``; MAE: ``model`` with ``args.model``; MoCo v3: ``arch`` with
    ``state_dict``; solo-learn: Lightning's ``hyper_parameters.cfg``), the ``arch`` it records
    and, where it says, the ``mean`` / ``std`` it trained with; empty for anything else."""
    if not isinstance(obj, Mapping):
        return {}
    args = obj.get("args")
    if all(isinstance(obj.get(e), Mapping) for e in ENTRIES) and hasattr(args, "arch"):
        return {"framework": "DINO", "arch": str(args.arch)}
    if isinstance(obj.get("model"), Mapping) and isinstance(getattr(args, "model", None), str):
        return {"framework": "MAE", "arch": args.model}
    if isinstance(obj.get("arch"), str) and isinstance(obj.get("state_dict"), Mapping):
        return {"framework": "MoCo v3", "arch": obj["arch"]}
    if "hyper_parameters" in obj and isinstance(obj.get("state_dict"), Mapping):
        return _solo_learn(obj)
    return {}


def read_checkpoint(
    path: str | os.PathLike, trust_pickle: bool = False, entry: str | None = None
) -> dict[str, torch.Tensor]:
    """Read a state dict of tensors from a safetensors or torch file, without unpickling code.

    A torch file may nest the state dict (``state_dict``, ``model``, ...: MoCo v3, MAE,
    Lightning/solo-learn) or hold several models (DINO's ``teacher`` and ``student``: the
    teacher unless ``entry`` names another); ``argparse.Namespace`` (the ``args`` DINO and MAE
    save) is the one non-tensor class allowed, since it only holds plain values.
    """
    return read_checkpoint_info(path, trust_pickle, entry)[0]


def read_checkpoint_info(
    path: str | os.PathLike, trust_pickle: bool = False, entry: str | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """:func:`read_checkpoint` and what the checkpoint says about its training
    (:func:`framework_info`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): save the weights again")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), {}
        except Exception as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(
                f"cannot read checkpoint {path} ({reason}): the file is truncated or not"
                " safetensors; save or copy it again"
            ) from err
    if path.name == WEIGHTS and (path.parent / SPEC).is_file():
        raise CheckpointError(f"{path} is a pruned encoder: pass its directory {path.parent}")
    with open(path, "rb") as fh:
        head = fh.read(2)
    if not (head == b"PK" or head[:1] == b"\x80"):  # a torch zip archive, or a legacy pickle
        raise CheckpointError(
            f"{path} is not a torch or safetensors checkpoint (it starts with {head!r});"
            " pass a .safetensors file, a torch state dict (.pt/.pth) or a memprune run"
        )
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            raise CheckpointError(
                f"{path} holds pickled Python objects, not only tensors; unpickling can run"
                " arbitrary code. Re-save its state_dict with safetensors, or pass"
                " trust_pickle=True (CLI: --trust-pickle) if you trust its source"
            ) from err
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path} ({reason}): the file is truncated or corrupt;"
            " save or copy it again"
        ) from err
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    info = framework_info(obj)
    obj = _unwrap(obj, path, entry)
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors: it holds"
                              f" {_describe(obj)}. {_what_to_do(obj)}")  # fmt: skip
    return dict(obj), info


def _describe(obj) -> str:
    """What a loaded object is, in a few words (a mapping: its keys and their types)."""
    if not isinstance(obj, Mapping):
        return f"a {type(obj).__name__}"
    kinds = [f"{k!r} ({type(v).__name__})" for k, v in list(obj.items())[:6]]
    more = f", ... ({len(obj)} keys)" if len(obj) > 6 else ""
    return "a mapping of " + ", ".join(kinds) + more if kinds else "an empty mapping"


def _what_to_do(obj) -> str:
    nested = (
        [k for k, v in obj.items() if isinstance(v, Mapping)] if isinstance(obj, Mapping) else []
    )
    if nested:
        return (f"Its entries holding mappings: {', '.join(map(repr, nested[:6]))}; pass the one"
                " holding the encoder's weights as entry= (CLI: --entry)")  # fmt: skip
    return "Save the encoder's state_dict() (safetensors or torch.save) and pass that file"


def read_timm_dir(path: str | os.PathLike) -> tuple[str | None, dict, dict, Path]:
    """What a timm hub download (or ``timm``'s ``save_for_hf``) left in a directory: the model
    name, its arguments and pretrained config (from ``config.json``, read by timm; None, {}, {}
    without one) and the weights file (timm's order of preference)."""
    from timm.models._hub import load_model_config_from_path

    path = Path(path)
    weights = next((path / f for f in TIMM_FILES if (path / f).is_file()), None)
    if weights is None:
        raise CheckpointError(
            f"{path} holds a timm config.json but no weights ({' or '.join(TIMM_FILES)})"
        )
    if not (path / "config.json").is_file():
        return None, {}, {}, weights
    cfg, name, args = load_model_config_from_path(path)
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    args.pop("num_classes", None)
    return name, args, cfg, weights


def _best_prefix(keys: list[str], own: set[str]) -> str:
    """The key prefix (ending at a dot, maybe empty) whose removal makes most keys the
    model's own: ``module.base_encoder.`` (MoCo v3), ``backbone.`` (DINO, solo-learn,
    lightly), ``module.backbone.`` (DINO's student); of two full copies (lightly's
    ``teacher_backbone.`` and ``student_backbone.``), the teacher's."""
    candidates = {""}
    for key in keys:
        parts = key.split(".")
        candidates.update(".".join(parts[:i]) + "." for i in range(1, min(len(parts), 4)))

    def hits(prefix):  # fmt: skip
        return sum(k.startswith(prefix) and k[len(prefix) :] in own for k in keys)

    order = sorted(candidates, key=lambda p: ("teacher" not in p, len(p)))
    return max(order, key=hits)


def _copies(keys: list[str], prefix: str, own: set[str]) -> set[str]:
    """Prefixes other than ``prefix`` under which a whole copy of the model's keys stands
    (the student or momentum copy of the encoder, next to the one loaded)."""
    out = set()
    for key in keys:
        for own_key in own:
            if key.endswith("." + own_key) and not key.startswith(prefix):
                out.add(key[: -len(own_key)])
    return {p for p in out if all(p + k in keys for k in own)}


def _children_of_sequential(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict:
    """A torchvision ResNet's weights as ``nn.Sequential(*children)`` names them (``0.`` the
    stem conv, ``4.0.conv1.`` a block of layer1, after any prefix), renamed to the model's
    children: for a timm (or torchvision) ResNet only; other models get ``state`` back."""
    if not all(hasattr(model, name) for name in ("conv1", "bn1", "layer1", "layer4")):
        return dict(state)
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        at = next((i for i, p in enumerate(parts[:-1]) if p.isdigit()), None)
        if at is not None and int(parts[at]) < len(RESNET_CHILDREN):
            parts[at] = RESNET_CHILDREN[int(parts[at])]
        out[".".join(parts)] = value
    return out


def _head_part(key: str, classifiers: tuple[str, ...]) -> str | None:
    """The prefix of ``key`` up to its first component naming a training-only part (a head,
    projector, predictor, decoder, momentum copy, or the model's own ``classifiers``)."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if any(fnmatch.fnmatchcase(part, pattern) for pattern in HEAD_PARTS):
            return ".".join(parts[: i + 1])
    return next((c for c in classifiers if key.startswith(c + ".")), None)


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


#: strict=False loads a checkpoint only if at least this share of the encoder's weights (its
#: floating-point parameter and buffer elements) comes from it.
MIN_LOADED = 0.5


def _loaded_share(own: Mapping[str, torch.Tensor], matched: Mapping[str, torch.Tensor]) -> float:
    """The share of ``own``'s floating-point elements that ``matched`` provides."""
    total = sum(v.numel() for v in own.values() if v.is_floating_point())
    got = sum(own[k].numel() for k in matched if own[k].is_floating_point())
    return got / total if total else 1.0


def _match(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]):
    """The best prefix of ``state``'s keys, and the tensors under it that the model has."""
    keys = list(state)
    prefix = _best_prefix(keys, set(own))
    return prefix, {k[len(prefix) :]: state[k] for k in keys if k.startswith(prefix)
                    and k[len(prefix) :] in own}  # fmt: skip


def _match_layout(model: nn.Module, state, own, source: str):
    """``(state, prefix, matched)`` of the layout that fits the model best: the keys as they
    are, or (lightly's Sequential backbone) renamed to a torchvision ResNet's children."""
    prefix, matched = _match(state, own)
    renamed = _children_of_sequential(model, state)
    if len(matched) < len(own) / 2 and set(renamed) != set(state):
        again = _match(renamed, own)
        if len(again[1]) > len(matched):
            warnings.warn(f"{source}: read as the children of a torchvision ResNet in an"
                          " nn.Sequential (0: conv1, 1: bn1, 4-7: layer1-4)", CheckpointWarning,
                          stacklevel=4)  # fmt: skip
            return renamed, *again
    return state, prefix, matched


def load_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str = "state",
    strict: bool = True,
) -> None:
    """Load ``state`` into ``model``: the backbone's keys are found under the prefix that
    matches the model best, training-only parts (heads, projectors, predictors, decoders,
    momentum copies; :data:`HEAD_PARTS`) are dropped and listed in one warning, and any other
    missing, unexpected or mis-shaped key is an error that lists them all (``strict=False``: a
    warning, and the matching tensors are loaded)."""
    own = model.state_dict()
    state, prefix, matched = _match_layout(model, state, own, source)
    keys = list(state)
    if not matched:
        raise CheckpointError(
            f"{source} holds no weights of a {type(model).__name__} (its keys: {_listing(keys, 4)};"
            f" the model's: {_listing(list(own), 4)}): pass the model name the checkpoint was"
            " trained as, and its arguments"
        )
    rest = [k for k in keys if not (k.startswith(prefix) and k[len(prefix) :] in own)]
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    copies = _copies(rest, prefix, set(own))
    heads = {k: next((c[:-1] for c in copies if k.startswith(c)), None)
             or _head_part(k, classifiers) for k in rest}  # fmt: skip
    dropped = [k for k in rest if heads[k]]
    if dropped:
        counts = Counter(heads[k] for k in dropped)
        parts = [f"{part} ({n})" for part, n in sorted(counts.items())]
        warnings.warn(
            f"{source}: dropped {len(dropped)} keys of training-only parts (not the encoder):"
            f" {_listing(parts, 6)}",
            CheckpointWarning,
            stacklevel=3,
        )
    missing = sorted(set(own) - set(matched))
    unexpected = sorted(k for k in rest if not heads[k])
    shapes = sorted(
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in matched.items()
        if v.shape != own[k].shape
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_listing(shapes)}")
        message = f"{source} does not fit {type(model).__name__}: " + "; ".join(parts)
        if strict:
            raise CheckpointError(
                message + ". Check the model name and its arguments (e.g. img_size), or pass"
                " strict=False to load the matching tensors only"
            )
        matched = {k: v for k, v in matched.items() if v.shape == own[k].shape}
        share = _loaded_share(own, matched)
        if share < MIN_LOADED:
            raise CheckpointError(
                message + f". strict=False would load only {100 * share:.1f}% of the encoder's"
                f" weights (at least {100 * MIN_LOADED:.0f}% must come from the checkpoint, or"
                " the encoder is mostly its random init): check the model name and its"
                " arguments"
            )
        warnings.warn(message + f" (strict=False: the {len(matched)} matching tensors are"
                      f" loaded, {100 * share:.1f}% of the encoder's weights; the rest keep"
                      " their random init)", CheckpointWarning, stacklevel=3)  # fmt: skip
    bad = [k for k, v in matched.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"{source} holds NaN or inf values in {len(bad)} tensors ({_listing(bad, 3)}):"
            " the training that wrote it diverged; use an earlier checkpoint"
        )
    model.load_state_dict(matched, strict=strict)
