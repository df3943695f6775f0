"""One call from an encoder and two data sets to downstream accuracy."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import Dataset

from memprune.errors import ConfigError
from memprune.probe._features import extract_features
from memprune.probe._knn import DEFAULT_KS, knn_accuracy
from memprune.probe._linear import DEFAULT_CS, LinearProbe


def _features(encoder, train, test, normalize, batch_size, cache_dir, device, progress):
    start = time.perf_counter()
    if len(train) == 0 or len(test) == 0:
        raise ConfigError(f"empty data set (train {len(train)}, test {len(test)} points)")
    tr = extract_features(
        encoder, train, normalize, batch_size, cache_dir, device, progress=progress
    )
    te = extract_features(
        encoder, test, normalize, batch_size, cache_dir, device, progress=progress
    )
    missing = sorted(set(te.labels.tolist()) - set(tr.labels.tolist()))
    if missing:
        raise ConfigError(
            f"test classes {missing} never occur in train: a probe cannot predict them"
        )
    return tr, te, time.perf_counter() - start


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Counts ``[true class, predicted class]``."""
    cm = torch.zeros(n_classes, n_classes, dtype=torch.long)
    ones = torch.ones(len(y_true), dtype=torch.long)
    cm.index_put_((y_true.long().cpu(), y_pred.long().cpu()), ones, accumulate=True)
    return cm


def linear_probe(
    encoder: nn.Module,
    train: Dataset,
    test: Dataset,
    backend: str = "auto",
    Cs=DEFAULT_CS,
    val_fraction: float = 0.2,
    seed: int = 0,
    normalize="auto",
    batch_size: int = 256,
    cache_dir=None,
    device=None,
    progress: bool | None = None,
) -> dict:
    """Linear-probe test accuracy of a frozen encoder (docs/method.md §11); the torch backend fits
    on the encoder's device.

    Returns ``accuracy``, ``C`` (chosen on validation), ``val_scores``, ``confusion`` (a
    ``[classes, classes]`` tensor of counts), ``n_train``, ``n_test`` and ``timings`` (s).
    """
    tr, te, t_extract = _features(
        encoder, train, test, normalize, batch_size, cache_dir, device, progress
    )
    param = next(encoder.parameters(), None)
    on = param.device if param is not None and backend != "sklearn" else torch.device("cpu")
    start = time.perf_counter()
    probe = LinearProbe(backend, Cs, val_fraction, seed).fit(tr.features.to(on), tr.labels.to(on))
    t_fit = time.perf_counter() - start
    pred = probe.predict(te.features.to(on)).cpu()
    n_classes = int(max(tr.labels.max(), te.labels.max())) + 1
    return {
        "accuracy": float((pred == te.labels).double().mean()),
        "C": probe.C_,
        "val_scores": probe.val_scores_,
        "backend": probe.backend_,
        "confusion": confusion_matrix(te.labels, pred, n_classes),
        "n_train": len(tr.labels),
        "n_test": len(te.labels),
        "timings": {"extract_s": t_extract, "fit_s": t_fit},
    }


def knn_probe(
    encoder: nn.Module,
    train: Dataset,
    test: Dataset,
    ks=DEFAULT_KS,
    temperature: float = 0.07,
    val_fraction: float = 0.2,
    seed: int = 0,
    normalize="auto",
    batch_size: int = 256,
    cache_dir=None,
    device=None,
    progress: bool | None = None,
) -> dict:
    """Weighted-kNN test accuracy of a frozen encoder; keys as :func:`linear_probe` with ``k``."""
    tr, te, t_extract = _features(
        encoder, train, test, normalize, batch_size, cache_dir, device, progress
    )
    start = time.perf_counter()
    out = knn_accuracy(
        tr.features, tr.labels, te.features, te.labels, ks, temperature, val_fraction, seed
    )
    n_classes = int(max(tr.labels.max(), te.labels.max())) + 1
    return {
        "accuracy": out["accuracy"],
        "k": out["k"],
        "val_scores": out["val_scores"],
        "confusion": confusion_matrix(te.labels, out["predictions"], n_classes),
        "n_train": len(tr.labels),
        "n_test": len(te.labels),
        "timings": {"extract_s": t_extract, "knn_s": time.perf_counter() - start},
    }
