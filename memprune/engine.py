"""The scoring loop shared by every score: views -> normalize -> one forward -> hooks.

Batches are laid out ``[points, views]``: a batch of B points with K views each is one forward
pass of ``B*K`` images, and every site's reduced activations come back as ``[B, K, D]`` so a
score can average the views of a point before anything else (docs/method.md §2).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from memprune._dist import process_state, rank_world, shard
from memprune._io import package_versions
from memprune.data import VIEW_PLACES, dataset_name, describe_augment, loop_views, view_place
from memprune.encoders import (
    check_input_size,
    evaluating,
    normalization,
    resolve_device,
    weights_hash,
)
from memprune.errors import ConfigError
from memprune.hooks import capture
from memprune.registry import Registry
from memprune.sites import Site

#: ``precision``: what the encoders compute in while scoring and extracting features. Every
#: statistic is accumulated in float32 or float64 whatever the encoder computes in.
PRECISIONS = Registry("precision", {
    "auto": "bf16 on a CUDA device that supports it, else fp32",
    "fp32": "float32 throughout",
    "bf16": "bfloat16 autocast for the forward pass (also on the CPU, where it is rarely faster)",
})  # fmt: skip


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None: float32, no autocast)."""
    PRECISIONS.check(precision)
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else None
    return torch.bfloat16 if precision == "bf16" else None


def loader_options(device: torch.device, num_workers: int | None = None) -> dict:
    """DataLoader settings chosen by device; ``num_workers`` overrides the worker count.

    CPU: no workers (the views are made by the process that scores them: on a few shared cores
    workers only add copies and contention). Accelerator: the machine's cores shared among
    this machine's processes (at most 8 each), pinned memory for asynchronous copies, and 4
    batches prefetched per worker. Views never depend on these settings.
    """
    if num_workers is None:
        if device.type == "cpu":
            num_workers = 0
        else:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            num_workers = max(1, min(8, (os.cpu_count() or 2) // local - 1))
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"num_workers must be an int >= 0 or None, got {num_workers!r}")
    options = {"num_workers": num_workers, "pin_memory": device.type == "cuda"}
    if num_workers > 0:
        options["prefetch_factor"] = 4
    return options


def uses_channels_last(model: nn.Module, device: torch.device) -> bool:
    """Whether ``model`` runs faster in ``channels_last``: a CNN (it has 2-D convolutions beyond
    a patch embedding) on CUDA, where cuDNN's NHWC kernels serve bf16 best."""
    if device.type != "cuda":
        return False
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return len(convs) > 1


@contextmanager
def fast_layout(model: nn.Module, device: torch.device) -> Iterator[bool]:
    """``model`` in ``channels_last`` while the block runs when :func:`uses_channels_last`,
    then back in the default layout (a saved or pruned model sees its usual strides)."""
    if not uses_channels_last(model, device):
        yield False
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield True
    finally:
        model.to(memory_format=torch.contiguous_format)


@dataclass(frozen=True)
class Compute:
    """How a pass over the data runs. Every field but ``precision`` leaves the result exactly
    as it is; ``precision="bf16"`` rounds the encoder's activations (the statistics are still
    accumulated in float32 / float64).

    Attributes:
        chunk_size: points per forward pass (each with all its views).
        device: default: the launcher's device, else the encoder's accelerator, else CUDA if
            available, else CPU.
        num_workers: DataLoader workers making the views (views do not depend on it); None:
            by device (:func:`loader_options`).
        progress: progress bar; None shows it on a TTY only.
        precision: ``auto`` (bf16 on a CUDA device that supports it, else fp32), ``fp32`` or
            ``bf16``.
        views: where augmented views are made: ``auto`` (in batches on a CUDA device for the
            built-in augmentations, else by the DataLoader), ``host`` or ``device``
            (:data:`memprune.data.VIEW_PLACES`); device views equal host views up to float
            rounding (docs/scale.md).
    """

    chunk_size: int = 32
    device: str | torch.device | None = None
    num_workers: int | None = None
    progress: bool | None = None
    precision: str = "auto"
    views: str = "auto"

    def __post_init__(self) -> None:
        size = self.chunk_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"chunk_size must be an int >= 1, got {self.chunk_size!r}")
        PRECISIONS.check(self.precision)
        VIEW_PLACES.check(self.views)

    def dtype(self, encoder: nn.Module) -> str:
        """The precision this pass runs ``encoder`` in (``fp32`` / ``bf16``), for metadata."""
        device = encoder_device(encoder, self.device)
        return "bf16" if autocast_dtype(self.precision, device) is torch.bfloat16 else "fp32"


def normalization_record(encoder: nn.Module, normalize="auto") -> dict:
    """The mean / std an encoder's inputs were normalized with and where they came from (the
    encoder's checkpoint or timm config, the caller), for a result's metadata."""
    mean, std = resolve_normalize(encoder, normalize) or ((0.0,) * 3, (1.0,) * 3)
    cfg = getattr(encoder, "pretrained_cfg", None) or {}
    if normalize != "auto":
        source = "none" if normalize in (None, "none") else "given to the call"
    else:
        source = cfg.get("memprune_normalization") or (
            "timm default" if "mean" in cfg else "none (a plain module)")  # fmt: skip
    return {"mean": list(mean), "std": list(std), "source": source}


