"""Encoder checkpoints on disk: what a path holds and how to read it, without unpickling code.

Three layouts are understood (:func:`checkpoint_kind`):

* ``run``: a memprune training run, ``card.json`` (model name, image size, timm arguments,
  training record) beside ``encoder.safetensors``;
* ``pruned``: a pruned encoder, ``pruned.json`` (the base model and every resized module's
  structural sizes) beside ``encoder.safetensors``;
* ``weights``: a bare ``.safetensors`` file or a torch state dict read with
  ``weights_only=True`` (nested dicts unwrapped, wrapper prefixes stripped).

This module only reads and checks files; :func:`memprune.load_encoder` builds the model.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from memprune._io import read_json
from memprune.errors import CheckpointError, ConfigError

#: Prefixes that wrappers (DDP, SSL frameworks) put in front of a backbone's keys.
STRIP_PREFIXES = ("module.", "encoder.", "backbone.")
#: Keys under which training scripts nest a state dict.
NESTED_KEYS = ("state_dict", "model", "model_state_dict", "encoder", "backbone")

#: A training run's files (written by memprune.train).
CARD, WEIGHTS, CARD_FORMAT = "card.json", "encoder.safetensors", "memprune-encoder/1"
#: A pruned encoder's files (written by memprune.save_pruned).
SPEC, PRUNED_FORMAT = "pruned.json", "memprune-pruned/1"


def checkpoint_kind(path: str | os.PathLike) -> str:
    """``pruned``, ``run`` or ``weights``: what ``path`` holds (see the module docstring)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(
            f"checkpoint must be a path (str or os.PathLike), got {type(path).__name__} {path!r}"
        )
    path = Path(path)
    if (path / SPEC).is_file():
        return "pruned"
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
            setattr(modules[name], attr, tuple(value) if isinstance(value, list) else value)
    state = load_file(str(Path(path) / WEIGHTS))
    current = model.state_dict()
    for key, tensor in state.items():
        if key in current and current[key].shape != tensor.shape:
            owner, _, leaf = key.rpartition(".")
            _resize(modules[owner], leaf, tensor.shape)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing keys {missing[:5]}, unexpected {unexpected[:5]}")
    if spec.get("mean"):
        model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(spec["mean"]),
                                "std": tuple(spec["std"])}  # fmt: skip
    return model


def read_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict of tensors from a safetensors or torch file, without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): save the weights again")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
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
    for key in NESTED_KEYS:
        while isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def _strip_prefixes(state: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    """Strip a wrapper prefix wherever that makes the key one the model has."""
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if any(k.startswith(prefix) and k not in wanted for k in state):
                new = {}
                for k, v in state.items():
                    short = k[len(prefix) :]
                    new[short if k.startswith(prefix) and k not in wanted else k] = v
                if len(new) == len(state) and new != state:
                    state, changed = new, True
    return state


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "state") -> None:
    """Load ``state`` into ``model`` strictly, after unwrapping; errors list every mismatch."""
    own = model.state_dict()
    state = _strip_prefixes(dict(state), set(own))
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    state = {
        k: v for k, v in state.items() if k in own or not any(k.startswith(h + ".") for h in heads)
    }
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_listing(shapes)}")
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: "
            + "; ".join(parts)
            + ". Check the model name and its arguments (e.g. img_size)."
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"{source} holds NaN or inf values in {len(bad)} tensors ({_listing(bad, 3)}):"
            " the training that wrote it diverged; use an earlier checkpoint"
        )
    model.load_state_dict(state, strict=True)
