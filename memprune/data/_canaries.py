"""Canaries: atypical points, each included in f's training by its own coin (docs/method.md §8b).

One training run gives ground truth for memorization when some points are included at random:
included and excluded canaries differ only in membership, so any difference in how f treats
them is f's memory of the included ones (one-run auditing, Steinke, Nasr and Jagielski 2023).
Atypical points are the ones memorized most (Feldman 2020), so canaries are made atypical:

* ``pattern``: a training image blended with a unique seeded high-frequency pattern (each
  pixel of each channel a seeded coin, 0 or 1), ``(1 - strength) * image + strength * pattern``;
* ``mix``: two training images of different classes blended half and half (the label is the
  first image's), a point between classes;
* ``noise``: a seeded texture, uniform noise smoothed over 2x2 pixels, out of distribution;
* ``smooth``: a seeded smooth colour image, uniform noise on an 8x8 grid upsampled bilinearly
  to the image size: out of distribution, but at the grain of a small image, so that random
  crops keep most of it (a 2x2 texture or a per-pixel pattern is resampled into another
  texture by every crop, and only weak crops let an encoder learn it);
* ``collage``: four training images at half size in a 2x2 grid, a digit-like image whose
  parts never occur together;
* ``shuffle``: a training image cut into 4x4 tiles put back in a seeded order: the image's
  own pixels, its shape gone.

Canaries are appended to the data set (:class:`WithCanaries`: indices ``n .. n + M - 1``);
:func:`memprune.data.make_splits` draws their coins, and f's training set holds the included
ones (g never sees a canary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from memprune.errors import ConfigError
from memprune.registry import Registry

#: ``kind`` -> what the canary is.
CANARY_KINDS = Registry(
    "canary kind",
    {"pattern": "a training image blended with a unique seeded high-frequency pattern",
     "mix": "two training images of different classes blended half and half",
     "noise": "a seeded smoothed-noise texture (out of distribution)",
     "smooth": "a seeded smooth colour image (8x8 noise upsampled; out of distribution)",
     "collage": "four training images at half size in a 2x2 grid",
     "shuffle": "a training image cut into 4x4 tiles put back in a seeded order"},
)  # fmt: skip


@dataclass(frozen=True)
class Canaries:
    """``images [M, C, H, W]``, their ``labels [M]``, the ``kind`` and the base indices each
    was made from (``sources``: one or two per canary; none for ``noise`` and ``smooth``)."""

    images: torch.Tensor
    labels: torch.Tensor
    kind: str
    sources: list[list[int]]
    seed: int
    strength: float

    def __len__(self) -> int:
        return len(self.images)

    def describe(self) -> dict:
        return {"n": len(self), "kind": self.kind, "seed": self.seed, "strength": self.strength}


def _item(dataset: Dataset, i: int) -> tuple[torch.Tensor, int]:
    image, label = dataset[i][:2]
    return torch.as_tensor(image).float(), int(label)


def make_canaries(
    dataset: Dataset, n: int, kind: str = "pattern", seed: int = 0, strength: float = 0.5
) -> Canaries:
    """``n`` canaries of ``kind`` made from ``dataset`` (its images fix the size), by ``seed``."""
    CANARY_KINDS.check(kind)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ConfigError(f"canaries: n must be an int >= 2 (some included, some not), got {n!r}")
    if not 0 < strength <= 1:
        raise ConfigError(f"canaries: strength must be in (0, 1], got {strength!r}")
    g = torch.Generator().manual_seed(seed)
    size = len(dataset)
    first, label0 = _item(dataset, 0)
    unit_range = bool(first.min() >= 0 and first.max() <= 1)  # images in [0, 1] stay there
    images, labels, sources = [], [], []
    for _ in range(n):
        if kind == "noise":
            small = torch.rand(first.shape[0], (first.shape[1] + 1) // 2, (first.shape[2] + 1) // 2,
                               generator=g)  # fmt: skip
            image = small.repeat_interleave(2, 1).repeat_interleave(2, 2)[
                :, : first.shape[1], : first.shape[2]
            ]
            label, src = int(torch.randint(0, max(label0 + 1, 2), (1,), generator=g)), []
        elif kind == "smooth":
            grid = torch.rand(1, first.shape[0], 8, 8, generator=g)
            image = torch.nn.functional.interpolate(
                grid, size=tuple(first.shape[1:]), mode="bilinear", align_corners=False
            )[0]
            label, src = int(torch.randint(0, max(label0 + 1, 2), (1,), generator=g)), []
        elif kind == "collage":
            src = torch.randint(0, size, (4,), generator=g).tolist()
            parts = [_item(dataset, i) for i in src]
            h, w = first.shape[1] // 2, first.shape[2] // 2
            small = torch.nn.functional.interpolate(
                torch.stack([p[0] for p in parts]), size=(h, w), mode="bilinear",
                antialias=True, align_corners=False,
            )  # fmt: skip
            image = first.new_zeros(first.shape)
            for q, part in enumerate(small):
                image[:, (q // 2) * h : (q // 2 + 1) * h, (q % 2) * w : (q % 2 + 1) * w] = part
            label = parts[0][1]
        else:
            i = int(torch.randint(0, size, (1,), generator=g))
            image, label = _item(dataset, i)
            src = [i]
            if kind == "shuffle":
                image = _shuffled(image, g)
            elif kind == "pattern":
                pattern = (torch.rand(image.shape, generator=g) < 0.5).float()
                image = (1 - strength) * image + strength * pattern
            else:  # mix: a partner of another class
                for _ in range(100):
                    j = int(torch.randint(0, size, (1,), generator=g))
                    other, other_label = _item(dataset, j)
                    if other_label != label:
                        break
                image, src = 0.5 * image + 0.5 * other, [i, j]
        images.append(image.clamp(0, 1) if unit_range else image)
        labels.append(label)
        sources.append(src)
    return Canaries(torch.stack(images), torch.tensor(labels), kind, sources, seed, strength)


def _shuffled(image: torch.Tensor, g: torch.Generator, grid: int = 4) -> torch.Tensor:
    """``image`` cut into ``grid x grid`` tiles, put back in a seeded order other than its own
    (the last rows and columns that do not fill a tile stay where they are)."""
    c, height, width = image.shape
    th, tw = height // grid, width // grid
    tiles = image[:, : th * grid, : tw * grid].reshape(c, grid, th, grid, tw).permute(1, 3, 0, 2, 4)
    tiles = tiles.reshape(grid * grid, c, th, tw)
    order = torch.randperm(grid * grid, generator=g)
    while bool((order == torch.arange(grid * grid)).all()):
        order = torch.randperm(grid * grid, generator=g)
    moved = tiles[order].reshape(grid, grid, c, th, tw).permute(2, 0, 3, 1, 4)
    out = image.clone()
    out[:, : th * grid, : tw * grid] = moved.reshape(c, th * grid, tw * grid)
    return out


class WithCanaries(Dataset):
    """A data set with canaries appended: items ``(image, label, index)``, the canaries at
    indices ``len(base) ..``; ``canary_indices`` lists them."""

    def __init__(self, base: Dataset, canaries: Canaries) -> None:
        first = torch.as_tensor(base[0][0])
        if tuple(first.shape) != tuple(canaries.images.shape[1:]):
            raise ConfigError(
                f"canaries are {tuple(canaries.images.shape[1:])} images but the data set's are"
                f" {tuple(first.shape)}: make them from this data set"
            )
        self.base, self.canaries = base, canaries
        self.name = getattr(base, "name", type(base).__name__)
        self.classes = getattr(base, "classes", None)
        base_labels = getattr(base, "labels", None)
        if isinstance(base_labels, torch.Tensor) and len(base_labels) == len(base):
            self.labels = torch.cat([base_labels.long(), canaries.labels.long()])
        for attr in ("augment",):  # the toy data set's own augmentation applies to canaries
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))

    @property
    def canary_indices(self) -> list[int]:
        return list(range(len(self.base), len(self)))

    def __len__(self) -> int:
        return len(self.base) + len(self.canaries)

    def __getitem__(self, index: int):
        if index < len(self.base):
            image, label = self.base[index][:2]
            return image, int(label), int(index)
        k = index - len(self.base)
        if not 0 <= k < len(self.canaries):
            raise IndexError(index)
        return self.canaries.images[k], int(self.canaries.labels[k]), int(index)
