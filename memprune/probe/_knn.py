"""Weighted kNN on frozen features (Wu et al. 2018; DINO's protocol; docs/method.md §11).

Cosine similarity on L2-normalized features; the k nearest train points vote for their class
with weight ``exp(similarity / T)``, T = 0.07. ``k`` is chosen from {10, 20, 100, 200} (capped
by the train size) on a seeded stratified validation split carved from train; the test set is
scored once with the chosen k, neighbours drawn from all of train.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from memprune.errors import ConfigError
from memprune.probe._linear import _as_tensor, check_xy

DEFAULT_KS = (10, 20, 100, 200)


def knn_predict(
    train_x: torch.Tensor, train_y: torch.Tensor, x: torch.Tensor, k: int, n_classes: int,
    temperature: float = 0.07, chunk: int = 1024,
) -> torch.Tensor:  # fmt: skip
    """Class predictions of ``x`` by temperature-weighted votes of the k nearest ``train_x``."""
    bank = F.normalize(train_x.float(), dim=1)
    out = []
    for start in range(0, len(x), chunk):
        q = F.normalize(x[start : start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(min(k, len(bank)), dim=1)  # [q, k]
        votes = torch.zeros(len(q), n_classes, device=q.device)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        out.append(votes.argmax(1))
    return torch.cat(out)


def knn_accuracy(
    train_x, train_y, test_x, test_y, ks: Sequence[int] = DEFAULT_KS, temperature: float = 0.07,
    val_fraction: float = 0.2, seed: int = 0,
) -> dict:  # fmt: skip
    """Test accuracy of the weighted kNN with k chosen on validation (see module docstring).

    Returns ``{"accuracy", "k", "val_scores", "predictions"}``.
    """
    train_x, test_x = _as_tensor(train_x), _as_tensor(test_x)
    train_y, test_y = _as_tensor(train_y).long(), _as_tensor(test_y).long()
    check_xy(train_x, train_y)
    check_xy(test_x, test_y)
    if train_x.shape[1] != test_x.shape[1]:
        raise ConfigError(
            f"train features have {train_x.shape[1]} dimensions, test {test_x.shape[1]}"
        )
    missing = sorted(set(test_y.tolist()) - set(train_y.tolist()))
    if missing:
        raise ConfigError(
            f"test classes {missing} never occur in train: no neighbour can vote for them"
        )
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    counts = torch.bincount(train_y)
    stratify = train_y.numpy() if int(counts[counts > 0].min()) >= 2 else None
    tr, va = train_test_split(np.arange(len(train_x)), test_size=val_fraction,
                              random_state=seed, stratify=stratify)  # fmt: skip
    candidates = sorted({min(k, len(tr)) for k in ks})
    val_scores = {}
    for k in candidates:
        pred = knn_predict(train_x[tr], train_y[tr], train_x[va], k, n_classes, temperature)
        val_scores[k] = float((pred == train_y[va]).float().mean())
    best = max(val_scores, key=lambda k: (val_scores[k], -k))
    pred = knn_predict(train_x, train_y, test_x, min(best, len(train_x)), n_classes, temperature)
    return {"accuracy": float((pred == test_y).float().mean()), "k": best,
            "val_scores": val_scores, "predictions": pred}  # fmt: skip