def score_meta(kind: str, encoder: nn.Module, dataset: Dataset, sites: Sequence[Site],
               compute: Compute | None = None, **options) -> dict:  # fmt: skip
    """JSON-able record of how a score was made: model, data, options, sites, versions, and
    the precision the encoder ran in (``compute``)."""
    if compute is not None:
        options["precision"] = compute.dtype(encoder)
        if "augment" in options:
            device = encoder_device(encoder, compute.device)
            options["views"] = view_place(compute.views, device, options["augment"])
    cfg = getattr(encoder, "pretrained_cfg", None) or {}
    if "augment" in options:
        options["augment"] = describe_augment(options["augment"])
    normalize = options.get("normalize")
    if not (isinstance(normalize, str) or normalize is None):
        options["normalize"] = [list(v) for v in normalize]
    if normalize is not None:
        options["normalization"] = normalization_record(encoder, normalize)
    return {
        "kind": kind,
        "model": cfg.get("architecture", type(encoder).__name__),
        "weights": weights_hash(encoder)[:16],
        "data": dataset_name(dataset),
        "n_points": len(dataset),
        **options,
        "sites": {
            s.name: {
                "module": s.module,
                "role": s.role,
                "units": s.n_units,
                "source": s.source,
                "shape": list(s.shape),
            }
            for s in sites
        },
        "versions": package_versions(),
    }


def resolve_normalize(
    encoder: nn.Module, normalize: str | tuple | None
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``"auto"``: the encoder's mean/std; ``None`` / ``"none"``: no normalization;
    ``(mean, std)``: those."""
    if normalize is None or normalize == "none":
        return None
    if normalize == "auto":
        return normalization(encoder)
    if isinstance(normalize, (tuple, list)) and len(normalize) == 2:
        return normalization(encoder, mean=tuple(normalize[0]), std=tuple(normalize[1]))
    raise ConfigError(f"normalize must be 'auto', 'none' or (mean, std), got {normalize!r}")


class Normalizer:
    """``(x - mean) / std`` on the encoder's device, applied after augmentation."""

    def __init__(self, stats, device: torch.device) -> None:
        self.stats = None
        if stats is not None:
            mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in stats)
            self.stats = (mean, std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.stats is None else (x - self.stats[0]) / self.stats[1]


def encoder_device(encoder: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device`` if given; else this process's accelerate device under a launcher; else the
    encoder's current device when it is on an accelerator; else CUDA if available."""
    if device is not None:
        return resolve_device(device)
    _, world = rank_world()
    if world > 1:
        return process_state().device
    param = next(encoder.parameters(), None)
    if param is not None and param.device.type != "cpu":
        return param.device
    return resolve_device(None)


def image_size(dataset: Dataset) -> tuple[int, int, int]:
    from memprune.data import check_image

    if len(dataset) == 0:
        raise ConfigError("the data set is empty")
    item = dataset[0]
    check_image(item[0], item[2] if len(item) > 2 else 0)
    return tuple(item[0].shape)


def view_batches(
    encoders: Sequence[nn.Module],
    views: Dataset,
    sites: Sequence[Sequence[Site]],
    compute: Compute = Compute(),
    *,
    normalize,
    signed: str = "abs",
    representation: str = "flatten",
    reduce: Sequence | None = None,
    desc: str = "scoring",
    block: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]]:
    """Push this process's shard of ``views`` (a :class:`~memprune.data.MultiView`, or any data
    set of ``(views [K, 3, H, W], label, index)`` items; views made where ``compute.views``
    says) through every encoder, one forward pass per chunk per encoder, and yield
    ``(indices [B], labels [B], [captured of encoder 0, captured of encoder 1, ...])``.

    Captured values are what the reducers return for the ``B*K`` images (``reduce[e]``: one
    callable or a dict per site, None for the default unit/layer reducers). Encoders run in
    eval mode under ``inference_mode``, are moved to the device and get their modes back.

    ``block``: points are dealt to the processes in runs of this many consecutive points, so
    that with ``compute.chunk_size == block`` every chunk holds the same points on any number
    of processes (minibatch CKA's minibatches).
    """
    rank, world = rank_world()
    device = encoder_device(encoders[0], compute.device)
    views, make_views = loop_views(views, device, compute.views)
    n = len(views)
    mine = [i for b in shard(-(-n // block), rank, world)
            for i in range(b * block, min((b + 1) * block, n))]  # fmt: skip
    loader = DataLoader(
        Subset(views, mine),
        batch_size=compute.chunk_size,
        **loader_options(device, compute.num_workers),
    )
    dtype = autocast_dtype(compute.precision, device)
    norms = []
    for encoder in encoders:
        encoder.to(device)
        norms.append(Normalizer(resolve_normalize(encoder, normalize), device))
    reduce = list(reduce) if reduce is not None else [None] * len(encoders)
    progress = compute.progress
    disable = True if rank != 0 else (None if progress is None else not progress)  # None: TTY only
    bar = tqdm(loader, desc=desc, unit="batch", disable=disable, leave=False)
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        acts, layouts = [], []
        for encoder, encoder_sites, fn in zip(encoders, sites, reduce, strict=True):
            stack.enter_context(evaluating(encoder))
            layouts.append(stack.enter_context(fast_layout(encoder, device)))
            hooks = capture(encoder, encoder_sites, signed, representation, reduce=fn)
            acts.append(stack.enter_context(hooks))
        autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=bool(dtype))
        checked = False
        for batch, labels, indices in bar:
            x = make_views(batch)  # [B*K, 3, H, W] on the device
            if not checked:
                for encoder in encoders:
                    check_input_size(encoder, tuple(x.shape[-2:]))
                checked = True
            for encoder, norm, nhwc in zip(encoders, norms, layouts):
                z = norm(x)
                with autocast:
                    encoder(z.contiguous(memory_format=torch.channels_last) if nhwc else z)
            yield indices, labels, [dict(a) for a in acts]
