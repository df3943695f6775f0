"""Gradients for the gradient-based pruning criteria (Taylor, Hessian): callables
``model -> generator`` that accumulate a loss's gradient in the model's parameters, yielding
after each batch's backward (the Hessian criterion squares each batch's gradient; exhausting
the generator leaves the whole loss's gradient).

* :func:`ssl_gradient_fn`: no labels; the SimCLR loss (NT-Xent) of two views per point on the
  encoder's output features (the projection head that trained the encoder is not part of it).
* :func:`head_gradient_fn`: with labels; the cross-entropy of a linear probe fitted on the
  frozen encoder's features (a random head would make the gradients arbitrary).

Both run the encoder in eval mode, so that computing gradients moves no norm statistic; the
gradient is that of the eval-mode network, which is the network that gets pruned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from memprune.data import MultiView, seeded_subset
from memprune.engine import Normalizer, resolve_normalize
from memprune.errors import ConfigError
from memprune.probe import LinearProbe, extract_features
from memprune.train import nt_xent


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def ssl_gradient_fn(
    data: Dataset,
    n_points: int | None = 256,
    batch_size: int = 64,
    augment="simclr",
    temperature: float = 0.5,
    seed: int = 0,
) -> Callable[[nn.Module], Iterator[None]]:
    """The NT-Xent gradient over ``n_points`` of ``data`` (seeded), two views each."""
    if batch_size < 2:
        raise ConfigError(f"batch_size must be >= 2 (NT-Xent contrasts a batch), got {batch_size}")
    views = MultiView(seeded_subset(data, n_points, seed), 2, augment, seed)

    def accumulate(model: nn.Module) -> Iterator[None]:
        device, n = _device(model), len(views)
        norm = Normalizer(resolve_normalize(model, "auto"), device)
        for batch, _, _ in DataLoader(views, batch_size=batch_size):
            if len(batch) < 2:
                continue
            x = norm(batch.to(device).flatten(0, 1)).view(*batch.shape)
            loss = nt_xent(model(x[:, 0]), model(x[:, 1]), temperature) * len(batch) / n
            loss.backward()
            yield

    return accumulate


def head_gradient_fn(data: Dataset, batch_size: int = 128, seed: int = 0):
    """The cross-entropy gradient of a linear probe (torch backend, C chosen on a seeded
    validation split) fitted on the model's frozen features of ``data``."""

    def accumulate(model: nn.Module) -> Iterator[None]:
        device = _device(model)
        feats = extract_features(model, data, device=device, progress=False)
        probe = LinearProbe("torch", seed=seed).fit(feats.features, feats.labels)
        mean, scale = probe.mean_.float().to(device), probe.scale_.float().to(device)
        coef, bias = probe.coef_.float().to(device), probe.intercept_.float().to(device)
        classes = probe.classes_.to(device)
        norm = Normalizer(resolve_normalize(model, "auto"), device)
        for images, labels, _ in DataLoader(data, batch_size=batch_size):
            z = (model(norm(images.to(device))) - mean) / scale
            target = torch.searchsorted(classes, labels.to(device))
            loss = F.cross_entropy(z @ coef + bias, target, reduction="sum") / len(data)
            loss.backward()
            yield

    return accumulate
