"""Save and rebuild pruned encoders without pickling: weights + a structure spec."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from memprune._dist import agree, is_main
from memprune._io import package_versions, write_json, write_safetensors
from memprune.checkpoints import PRUNED_FORMAT, SPEC, WEIGHTS, checkpoint_kind
from memprune.encoders import load_encoder
from memprune.errors import CheckpointError, ConfigError
from memprune.pruning._ablate import ABLATED
from memprune.pruning._heads import WIDTH_ATTRS

#: Structural attributes that pruning changes (torch layers, timm attention and mixed convs).
_ATTRS = (
    "in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
    "normalized_shape", "num_groups", "num_channels", "num_heads", "head_dim", "splits",
    "bias_shape",
    *WIDTH_ATTRS,
)  # fmt: skip


def _structure(model: nn.Module) -> dict[str, dict]:
    out = {}
    for name, mod in model.named_modules():
        own = vars(mod)  # plain attributes only (not properties computed from them)
        attrs = {a: own[a] for a in _ATTRS if isinstance(own.get(a), (int, tuple, list))}
        if attrs:
            out[name] = {a: list(v) if isinstance(v, tuple) else v for a, v in attrs.items()}
    return out


def build_info(model: nn.Module) -> dict:
    """How ``model`` was built: the timm name, image size and timm arguments recorded by
    :func:`memprune.load_encoder`."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    build = cfg.get("memprune_build")
    if not build:
        raise ConfigError(
            "this encoder does not record the timm name it was built from: create it with"
            " memprune.load_encoder(...) so that save_pruned can rebuild it"
        )
    return build


def save_pruned(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``PATH/encoder.safetensors`` and ``PATH/pruned.json`` (the timm name and arguments
    it was built from, every module's structural sizes, and its normalization) atomically.

    A ``PATH`` that already holds an encoder is refused unless ``overwrite``; the spec is
    written last, so an interrupted save never leaves a loadable mix of old and new.
    """
    path = Path(path)
    if getattr(model, ABLATED, None):
        raise ConfigError(
            "this encoder is an ablated copy (memprune.ablate): its zeroed units are forward"
            " hooks, which the weights do not hold; save the original encoder and the units"
        )
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"{path} is a file: save_pruned writes a directory (encoder.safetensors and"
            " pruned.json); choose a directory path"
        )
    # the main process decides (under a launcher it may already have written this very save)
    if agree((path / SPEC).exists() or (path / WEIGHTS).exists()):
        if not overwrite:
            raise ConfigError(
                f"{path} already holds an encoder; choose a new directory or overwrite=True"
            )
        if is_main():  # the other processes of a launcher write nothing
            (path / SPEC).unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    spec = {
        "format": PRUNED_FORMAT,
        **build_info(model),
        "mean": list(cfg.get("mean", ())),
        "std": list(cfg.get("std", ())),
        "input_size": list(cfg.get("input_size", ())),
        "structure": _structure(model),
        "versions": package_versions(),
    }
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_safetensors(path / WEIGHTS, state)
    write_json(path / SPEC, spec)  # written last: its presence marks a complete save
    return path


def load_pruned(path: str | os.PathLike, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild a pruned encoder saved by :func:`save_pruned`: the base timm model is created
    from its name, its modules are resized to the saved structure and the weights loaded
    (safetensors, no unpickling). Outputs equal the saved model's exactly. The same as
    ``memprune.load_encoder(checkpoint=path)``."""
    if checkpoint_kind(path) != "pruned":
        raise CheckpointError(f"{path} holds no pruned encoder ({SPEC} missing)")
    model = load_encoder(checkpoint=path)
    return model if device is None else model.to(device)
