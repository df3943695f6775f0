"""Linear probe: multinomial logistic regression on frozen features (METHOD.md §11).

A scikit-learn style estimator (``fit`` returns self, fitted attributes end in ``_``):
standardize on train; sweep the inverse L2 strength ``C`` over ``Cs``, each fit on a seeded
stratified validation split carved from train and scored on it; refit with the best ``C`` on
all of train. The test set never enters ``fit``. Both backends minimise the same objective,
scikit-learn's ``C * sum(CE) + ||W||^2 / 2`` (the torch backend as ``mean(CE) +
||W||^2 / (2 C n)`` with L-BFGS, on the features' device), so their ``C`` grids agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from memprune.errors import ConfigError

BACKENDS = ("torch", "sklearn")
DEFAULT_CS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def check_xy(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    if x.ndim != 2 or len(x) == 0:
        raise ConfigError(f"features must be a non-empty [N, D] matrix, got shape {tuple(x.shape)}")
    if y is not None and len(y) != len(x):
        raise ConfigError(f"{len(x)} feature rows but {len(y)} labels")


def _fit_torch(x, y, n_classes, c, max_iter) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(x.shape[1], n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-9,
        history_size=20, line_search_fn="strong_wolfe",
    )  # fmt: skip
    penalty = 1.0 / (2 * c * len(x))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + penalty * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


class LinearProbe:
    """Multinomial logistic regression with an L2 sweep selected on validation.

    Args:
        backend: ``torch`` (L-BFGS on the features' device) or ``sklearn``
            (``LogisticRegression``).
        Cs: inverse L2 strengths to sweep.
        val_fraction: share of train carved out (stratified, seeded) to choose ``C``.
        seed: seed of the validation split.
        max_iter: iteration budget of each fit.

    Fitted attributes: ``classes_``, ``mean_``, ``scale_`` (standardization), ``C_`` (chosen),
    ``val_scores_`` (C -> validation accuracy), ``coef_`` [D, classes], ``intercept_``.
    """

    def __init__(
        self,
        backend: str = "torch",
        Cs: Sequence[float] = DEFAULT_CS,
        val_fraction: float = 0.2,
        seed: int = 0,
        max_iter: int = 500,
    ) -> None:
        self.backend = backend
        self.Cs = Cs
        self.val_fraction = val_fraction
        self.seed = seed
        self.max_iter = max_iter

    def _standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean_) / self.scale_

    def _fit_one(self, x: torch.Tensor, y: torch.Tensor, c: float):
        if self.backend == "torch":
            return _fit_torch(x, y, len(self.classes_), c, self.max_iter)
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(C=c, max_iter=self.max_iter).fit(x.cpu().numpy(), y.cpu().numpy())
        coef = torch.as_tensor(clf.coef_.T, dtype=x.dtype, device=x.device)
        return coef, torch.as_tensor(clf.intercept_, dtype=x.dtype, device=x.device)

    def fit(self, x, y) -> LinearProbe:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        x, y = _as_tensor(x).double(), _as_tensor(y).long()
        check_xy(x, y)
        self.classes_, y_idx = torch.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ConfigError(
                f"a linear probe needs at least 2 classes, got {self.classes_.tolist()}"
            )
        self.mean_ = x.mean(0)
        self.scale_ = x.std(0, unbiased=False).clamp_min(1e-12)
        xs = self._standardize(x)
        counts = torch.bincount(y_idx)
        stratify = y_idx.cpu().numpy() if int(counts.min()) >= 2 else None
        tr, va = train_test_split(np.arange(len(x)), test_size=self.val_fraction,
                                  random_state=self.seed, stratify=stratify)  # fmt: skip
        tr, va = torch.as_tensor(tr, device=x.device), torch.as_tensor(va, device=x.device)
        self.val_scores_ = {}
        for c in self.Cs:
            w, b = self._fit_one(xs[tr], y_idx[tr], c)
            self.val_scores_[float(c)] = float(
                ((xs[va] @ w + b).argmax(1) == y_idx[va]).double().mean()
            )
        self.C_ = max(
            self.val_scores_, key=lambda c: (self.val_scores_[c], -c)
        )  # ties: stronger L2
        self.coef_, self.intercept_ = self._fit_one(xs, y_idx, self.C_)
        return self

    def decision_function(self, x) -> torch.Tensor:
        x = _as_tensor(x).double().to(self.coef_.device)
        check_xy(x)
        if x.shape[1] != self.coef_.shape[0]:
            raise ConfigError(
                f"features have {x.shape[1]} dimensions but the probe was fitted on"
                f" {self.coef_.shape[0]}: extract them with the same encoder"
            )
        return self._standardize(x) @ self.coef_ + self.intercept_

    def predict(self, x) -> torch.Tensor:
        return self.classes_[self.decision_function(x).argmax(1)]

    def predict_proba(self, x) -> torch.Tensor:
        return self.decision_function(x).softmax(1)

    def score(self, x, y) -> float:
        y = _as_tensor(y).long().to(self.classes_.device)
        return float((self.predict(x) == y).double().mean())
