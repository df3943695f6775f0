"""The validation split a probe chooses its hyperparameter on (C, k)."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from memprune.errors import ConfigError


def validation_split(labels: torch.Tensor, val_fraction: float, seed: int, probe: str,
                     fix: str) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Training and validation rows, stratified by class where every class has two points;
    refused, with ``fix`` in the message, where the split cannot hold every class (or leaves
    no training row). ``probe`` names what chooses on it ("the linear probe chooses C")."""
    y = labels.cpu().long()
    n = len(y)
    _, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
    k = len(counts)
    n_val = math.ceil(val_fraction * n)  # as scikit-learn rounds a fraction
    stratify = inverse.numpy() if int(counts.min()) >= 2 else None
    if n_val >= n or (stratify is not None and min(n_val, n - n_val) < k):
        raise ConfigError(
            f"{probe} on a validation split of {val_fraction:g} of its {n} training points"
            f" ({n_val}), too few for its {k} classes: give it more training points, or {fix}"
        )
    return train_test_split(np.arange(n), test_size=val_fraction, random_state=seed,
                            stratify=stratify)  # fmt: skip
