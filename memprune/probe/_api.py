"""One call from an encoder and two data sets to downstream accuracy."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset

from memprune.engine import normalization_record
from memprune.errors import ConfigError
from memprune.probe._features import extract_features
from memprune.probe._knn import DEFAULT_KS, knn_accuracy
from memprune.probe._linear import DEFAULT_CS, LinearProbe
from memprune.results import Result


@dataclass
class ProbeResult(Result):
    """Test accuracy of a probe on frozen features, and how it was chosen.

    Attributes:
        accuracy: test accuracy.
        choice: the hyperparameter chosen on validation (``C`` of the linear probe, ``k`` of
            kNN), and ``val_scores`` its validation accuracy for every candidate.
        confusion: counts ``[true class, predicted class]``.
        predictions, labels, indices: per test point ``[n_test]``, sorted by data index: the
            predicted class, the true class and the point's index (what two encoders' probes
            disagree on, example by example: :func:`memprune.probe.flips`).
        n_train, n_test: points the probe was fitted and tested on.
        timings: seconds spent extracting features and fitting.
        meta: ``probe`` (``linear`` / ``knn``), the backend and what else made it.
    """

    kind = "probe"
    accuracy: float
    choice: dict
    val_scores: dict
    confusion: torch.Tensor
    n_train: int
    n_test: int
    timings: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    predictions: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    indices: torch.Tensor | None = None

    def to_rows(self) -> list[dict]:
        return [{"probe": self.meta.get("probe"), "accuracy": self.accuracy, **self.choice}]

    def correct(self) -> torch.Tensor:
        """Per test point (sorted by data index): whether the probe got it right."""
        if self.predictions is None:
            raise ConfigError("this probe result holds no per-example predictions (saved by an"
                              " older memprune): probe the encoder again")  # fmt: skip
        return self.predictions == self.labels

    def _tensors(self) -> dict[str, torch.Tensor]:
        per_point = {"predictions": self.predictions, "labels": self.labels,
                     "indices": self.indices}  # fmt: skip
        return {
            "confusion": self.confusion,
            **{k: v for k, v in per_point.items() if v is not None},
        }

    def _fields(self) -> dict:
        scores = {str(k): v for k, v in self.val_scores.items()}
        return {
            "accuracy": self.accuracy, "choice": self.choice, "val_scores": scores,
            "n_train": self.n_train, "n_test": self.n_test, "timings": self.timings,
        }  # fmt: skip

    @classmethod
    def _build(cls, t, fields, meta):
        per_point = {k: t[k] for k in ("predictions", "labels", "indices") if k in t}
        return cls(confusion=t["confusion"], meta=meta, **per_point, **fields)


#: Rows a probe reads at a time from features on disk (``store``): 64 Ki rows of 2048 float64
#: features are 1 GiB.
STORE_ROWS = 65536


def _features(encoder, train, test, normalize, chunk_size, cache_dir, device, progress,
              precision, store):  # fmt: skip
    start = time.perf_counter()
    if len(train) == 0 or len(test) == 0:
        raise ConfigError(f"empty data set (train {len(train)}, test {len(test)} points)")
    if store is not None and cache_dir is not None:
        raise ConfigError(
            "give cache_dir (features kept in memory, cached as one file) or store (features"
            " memory-mapped on disk, for data sets too large for memory), not both"
        )
    run = dict(normalize=normalize, chunk_size=chunk_size, cache_dir=cache_dir, device=device,
               progress=progress, precision=precision, store=store)  # fmt: skip
    tr = extract_features(encoder, train, **run)
    te = extract_features(encoder, test, **run)
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


def _result(tr, te, pred, choice, val_scores, timings, meta) -> ProbeResult:
    n_classes = int(max(tr.labels.max(), te.labels.max())) + 1
    return ProbeResult(
        accuracy=float((pred == te.labels).double().mean()), choice=choice,
        val_scores=val_scores, confusion=confusion_matrix(te.labels, pred, n_classes),
        n_train=len(tr.labels), n_test=len(te.labels), timings=timings, meta=meta,
        predictions=pred.long().cpu(), labels=te.labels.long().cpu(),
        indices=te.indices.long().cpu(),
    )  # fmt: skip


def linear_probe(
    encoder: nn.Module,
    train: Dataset,
    test: Dataset,
    backend: str = "auto",
    Cs=DEFAULT_CS,
    val_fraction: float = 0.2,
    seed: int = 0,
    normalize="auto",
    chunk_size: int = 256,
    cache_dir=None,
    device=None,
    progress: bool | None = None,
    precision: str = "auto",
    store=None,
) -> ProbeResult:
    """Linear-probe test accuracy of a frozen encoder (docs/method.md §11); the torch backend fits
    on the encoder's device. ``choice`` holds ``C`` (chosen on validation); ``meta`` the
    backend used. ``chunk_size``: images per extraction pass (never changes the result);
    ``precision``: what the encoder computes in (``auto``: bf16 on a CUDA device that supports
    it, else fp32; features are stored in float32).

    ``store``: a directory for data sets whose features do not fit in memory. The features go
    to memory-mapped files there (:func:`extract_features`) and the probe reads them
    :data:`STORE_ROWS` rows at a time (the torch backend; see :class:`LinearProbe`), so memory
    stays flat as N grows; the accuracy equals the in-memory probe's up to float summation
    order."""
    tr, te, t_extract = _features(
        encoder, train, test, normalize, chunk_size, cache_dir, device, progress, precision, store
    )
    param = next(encoder.parameters(), None)
    on = param.device if param is not None and backend != "sklearn" else torch.device("cpu")
    start = time.perf_counter()
    chunk = None if store is None else STORE_ROWS
    probe = LinearProbe(backend, Cs, val_fraction, seed, chunk_rows=chunk, device=on)
    probe.fit(tr.features, tr.labels)
    t_fit = time.perf_counter() - start
    pred = probe.predict(te.features).cpu()
    meta = {"probe": "linear", "backend": probe.backend_, "val_fraction": val_fraction,
            "seed": seed, "normalization": normalization_record(encoder, normalize),
            **({"store": True} if store is not None else {})}  # fmt: skip
    timings = {"extract_s": t_extract, "fit_s": t_fit}
    return _result(tr, te, pred, {"C": probe.C_}, probe.val_scores_, timings, meta)


def knn_probe(
    encoder: nn.Module,
    train: Dataset,
    test: Dataset,
    ks=DEFAULT_KS,
    temperature: float = 0.07,
    val_fraction: float = 0.2,
    seed: int = 0,
    normalize="auto",
    chunk_size: int = 256,
    cache_dir=None,
    device=None,
    progress: bool | None = None,
    precision: str = "auto",
    store=None,
) -> ProbeResult:
    """Weighted-kNN test accuracy of a frozen encoder; ``choice`` holds ``k``. The search runs
    on the encoder's device. Arguments as :func:`linear_probe` (with ``store``, the train
    features are searched :data:`STORE_ROWS` rows at a time)."""
    tr, te, t_extract = _features(
        encoder, train, test, normalize, chunk_size, cache_dir, device, progress, precision, store
    )
    param = next(encoder.parameters(), None)
    on = param.device if param is not None else torch.device("cpu")
    start = time.perf_counter()
    out = knn_accuracy(
        tr.features, tr.labels, te.features, te.labels, ks, temperature, val_fraction, seed,
        chunk=None if store is None else STORE_ROWS, device=on,
    )  # fmt: skip
    meta = {"probe": "knn", "temperature": temperature, "val_fraction": val_fraction,
            "seed": seed, "normalization": normalization_record(encoder, normalize),
            **({"store": True} if store is not None else {})}  # fmt: skip
    timings = {"extract_s": t_extract, "knn_s": time.perf_counter() - start}
    return _result(tr, te, out["predictions"], {"k": out["k"]}, out["val_scores"], timings, meta)
