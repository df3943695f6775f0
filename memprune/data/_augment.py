"""Reproducible multi-view augmentation.

View ``k`` of the point with data index ``i`` is drawn from a ``torch.Generator`` seeded by
``(seed, i, k)`` (mixed through numpy's ``SeedSequence``), so the same views come back on every
run, for any batch size, DataLoader worker count, number of processes or batch order.
Augmentation works on images in ``[0, 1]``; normalization with the encoder's mean/std happens
later, inside scoring (colour jitter on a normalized tensor would clamp every negative pixel).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from memprune.errors import ConfigError, DataError
from memprune.registry import Registry

#: Most views per point: one point's views share a forward pass.
MAX_VIEWS = 1024

#: An augmentation: ``fn(image [3, H, W] in [0, 1], generator) -> view [3, H', W']``.
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def view_generator(seed: int, index: int, view: int) -> torch.Generator:
    """The generator of view ``view`` of data point ``index`` (see module docstring)."""
    if seed < 0 or index < 0 or view < 0:
        raise ConfigError(f"seed, index and view must be >= 0, got {seed}, {index}, {view}")
    state = np.random.SeedSequence([seed, index, view]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


@dataclass(frozen=True)
class SimCLRAugment:
    """SimCLR's augmentation (Chen et al. 2020), CIFAR variant, on ``[0, 1]`` images.

    Random resized crop (``scale``, ``ratio``, output ``size``, default the input size),
    horizontal flip (``flip_p``), colour jitter (``brightness``, ``contrast``, ``saturation``,
    ``hue`` in random order, with probability ``jitter_p``; results stay in ``[0, 1]``) and
    grayscale (``gray_p``). Every random draw comes from the given generator; the number of
    draws is the same for every view, whatever is applied.
    """

    size: int | None = None
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    gray_p: float = 0.2

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"ratio must satisfy 0 < low <= high, got {self.ratio}")
        for name in ("flip_p", "jitter_p", "gray_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise ConfigError(f"hue must be in [0, 0.5], got {self.hue}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")

    def crop_box(self, height: int, width: int, g: torch.Generator) -> tuple[int, int, int, int]:
        """Top, left, height, width of a random resized crop (torchvision's algorithm)."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * _uniform(g, *self.scale)
            aspect = math.exp(_uniform(g, *log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (), generator=g))
                left = int(torch.randint(0, width - w + 1, (), generator=g))
                return top, left, h, w
        in_ratio = width / height  # fallback: central crop clamped to the ratio range
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        _, height, width = image.shape
        size = [self.size or height, self.size or width]
        top, left, h, w = self.crop_box(height, width, g)
        out = TF.resized_crop(image, top, left, h, w, size, antialias=True)
        if float(torch.rand((), generator=g)) < self.flip_p:
            out = TF.horizontal_flip(out)
        order = torch.randperm(4, generator=g).tolist()
        factors = [
            _uniform(g, max(0.0, 1 - self.brightness), 1 + self.brightness),
            _uniform(g, max(0.0, 1 - self.contrast), 1 + self.contrast),
            _uniform(g, max(0.0, 1 - self.saturation), 1 + self.saturation),
            _uniform(g, -self.hue, self.hue),
        ]
        if float(torch.rand((), generator=g)) < self.jitter_p:
            ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
            for op_index in order:
                out = ops[op_index](out, factors[op_index])
        if float(torch.rand((), generator=g)) < self.gray_p:
            out = TF.rgb_to_grayscale(out, num_output_channels=3)
        return out.clamp(0.0, 1.0)


def no_augment(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Every view is the un-augmented image."""
    return image


#: Crop-and-flip for supervised training and fine-tuning: SimCLR's crop and flip, no colour
#: jitter or grayscale.
CROP_FLIP = {"scale": (0.25, 1.0), "jitter_p": 0.0, "gray_p": 0.0}


def _crop_flip(**params) -> Augment:
    return SimCLRAugment(**{**CROP_FLIP, **params})


AUGMENTS = Registry(
    "augmentation",
    {"simclr": SimCLRAugment, "crop_flip": _crop_flip, "none": lambda: no_augment},
)

#: ``augment`` everywhere: a preset name, a mapping of preset parameters with an optional
#: ``"preset"`` key, or a callable ``fn(image, generator) -> view``.
AugmentSpec = str | Mapping[str, Any] | Augment


def augment_spec(augment: AugmentSpec, default: str = "simclr") -> dict[str, Any] | Augment:
    """The one spelling of an augmentation, made explicit: ``{"preset": name, **params}`` (lists
    for tuples, so it can be written to JSON and compared), or the callable itself.

    ``"simclr"`` -> ``{"preset": "simclr"}``; ``{"scale": [0.3, 1.0]}`` -> the ``default``
    preset with that scale; ``{"preset": "none"}`` -> no augmentation.
    """
    if callable(augment):
        return augment
    if isinstance(augment, str):
        return {"preset": AUGMENTS.check(augment)}
    if isinstance(augment, Mapping):
        params = dict(augment)
        preset = AUGMENTS.check(params.pop("preset", default))
        plain = {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
        return {"preset": preset, **plain}
    raise ConfigError(
        f"augment must be a preset name ({', '.join(AUGMENTS)}), a mapping of its parameters"
        f" or a callable fn(image, generator), got {augment!r}"
    )


def make_augment(augment: AugmentSpec, default: str = "simclr") -> Augment:
    """The augmentation callable of ``augment`` (see :func:`augment_spec`)."""
    spec = augment_spec(augment, default)
    if callable(spec):
        return spec
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items() if k != "preset"}
    try:
        return AUGMENTS[spec["preset"]](**params)
    except TypeError as err:
        raise ConfigError(f"bad parameters for augment {spec['preset']!r}: {err}") from err


def describe_augment(augment: AugmentSpec, default: str = "simclr") -> dict[str, Any] | str:
    """What metadata records of ``augment``: its spec, or a callable's name."""
    spec = augment_spec(augment, default)
    return getattr(spec, "__name__", type(spec).__name__) if callable(spec) else spec


class MultiView(Dataset):
    """``K`` reproducible augmented views of every item of a data set.

    Items are ``(views [K, 3, H, W], label, index)``; a DataLoader makes batches
    ``[B, K, 3, H, W]``. ``index`` is the data index the wrapped data set reports (also through a
    ``Subset``), and seeds the views, so view ``k`` of point ``i`` is the same wherever it is
    drawn.

    Args:
        dataset: items ``(image [3, H, W] in [0, 1], label, index)``.
        n_views: ``K >= 1``.
        augment: a preset (``"simclr"``, default, see :class:`SimCLRAugment`; ``"crop_flip"``;
            ``"none"``), a mapping of the preset's parameters with an optional ``"preset"``
            key (``{"scale": (0.2, 1.0)}``), or a callable ``fn(image, generator) -> view``
            drawing every random number from ``generator``.
        seed: base seed of the views.
    """

    def __init__(
        self,
        dataset: Dataset,
        n_views: int,
        augment: AugmentSpec = "simclr",
        seed: int = 0,
    ) -> None:
        if not isinstance(n_views, int) or n_views < 1:
            raise ConfigError(f"n_views must be an int >= 1, got {n_views!r}")
        if n_views > MAX_VIEWS:
            raise ConfigError(
                f"{n_views} views per point is more than {MAX_VIEWS}: all views of a point go"
                " through one forward pass, and the scores settle long before (the papers use"
                f" 10); use at most {MAX_VIEWS}"
            )
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        self.dataset = dataset
        self.n_views = n_views
        self.augment = make_augment(augment)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int, int]:
        item = self.dataset[position]
        if not (isinstance(item, (tuple, list)) and len(item) == 3):
            raise DataError(
                f"data set items must be (image, label, index), got a {type(item).__name__} of"
                f" {len(item) if isinstance(item, (tuple, list)) else 1}: wrap plain (x, y) data"
                " with memprune.data.IndexedDataset"
            )
        image, label, index = item
        if not torch.isfinite(image).all():
            raise DataError(
                f"the image of data index {int(index)} holds NaN or inf values: fix or drop it"
            )
        if self.augment is no_augment:  # nothing random to draw
            return image.unsqueeze(0).expand(self.n_views, -1, -1, -1).clone(), label, index
        views = [
            self.augment(image, view_generator(self.seed, int(index), k))
            for k in range(self.n_views)
        ]
        return torch.stack(views), label, index
