"""Synthetic signal/noise patch data with a known memorization signal (docs/method.md §8).

A point is two patches in R^d: the signal patch ``y * mu`` (y = ±1) and a noise patch
``xi ~ N(0, sigma^2 (I - mu mu^T / ||mu||^2))``, orthogonal to mu, in a random order. The
signal-to-noise ratio is ``SNR = ||mu|| / (sigma sqrt(d))``. Each patch is a ``3 x s x s`` image
(``d = 3 s^2``) and a point is the two patches side by side, ``[3, s, 2s]``.

The signal is shared by a whole class and can be learned; a point's noise patch is its own and
can only be memorized. :class:`ToyAugment` (the data set's ``augment``) keeps the signal patch
and redraws the noise: ``xi' = sqrt(1 - redraw) xi + sqrt(redraw) xi_new`` (same distribution,
still orthogonal to mu), so ``redraw=1`` leaves nothing point-specific to memorize and
``redraw < 1`` keeps part of each point's noise across views. Pixel values are the raw patch
values (not in [0, 1]): use the data set's own augmentation, not the SimCLR preset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from memprune.errors import ConfigError


def _upsample(image: torch.Tensor, size: int | None) -> torch.Tensor:
    """``[3, s, 2s]`` -> ``[3, size, size]`` by repeating pixels (nearest neighbour with integer
    factors, so :func:`_downsample` undoes it exactly)."""
    if size is None:
        return image
    fy, fx = size // image.shape[1], size // image.shape[2]
    return image.repeat_interleave(fy, dim=1).repeat_interleave(fx, dim=2)


def _downsample(image: torch.Tensor, side: int) -> torch.Tensor:
    """A resized toy image back to ``[3, side, 2 side]``."""
    fy, fx = image.shape[1] // side, image.shape[2] // (2 * side)
    return image[:, ::fy, ::fx]


@dataclass(frozen=True, eq=False)
class ToyAugment:
    """Keep the signal patch of a toy image, redraw (a ``redraw`` share of) its noise; an
    image resized by the data set (``img_size``) is read at its own size and resized back."""

    mu: torch.Tensor
    sigma: float
    redraw: float = 1.0
    img_size: int | None = None

    def __repr__(self) -> str:  # short and stable: it is recorded in training configs
        size = "" if self.img_size is None else f", img_size={self.img_size}"
        return f"ToyAugment(dim={len(self.mu)}, sigma={self.sigma}, redraw={self.redraw}{size})"

    def noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, len(self.mu), generator=generator)
        u = self.mu / self.mu.norm()
        return self.sigma * (z - (z @ u)[:, None] * u[None])

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        s = math.isqrt(len(self.mu) // 3)
        image = _downsample(image, s) if self.img_size is not None else image
        patches = torch.stack([image[:, :, :s].flatten(), image[:, :, s:].flatten()])
        signal = int((patches @ self.mu).abs().argmax())  # the noise is orthogonal to mu
        fresh = self.noise(1, generator)[0]
        noise = patches[1 - signal]
        patches = patches.clone()
        patches[1 - signal] = math.sqrt(1 - self.redraw) * noise + math.sqrt(self.redraw) * fresh
        return _upsample(torch.cat([p.view(3, s, s) for p in patches], dim=2), self.img_size)


class ToyDataset(torch.utils.data.Dataset):
    """Toy images ``[3, s, 2s]`` with labels 0/1 (y = -1/+1) and their ground truth:
    ``patches [N, 2, d]``, ``signal_first [N]``, ``mu``, ``sigma``, ``snr`` and ``augment``."""

    def __init__(self, patches, labels, signal_first, mu, sigma, snr, redraw, name="toy",
                 img_size=None):  # fmt: skip
        self.patches, self.labels, self.signal_first = patches, labels.long(), signal_first
        self.mu, self.sigma, self.snr, self.name = mu, sigma, snr, name
        self.classes = ["-1", "+1"]
        self.side = math.isqrt(len(mu) // 3)
        self.img_size = img_size
        self.augment = ToyAugment(mu, sigma, redraw, img_size)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        s = self.side
        image = torch.cat([p.view(3, s, s) for p in self.patches[index]], dim=2)
        return _upsample(image, self.img_size), int(self.labels[index]), int(index)


def make_toy(
    split: str = "train",
    size: int = 1000,
    dim: int = 48,
    snr: float = 1.0,
    sigma: float = 1.0,
    redraw: float = 1.0,
    seed: int = 0,
    img_size: int | None = None,
) -> ToyDataset:
    """The toy data set: ``size`` points (the test split has ``size // 4``) in dimension
    ``dim = 3 s^2`` per patch. ``mu`` depends on ``seed`` only, so both splits share it.
    ``img_size`` (a multiple of ``2 s``) repeats pixels to ``img_size x img_size`` images, for
    encoders with a fixed input size; the points and their augmentation are the same."""
    side = math.isqrt(dim // 3) if dim > 0 else 0
    if dim < 3 or 3 * side * side != dim:
        raise ConfigError(f"toy dim must be 3 * s^2 (12, 27, 48, 75, 108, ...), got {dim}")
    if img_size is not None and (img_size < 2 * side or img_size % (2 * side)):
        raise ConfigError(
            f"toy images are {side} x {2 * side} (dim={dim}): img_size must be a multiple of"
            f" {2 * side} so that pixels repeat evenly, got {img_size}; e.g."
            f" {max(2 * side, round(img_size / (2 * side)) * 2 * side)}"
        )
    if size < 2 or snr <= 0 or sigma <= 0 or not 0 <= redraw <= 1:
        raise ConfigError(
            f"toy needs size >= 2, snr > 0, sigma > 0, redraw in [0, 1];"
            f" got size={size}, snr={snr}, sigma={sigma}, redraw={redraw}"
        )
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(dim, generator=g)
    mu = direction / direction.norm() * snr * sigma * math.sqrt(dim)
    g.manual_seed(seed * 2 + (1 if split == "train" else 2))
    n = size if split == "train" else max(size // 4, 2)
    y = torch.randint(0, 2, (n,), generator=g)
    noise = ToyAugment(mu, sigma).noise(n, g)
    signal = (2 * y - 1).float()[:, None] * mu[None]
    first = torch.rand(n, generator=g) < 0.5
    patches = torch.where(first[:, None, None], torch.stack([signal, noise], 1),
                          torch.stack([noise, signal], 1))  # fmt: skip
    return ToyDataset(patches, y, first, mu, sigma, snr, redraw, img_size=img_size)
