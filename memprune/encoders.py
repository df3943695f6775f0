"""timm encoders: creation, safe checkpoint loading, normalization and input size.

An encoder is a timm model created with ``num_classes=0`` (``E(x)`` is the pre-logits
feature), returned in ``eval()`` mode (docs/method.md §0). Weights are read with safetensors or
``torch.load(weights_only=True)``; pickled modules are refused unless the caller trusts them.
"""

from __future__ import annotations

import difflib
import os
import pickle
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from memprune.errors import CheckpointError, ConfigError, EncoderError

#: Prefixes that wrappers (DDP, SSL frameworks) put in front of a backbone's keys.
STRIP_PREFIXES = ("module.", "encoder.", "backbone.")
#: Keys under which training scripts nest a state dict.
NESTED_KEYS = ("state_dict", "model", "model_state_dict", "encoder", "backbone")
#: Input size used for plain ``nn.Module`` encoders that declare none.
DEFAULT_INPUT_SIZE = (3, 32, 32)


def load_encoder(
    name: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = False,
    img_size: int | None = None,
    trust_pickle: bool = False,
    **timm_kwargs,
) -> nn.Module:
    """Create a timm encoder (``num_classes=0``) in eval mode, optionally loading weights.

    Args:
        name: a timm model name (``timm.list_models()``), e.g. ``resnet18``,
            ``vit_tiny_patch16_224``; may be omitted when ``checkpoint`` is a memprune run.
        checkpoint: a memprune training run (its directory or ``card.json``: the model name,
            image size and timm arguments come from the card), a pruned encoder's directory
            (:func:`memprune.save_pruned`), a ``.safetensors`` file, or a
            torch file read with ``weights_only=True``.
            Nested state dicts (``state_dict``, ``model``, ...) are unwrapped, the prefixes
            ``module.``, ``encoder.``, ``backbone.`` stripped and the classifier's keys dropped
            (the encoder has none). Any other missing, unexpected or mis-shaped key is an error
            that lists them.
        pretrained: load timm's pretrained weights (needs internet).
        img_size: input resolution. Passed to timm for models that take it (ViTs); for every
            model it becomes the ``input_size`` of the model's ``pretrained_cfg``, which
            :func:`input_size` reports.
        trust_pickle: allow a checkpoint holding pickled Python objects (it can run code).
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``channels=(8, 16, 32, 64)``).
    """
    import timm

    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise ConfigError(
            f"checkpoint must be a path (str or os.PathLike), got {type(checkpoint).__name__}"
            f" {checkpoint!r}"
        )
    if checkpoint is not None and (Path(checkpoint) / "pruned.json").is_file():
        from memprune._io import read_json
        from memprune.pruning import load_pruned

        spec = read_json(Path(checkpoint) / "pruned.json")
        size = spec.get("img_size")
        if (name not in (None, spec.get("model"))) or timm_kwargs or img_size not in (None, size):
            raise EncoderError(
                f"{checkpoint} is a pruned {spec.get('model')} (img_size {size}): its structure"
                f" is fixed, so pass no other model name ({name!r}), image size ({img_size!r})"
                f" or timm arguments ({timm_kwargs}) with it"
            )
        return load_pruned(checkpoint)
    if checkpoint is not None and (Path(checkpoint).is_dir() or str(checkpoint).endswith(".json")):
        from memprune.train._common import read_card

        card, weights = read_card(checkpoint)
        if name is not None and name != card["model"]:
            raise EncoderError(f"{checkpoint} holds a {card['model']!r} encoder, not {name!r}")
        name, checkpoint = card["model"], weights
        img_size = img_size if img_size is not None else card.get("img_size")
        timm_kwargs = {**card.get("timm_kwargs", {}), **timm_kwargs}
    if name is None:
        raise EncoderError(
            "load_encoder needs a timm model name, or checkpoint=RUN_DIR of a memprune run"
        )
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        hint = f"; closest timm names: {', '.join(close)}" if close else ""
        raise EncoderError(f"unknown timm model {name!r}{hint} (see timm.list_models())")
    if img_size is not None and (not isinstance(img_size, int) or img_size < 1):
        raise ConfigError(f"img_size must be a positive int, got {img_size!r}")
    kwargs = dict(timm_kwargs, num_classes=0)
    try:
        try:
            model = timm.create_model(
                name,
                pretrained=pretrained,
                **kwargs,
                **({"img_size": img_size} if img_size else {}),
            )
        except TypeError as err:
            if img_size is None or "img_size" not in str(err):
                raise
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as err:
        raise EncoderError(f"bad arguments for timm model {name!r}: {err}") from err
    except Exception as err:  # hub errors come in many types
        if not pretrained or isinstance(err, EncoderError):
            raise
        raise EncoderError(
            f"could not fetch pretrained weights of {name!r} ({type(err).__name__}: {err});"
            " pretrained=True needs internet access; offline, pass checkpoint=PATH instead"
        ) from err
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if img_size is not None:
        cfg["input_size"] = (3, img_size, img_size)
    # how to rebuild the architecture (memprune.save_pruned)
    cfg["memprune_build"] = {"model": name, "img_size": img_size, "timm_kwargs": timm_kwargs}
    model.pretrained_cfg = cfg
    if checkpoint is not None:
        state = read_checkpoint(checkpoint, trust_pickle=trust_pickle)
        load_state(model, state, source=str(checkpoint))
    return model.eval()


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
    if path.name == "encoder.safetensors" and (path.parent / "pruned.json").is_file():
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


def normalization(
    model: nn.Module,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel ``(mean, std)`` the encoder expects its input normalized with.

    timm's ``pretrained_cfg`` when the model has one, identity (0, 1) for a plain module;
    ``mean`` / ``std`` given by the caller win.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(mean if mean is not None else cfg.get("mean", (0.0, 0.0, 0.0)))
    std = tuple(std if std is not None else cfg.get("std", (1.0, 1.0, 1.0)))
    if len(mean) != len(std) or any(s <= 0 for s in std):
        raise ConfigError(
            f"normalization needs equal-length mean/std with std > 0, got {mean}, {std}"
        )
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` the model expects: timm's ``pretrained_cfg`` or ``(3, 32, 32)``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    patch = getattr(model, "patch_embed", None)
    if patch is not None and getattr(patch, "img_size", None):  # a ViT's real size wins
        return (3, *patch.img_size)
    return tuple(size) if size else DEFAULT_INPUT_SIZE


def feature_dim(model: nn.Module, size: tuple[int, ...] | None = None) -> int:
    """Width of the encoder's output, from one dry forward pass at ``size`` (default: its input
    size). timm's ``num_features`` is not always it: a MobileNetV3's output is its
    ``head_hidden_size`` (1024 for ``mobilenetv3_small_050``, whose ``num_features`` is 288)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else "cpu"
    x = torch.zeros(1, *(size or input_size(model)), device=device)
    with evaluating(model), torch.inference_mode():
        return int(model(x).shape[-1])


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` or, when None, CUDA if available else CPU; a device that this machine does
    not have is refused with the fix."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"--device {device!r} is not a device: use cpu, cuda, cuda:N or mps"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {device}: no CUDA GPU is visible on this machine; use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPUs"
                f" (cuda:0 to cuda:{torch.cuda.device_count() - 1})"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device}: MPS is not available here; use --device cpu")
    return dev


@contextmanager
def evaluating(model: nn.Module):
    """Put ``model`` in eval mode for the block and restore each module's mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
