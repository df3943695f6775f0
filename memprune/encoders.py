"""timm encoders: creation, safe checkpoint loading, normalization and input size.

An encoder is a timm model created with ``num_classes=0`` (``E(x)`` is the pre-logits
feature), returned in ``eval()`` mode (docs/method.md §0). Weights are read with safetensors or
``torch.load(weights_only=True)``; pickled modules are refused unless the caller trusts them.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from memprune.checkpoints import (
    FRAMEWORK_HEADS,
    IMAGENET,
    checkpoint_kind,
    load_state,
    read_card,
    read_checkpoint_info,
    read_pruned_spec,
    read_timm_dir,
    restore_pruned,
)
from memprune.errors import CheckpointError, CheckpointWarning, ConfigError, EncoderError

#: Input size used for plain ``nn.Module`` encoders that declare none.
DEFAULT_INPUT_SIZE = (3, 32, 32)


def create_encoder(
    name: str, pretrained: bool = False, img_size: int | None = None, **timm_kwargs
) -> nn.Module:
    """A timm model (``num_classes=0``, eval mode) that records how it was built.

    ``img_size`` goes to timm for models that take it (ViTs) and, for every model, becomes the
    ``input_size`` of its ``pretrained_cfg`` (what :func:`input_size` reports). The build
    (name, size, timm arguments) is stamped into ``pretrained_cfg["memprune_build"]`` so a
    pruned copy can be rebuilt from it.

    ``cifar_stem=True`` (among the timm arguments, so that it travels with them) gives a
    ResNet the CIFAR stem of solo-learn and most CIFAR SSL code: a 3x3 ``conv1`` with stride 1
    and padding 2, and no max-pool.
    """
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        hint = f"; closest timm names: {', '.join(close)}" if close else ""
        raise EncoderError(f"unknown timm model {name!r}{hint} (see timm.list_models())")
    if img_size is not None and (not isinstance(img_size, int) or img_size < 1):
        raise ConfigError(f"img_size must be a positive int, got {img_size!r}")
    args = {k: v for k, v in timm_kwargs.items() if k != "cifar_stem"}
    model = _create(name, pretrained, img_size, dict(args, num_classes=0))
    if timm_kwargs.get("cifar_stem"):
        _cifar_stem(model, name)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if img_size is not None:
        cfg["input_size"] = (3, img_size, img_size)
    cfg["memprune_build"] = {"model": name, "img_size": img_size, "timm_kwargs": timm_kwargs}
    model.pretrained_cfg = cfg
    return model.eval()


def _cifar_stem(model: nn.Module, name: str) -> None:
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ConfigError(
            f"cifar_stem=True is for ResNets (a conv1 and a maxpool); {name} has none"
        )
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=2,
                            bias=False)  # fmt: skip
    model.maxpool = nn.Identity()


def _create(name: str, pretrained: bool, img_size: int | None, kwargs: dict) -> nn.Module:
    """``timm.create_model``, passing ``img_size`` only to models that accept it."""
    import timm

    try:
        try:
            size = {"img_size": img_size} if img_size else {}
            return timm.create_model(name, pretrained=pretrained, **kwargs, **size)
        except TypeError as err:
            if img_size is None or "img_size" not in str(err):
                raise
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as err:
        raise EncoderError(f"bad arguments for timm model {name!r}: {err}") from err
    except Exception as err:  # hub errors come in many types
        if not pretrained or isinstance(err, EncoderError):
            raise
        raise EncoderError(
            f"could not fetch pretrained weights of {name!r} ({type(err).__name__}: {err});"
            " pretrained=True needs internet access; offline, pass checkpoint=PATH instead"
        ) from err


def _from_pruned(path, name, img_size, options, timm_kwargs) -> nn.Module:
    spec = read_pruned_spec(path)
    size = spec.get("img_size")
    if (name not in (None, spec.get("model"))) or timm_kwargs or img_size not in (None, size):
        raise EncoderError(
            f"{path} is a pruned {spec.get('model')} (img_size {size}): its structure"
            f" is fixed, so pass no other model name ({name!r}), image size ({img_size!r})"
            f" or timm arguments ({timm_kwargs}) with it"
        )
    base = create_encoder(spec["model"], img_size=size, **spec["timm_kwargs"])
    return restore_pruned(base, path, spec).eval()


def _from_run(path, name, img_size, options, timm_kwargs) -> nn.Module:
    card, weights = read_card(path)
    if name is not None and name != card["model"]:
        raise EncoderError(f"{path} holds a {card['model']!r} encoder, not {name!r}")
    img_size = img_size if img_size is not None else card.get("img_size")
    timm_kwargs = {**card.get("timm_kwargs", {}), **timm_kwargs}
    return _from_weights(weights, card["model"], img_size, options, timm_kwargs)


def _from_timm(path, name, img_size, options, timm_kwargs) -> nn.Module:
    saved, args, cfg, weights = read_timm_dir(path)
    if name is None and saved is None:
        raise EncoderError(
            f"{path} has timm weights but no config.json naming the model: pass its timm name"
        )
    if name is not None and saved is not None and name != saved:
        raise EncoderError(f"{path} holds a {saved!r} (its config.json), not {name!r}")
    saved_size = args.pop("img_size", None)  # timm's save_for_hf writes a ViT's as [H, W]
    if isinstance(saved_size, (tuple, list)) and len(set(saved_size)) == 1:
        saved_size = int(saved_size[0])
    if isinstance(saved_size, (tuple, list)):  # not square: timm takes it as it is
        args["img_size"] = saved_size
    elif img_size is None:
        img_size = saved_size
    model = _from_weights(weights, name or saved, img_size, options, {**args, **timm_kwargs})
    keep = ("mean", "std", "interpolation", "crop_pct", "crop_mode")
    model.pretrained_cfg = {**model.pretrained_cfg, **{k: cfg[k] for k in keep if k in cfg}}
    if img_size is None and cfg.get("input_size"):
        model.pretrained_cfg["input_size"] = tuple(cfg["input_size"])
    return model


def _from_weights(path, name, img_size, options, timm_kwargs) -> nn.Module:
    if name is None:
        if path is not None and not Path(path).exists():
            raise CheckpointError(f"checkpoint {path} does not exist")
        raise EncoderError(
            "load_encoder needs a timm model name, or checkpoint=RUN_DIR of a memprune run"
        )
    model = create_encoder(name, options["pretrained"], img_size, **timm_kwargs)
    if path is not None:
        state, info = read_checkpoint_info(path, options["trust_pickle"], options["entry"])
        stem = getattr(model, "conv1", None)
        seven = isinstance(stem, nn.Conv2d) and stem.kernel_size == (7, 7)
        if seven and _has_cifar_stem(state) and not timm_kwargs.get("cifar_stem"):
            warnings.warn(
                f"{path}: its conv1 is 3x3: read as the CIFAR stem of solo-learn (a 3x3 conv1,"
                " stride 1, padding 2, and no max-pool; timm argument cifar_stem=True)",
                CheckpointWarning,
                stacklevel=4,
            )
            timm_kwargs = {**timm_kwargs, "cifar_stem": True}
            model = create_encoder(name, options["pretrained"], img_size, **timm_kwargs)
        load_state(model, state, source=str(path), strict=options["strict"])
        _framework(model, info, path)
    return model.eval()


def _has_cifar_stem(state) -> bool:
    """Whether a ResNet checkpoint's stem conv (``conv1``, not a block's) is 3x3."""

    def stem(key: str) -> bool:  # conv1 of the model, not of a block (layerN.i., or N.i.)
        parts = key.split(".")
        return parts[-2:] == ["conv1", "weight"] and not any(
            p.isdigit() or p.startswith("layer") for p in parts[:-2])  # fmt: skip

    stems = [v for k, v in state.items() if stem(k) and getattr(v, "ndim", 0) == 4]
    return bool(stems) and tuple(stems[0].shape[-2:]) == (3, 3)


def _framework(model: nn.Module, info: dict, path) -> None:
    """What a framework's checkpoint implies beyond its tensors: the head count of the ViT it
    records (warned about when the encoder's differs) and the ImageNet normalization its
    reference scripts train with (used, and said, where timm's default differs)."""
    framework, arch = info.get("framework"), str(info.get("arch") or "")
    if framework is None:
        return
    table = FRAMEWORK_HEADS.get(framework, {})
    heads = [table[arch]] if arch in table else [n for a, n in table.items() if a in arch]
    attn = getattr(next(iter(getattr(model, "blocks", [])), None), "attn", None)
    have = getattr(attn, "num_heads", None)
    if heads and have is not None and have != heads[0]:
        warnings.warn(
            f"{path}: {framework}'s {arch} has {heads[0]} attention heads, this encoder has"
            f" {have}; the weights fit either way (their shapes do not tell heads apart) but"
            f" compute something else: pass num_heads={heads[0]} (CLI: --timm"
            f" num_heads={heads[0]})",
            CheckpointWarning,
            stacklevel=4,
        )
    own = "mean" in info and "std" in info
    mean, std = (tuple(info["mean"]), tuple(info["std"])) if own else IMAGENET
    which = "the mean/std its config records" if own else "the ImageNet mean/std"
    default = normalization(model)
    if default != (mean, std):
        warnings.warn(
            f"{path}: {framework} trained with {which} {mean, std}, not this model's timm"
            f" default {default}: using them (pass mean= and std= to choose others)",
            CheckpointWarning,
            stacklevel=4,
        )
    _set_normalization(model, mean, std, f"{framework} checkpoint ({which})")


def _set_normalization(model: nn.Module, mean, std, source: str) -> None:
    mean, std = normalization(model, tuple(mean), tuple(std))  # checked
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": mean, "std": std,
                            "memprune_normalization": source}  # fmt: skip


#: What a checkpoint path holds (:func:`memprune.checkpoints.checkpoint_kind`) -> its loader.
LOADERS = {"pruned": _from_pruned, "run": _from_run, "timm": _from_timm, "weights": _from_weights}


def load_encoder(
    name: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = False,
    img_size: int | None = None,
    trust_pickle: bool = False,
    entry: str | None = None,
    strict: bool = True,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    **timm_kwargs,
) -> nn.Module:
    """Create a timm encoder (``num_classes=0``) in eval mode, optionally loading weights.

    Args:
        name: a timm model name (``timm.list_models()``), e.g. ``resnet18``,
            ``vit_tiny_patch16_224``; may be omitted when ``checkpoint`` records it.
        checkpoint: what people have on disk:

            * a memprune training run (its directory or ``card.json``: the model name, image
              size and timm arguments come from the card), or a pruned encoder's directory
              (:func:`memprune.save_pruned`);
            * a timm hub download: a directory with ``model.safetensors`` or
              ``pytorch_model.bin`` and (optionally) ``config.json``, which names the model,
              its arguments and normalization, so timm's pretrained weights work offline;
            * a ``.safetensors`` file or a torch file read with ``weights_only=True``: a state
              dict, or the checkpoint of DINO (``teacher``/``student``), MoCo v3
              (``state_dict``, ``module.base_encoder.``), MAE (``model``), solo-learn / lightly
              (``backbone.``), a torchvision ResNet (same keys as timm's).

            The backbone's keys are found under the prefix that fits the model best; the keys
            of training-only parts (heads, projectors, predictors, decoders, momentum
            encoders) are dropped and listed in one :class:`~memprune.errors.CheckpointWarning`;
            any other missing, unexpected or mis-shaped key is an error that lists them.
        pretrained: load timm's pretrained weights (needs internet).
        img_size: input resolution (see :func:`create_encoder`).
        trust_pickle: allow a checkpoint holding pickled Python objects (it can run code).
        entry: which model of a checkpoint holding several (DINO: ``teacher``, the default,
            or ``student``).
        strict: False loads the tensors that fit and warns about the rest instead of failing
            (refused when less than half of the encoder's weights would come from the file).
        mean, std: the per-channel normalization of the encoder's input (default: what the
            checkpoint says: a timm config, or the ImageNet statistics of DINO / MAE / MoCo v3
            checkpoints; else timm's default for the model). Recorded in
            ``pretrained_cfg["memprune_normalization"]`` and in every score's metadata.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``channels=(8, 16, 32, 64)``).
    """
    options = {"pretrained": pretrained, "trust_pickle": trust_pickle, "entry": entry,
               "strict": strict}  # fmt: skip
    loader = _from_weights if checkpoint is None else LOADERS[checkpoint_kind(checkpoint)]
    model = loader(checkpoint, name, img_size, options, timm_kwargs)
    if (mean is None) != (std is None):
        raise ConfigError(f"give mean and std together, got mean={mean!r}, std={std!r}")
    if mean is not None:
        _set_normalization(model, mean, std, "given")
    return model


def weights_hash(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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


def check_input_size(model: nn.Module, hw: tuple[int, int]) -> None:
    """Refuse images of a size the encoder cannot take (a ViT built for a fixed input size),
    naming both sizes and the fix, instead of timm's bare assertion."""
    patch = getattr(model, "patch_embed", None)
    size = tuple(getattr(patch, "img_size", None) or ())
    fixed = getattr(patch, "strict_img_size", False) and not getattr(patch, "dynamic_img_size", 0)
    if size and fixed and tuple(hw) != size:
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "encoder")
        raise ConfigError(
            f"{arch} takes {size[0]}x{size[1]} images (it was built at img_size {size[0]}), got"
            f" {hw[0]}x{hw[1]}: load the data at its size (recipes: data.img_size; CLI:"
            f" --img-size {size[0]}, which also resizes the built-in data sets) or build the"
            f" encoder at the data's (img_size={hw[0]})"
        )


def eval_transform(model: nn.Module):
    """The encoder's own eval preprocessing, from timm's data config: resize to the input size
    over ``crop_pct``, centre crop to the input size, with the model's interpolation (ResNet-50
    at 224: bicubic resize to 235, crop 224). It ends in a float tensor in ``[0, 1]`` without
    normalization: memprune normalizes after augmentation, inside scoring. Pass it as
    ``load_dataset(..., transform=eval_transform(model))``."""
    from timm.data import create_transform, resolve_data_config
    from torchvision.transforms import v2

    cfg = resolve_data_config({}, model=model)
    base = create_transform(cfg["input_size"], is_training=False, normalize=False,
                            interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"],
                            crop_mode=cfg.get("crop_mode"))  # fmt: skip
    return v2.Compose([base, v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


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
