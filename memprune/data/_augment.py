"""Reproducible multi-view augmentation.

View ``k`` of the point with data index ``i`` is drawn from a ``torch.Generator`` seeded by
``(seed, i, k)`` (mixed through numpy's ``SeedSequence``), so the same views come back on every
run, for any batch size, DataLoader worker count, number of processes or batch order.
Augmentation works on images in ``[0, 1]``; normalization with the encoder's mean/std happens
later, inside scoring (colour jitter on a normalized tensor would clamp every negative pixel).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

# torchvision's own RGB <-> HSV conversions (batched), as adjust_hue uses them.
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

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

    def draw(self, height: int, width: int, g: torch.Generator) -> torch.Tensor:
        """Every random choice of one view of a ``height x width`` image, drawn from ``g`` in
        a fixed order, as one float64 row (layout: :data:`PARAMS`). :meth:`apply` makes the
        view from it on any device; :meth:`apply_batch` makes many at once."""
        top, left, h, w = self.crop_box(height, width, g)
        flip = float(torch.rand((), generator=g)) < self.flip_p
        order = torch.randperm(4, generator=g).tolist()
        factors = [
            _uniform(g, max(0.0, 1 - self.brightness), 1 + self.brightness),
            _uniform(g, max(0.0, 1 - self.contrast), 1 + self.contrast),
            _uniform(g, max(0.0, 1 - self.saturation), 1 + self.saturation),
            _uniform(g, -self.hue, self.hue),
        ]
        jitter = float(torch.rand((), generator=g)) < self.jitter_p
        gray = float(torch.rand((), generator=g)) < self.gray_p
        row = [top, left, h, w, flip, jitter, gray, *order, *factors]
        return torch.tensor(row, dtype=torch.float64)

    def _size(self, height: int, width: int) -> list[int]:
        return [self.size or height, self.size or width]

    def apply(self, image: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """The view of ``image`` [C, H, W] that ``params`` (a row of :meth:`draw`) describes."""
        top, left, h, w, flip, jitter, gray = (int(v) for v in params[:7].tolist())
        order = [int(v) for v in params[7:11].tolist()]
        factors = params[11:15].tolist()
        out = TF.resized_crop(image, top, left, h, w, self._size(*image.shape[-2:]), antialias=True)
        if flip:
            out = TF.horizontal_flip(out)
        if jitter:
            ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
            for op_index in order:
                out = ops[op_index](out, factors[op_index])
        if gray:
            out = TF.rgb_to_grayscale(out, num_output_channels=3)
        return out.clamp(0.0, 1.0)

    def __call__(self, image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return self.apply(image, self.draw(*image.shape[-2:], g))

    def apply_batch(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """The views of ``images`` [N, C, H, W] (one per row of ``params`` [N, 15]) in a few
        batched operations on ``images``' device.

        Equal to :meth:`apply` view by view up to float rounding: crops that are enlarged
        (the usual case) are sampled bilinearly from their own pixels only, as the
        crop-then-resize does; crops shrunk in either direction go through :meth:`apply`'s
        antialiased resize one by one. Colour operations follow torchvision's formulas with a
        factor per view. On the CPU, per-view :meth:`apply` stays the default (what the
        loader does); this is for accelerators.
        """
        n, channels, height, width = images.shape
        if channels != 3:  # the per-view path (grayscale images: no colour operations)
            return torch.stack([self.apply(x, p) for x, p in zip(images, params, strict=True)])
        params = params.cpu()
        out_h, out_w = self._size(height, width)
        box = params[:, :4]
        shrunk = ((box[:, 2] > out_h) | (box[:, 3] > out_w)).nonzero().flatten().tolist()
        device = images.device
        out = F.grid_sample(
            images, _crop_grid(box, out_h, out_w, height, width).to(device),
            mode="bilinear", padding_mode="border", align_corners=False,
        )  # fmt: skip
        for i in shrunk:
            top, left, h, w = (int(v) for v in box[i].tolist())
            out[i] = TF.resized_crop(images[i], top, left, h, w, [out_h, out_w], antialias=True)
        flip = params[:, 4].bool().to(device).view(-1, 1, 1, 1)
        out = torch.where(flip, out.flip(-1), out)
        jitter, order, factors = params[:, 5].bool(), params[:, 7:11].long(), params[:, 11:15]
        for step in range(4):
            for op, fn in enumerate(_BATCH_OPS):
                chosen = (jitter & (order[:, step] == op)).nonzero().flatten()
                if len(chosen):
                    rows = chosen.to(device)
                    out[rows] = fn(out[rows], factors[chosen, op])
        grays = params[:, 6].bool().nonzero().flatten().to(device)
        if len(grays):
            out[grays] = _gray(out[grays]).expand(-1, 3, -1, -1)
        return out.clamp(0.0, 1.0)


#: The columns of a view's parameters (:meth:`SimCLRAugment.draw`).
PARAMS = ("top", "left", "height", "width", "flip", "jitter", "gray",
          "op0", "op1", "op2", "op3", "brightness", "contrast", "saturation", "hue")  # fmt: skip


def _crop_grid(box: torch.Tensor, out_h: int, out_w: int, height: int, width: int):
    """grid_sample's grid [N, out_h, out_w, 2] for crops ``box`` [N, 4] (top, left, h, w)
    resized to ``out_h x out_w``: each output pixel centre maps to a source coordinate in its
    crop as bilinear interpolation without corner alignment does, clamped to the crop (the
    crop-then-resize never reads a pixel outside it)."""

    def axis(start, length, size, full):
        centres = (torch.arange(size, dtype=torch.float64) + 0.5).view(1, -1)
        source = centres * (length / size).view(-1, 1) - 0.5
        source = source.clamp(min=0).minimum((length - 1).view(-1, 1)) + start.view(-1, 1)
        return (2 * source + 1) / full - 1  # align_corners=False normalization

    ys = axis(box[:, 0], box[:, 2], out_h, height)
    xs = axis(box[:, 1], box[:, 3], out_w, width)
    n = len(box)
    xs = xs.view(n, 1, out_w).expand(n, out_h, out_w)
    ys = ys.view(n, out_h, 1).expand(n, out_h, out_w)
    return torch.stack((xs, ys), dim=-1).float()


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma [N, 1, H, W] of RGB ``x`` [N, 3, H, W] with torchvision's weights."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's blend, ``ratio * x + (1 - ratio) * other`` clamped to [0, 1], with a
    ratio per image (the complement taken in float64, as torchvision takes it in Python)."""
    keep = ratio.float().to(x.device).view(-1, 1, 1, 1)
    rest = (1.0 - ratio).float().to(x.device).view(-1, 1, 1, 1)
    return x.mul(keep).add_(other * rest).clamp_(0, 1)


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return x.mul(f.float().to(x.device).view(-1, 1, 1, 1)).clamp_(0, 1)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True), f)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x), f)


def _hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    h, s, v = _rgb_to_hsv(x).unbind(dim=-3)
    h = (h + f.float().to(x.device).view(-1, 1, 1)).remainder_(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3))


#: Colour jitter's operations by index (the order :meth:`SimCLRAugment.draw` permutes).
_BATCH_OPS = (_brightness, _contrast, _saturation, _hue)


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


def check_image(image, index) -> None:
    """An item's image must be an RGB tensor ``[3, H, W]`` (a grayscale one is refused, with
    the fix, before a convolution refuses it with a shape error)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] == 1:
        shape = tuple(image.shape) if hasattr(image, "shape") else type(image).__name__
        raise DataError(
            f"the image of data index {int(index)} is {shape}: the encoders take RGB images"
            " [3, H, W] in [0, 1]; expand a grayscale one to 3 channels"
            " (image.expand(3, -1, -1); load_dataset does it)"
        )


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
        self._defer = False

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
        check_image(image, index)
        if not torch.isfinite(image).all():
            raise DataError(
                f"the image of data index {int(index)} holds NaN or inf values: fix or drop it"
            )
        if self._defer:  # the image once and every view's parameters; views made later
            draw = getattr(self.augment, "draw", None)
            height, width = image.shape[-2:]
            rows = (
                [
                    draw(height, width, view_generator(self.seed, int(index), k))
                    for k in range(self.n_views)
                ]
                if draw is not None
                else [torch.zeros(0, dtype=torch.float64)] * self.n_views
            )
            return (image, torch.stack(rows)), label, index
        if self.augment is no_augment:  # nothing random to draw
            return image.unsqueeze(0).expand(self.n_views, -1, -1, -1).clone(), label, index
        views = [
            self.augment(image, view_generator(self.seed, int(index), k))
            for k in range(self.n_views)
        ]
        return torch.stack(views), label, index

    @property
    def batchable(self) -> bool:
        """Whether the views can be made in batches on a device (:meth:`deferred`)."""
        return batchable(self.augment)

    def deferred(self) -> MultiView:
        """These views with their making deferred: items are ``((image [3, H, W], params [K,
        15]), label, index)``, the parameters drawn from the same generators in the same
        order, and :meth:`make` turns a batch of them into the views on a device."""
        if not self.batchable:
            raise ConfigError(
                f"augment {describe_augment(self.augment)!r} is a plain callable and cannot be"
                " applied in batches on a device: make the views on the host (views='host')"
            )
        out = copy.copy(self)
        out._defer = True
        return out

    def make(self, batch, device: torch.device) -> torch.Tensor:
        """The views [B*K, 3, H, W] on ``device`` of a batch of :meth:`deferred` items."""
        images, params = batch
        images = images.to(device, non_blocking=True).repeat_interleave(self.n_views, dim=0)
        if self.augment is no_augment:
            return images
        return self.augment.apply_batch(images, params.flatten(0, 1))


#: ``views``: where a loop's augmented views are made.
VIEW_PLACES = Registry("views", {
    "auto": "on the device in batches when it is CUDA and the augmentation is built in, else"
            " by the DataLoader",
    "host": "by the DataLoader, one view at a time (bit-exact on every machine)",
    "device": "on the loop's device in batches (equal to host views up to float rounding)",
})  # fmt: skip


def batchable(augment: AugmentSpec) -> bool:
    """Whether ``augment`` can make views in batches on a device: the built-in augmentations
    can, a plain callable cannot."""
    fn = make_augment(augment)
    return fn is no_augment or hasattr(fn, "apply_batch")


def view_place(place: str, device: torch.device, augment: AugmentSpec) -> str:
    """Where the views of ``augment`` are made for a loop on ``device``: ``host`` or
    ``device`` (see :data:`VIEW_PLACES`)."""
    VIEW_PLACES.check(place)
    if place == "auto":
        return "device" if device.type == "cuda" and batchable(augment) else "host"
    return place


def loop_views(views, device: torch.device, place: str = "auto"):
    """What a loop on ``device`` reads: ``(data set for the DataLoader, fn(batch) -> views
    [B*K, 3, H, W] on the device)``. ``views`` is a :class:`MultiView` (any data set of
    ``(views [K, 3, H, W], label, index)`` items is read as is)."""
    if isinstance(views, MultiView) and view_place(place, device, views.augment) == "device":
        deferred = views.deferred()
        return deferred, lambda batch: deferred.make(batch, device)
    VIEW_PLACES.check(place)
    return views, lambda batch: batch.to(device, non_blocking=True).flatten(0, 1)
