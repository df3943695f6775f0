"""Linear probe: multinomial logistic regression on frozen features (docs/method.md §11).

A scikit-learn style estimator (``fit`` returns self, fitted attributes end in ``_``):
standardize on train; sweep the inverse L2 strength ``C`` over ``Cs``, each fit on a seeded
stratified validation split carved from train and scored on it; refit with the best ``C`` on
all of train. The test set never enters ``fit``. Both backends minimise the same objective,
scikit-learn's ``C * sum(CE) + ||W||^2 / 2`` (the torch backend as ``mean(CE) +
||W||^2 / (2 C n)`` with L-BFGS, on the features' device), so their ``C`` grids agree.

Convergence: both backends stop when the largest absolute gradient of the scaled objective
``mean(CE) + ||W||^2 / (2 C n)`` falls below ``tol``, with an iteration cap high enough that
it is reached only on pathological input (scikit-learn's own defaults stop at 100 iterations,
which left weights up to 5% away from the optimum on ill-conditioned features). At the default
``tol=1e-4`` the two backends' weights agree to about 5e-3 relative on ill-conditioned features
and their predictions to over 99%; at ``tol=1e-6`` the weights agree to about 2e-4
(tests/test_probe.py), at several times the cost on such features. Every C warm-starts from the
solution at the previous one. A fit that runs out of ``max_iter`` first emits one
:class:`ProbeConvergenceWarning` naming the gradient it reached and the fix, instead of a
warning per fit.

Features larger than memory: with ``chunk_rows`` (``linear_probe(store=...)`` sets it) the
features stay where they are, typically a memory-mapped file on disk, and every pass reads
``chunk_rows`` rows at a time: the standardization statistics, each L-BFGS objective and
gradient (summed over chunks) and the predictions. Nothing of size N x D is ever copied; the
result equals the in-memory fit up to float summation order (tests/test_probe.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from memprune.errors import ConfigError
from memprune.probe._split import validation_split
from memprune.registry import Registry

#: ``auto`` fits with scikit-learn when the features are on the CPU (1.2 s against torch's 3.3 s
#: on 300 x 64 digits features, measured when this default was chosen) and with torch on an
#: accelerator.
DEFAULT_CS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
#: Largest absolute gradient of the scaled objective at which a fit counts as converged.
TOL = 1e-4


class ProbeConvergenceWarning(UserWarning):
    """A linear-probe fit used its whole iteration budget before reaching the tolerance."""


def objective_gradient(data: Rows, y, w, b, c) -> float:
    """Largest absolute gradient of ``mean(CE(x @ w + b, y)) + ||w||^2 / (2 c n)``."""
    w = w.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        _objective(data, y, w, b, c)
    return float(torch.cat([w.grad.flatten(), b.grad]).abs().max())


def _objective(data: Rows, y, w, b, c) -> torch.Tensor:
    """The scaled objective at ``(w, b)``, its gradient accumulated into ``w.grad`` and
    ``b.grad``, one chunk of rows at a time (the graph of one chunk lives at a time)."""
    penalty = (w * w).sum() / (2 * c * len(data))
    penalty.backward()
    total = penalty.detach()
    for x, part in data.chunks(y):
        loss = F.cross_entropy(x @ w + b, part, reduction="sum") / len(data)
        loss.backward()
        total = total + loss.detach()
    return total


class Rows:
    """Rows ``rows`` (all: None) of features ``x`` [N, D], standardized with ``mean`` and
    ``scale`` in float64 on ``device``, ``chunk`` rows at a time. ``chunk=None`` reads them
    once and keeps them (features in memory); a chunk size reads them again on every pass, so
    ``x`` may be a memory-mapped file far larger than memory (the rows are then read in
    ascending order)."""

    def __init__(self, x, rows, mean, scale, chunk: int | None, device) -> None:
        self.x, self.mean, self.scale, self.chunk, self.device = x, mean, scale, chunk, device
        if rows is not None and chunk is not None:
            rows = rows.sort().values
        self.rows = rows
        self.kept = None if chunk is not None else self._read(slice(None) if rows is None else rows)

    def __len__(self) -> int:
        return len(self.x) if self.rows is None else len(self.rows)

    def _read(self, where) -> torch.Tensor:
        return (self.x[where].to(self.device).double() - self.mean) / self.scale

    def labels(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` (one label per row of ``x``) at these rows."""
        return y if self.rows is None else y[self.rows.to(y.device)]

    def chunks(self, y: torch.Tensor | None = None):
        """``(standardized rows, their labels)`` per chunk (labels None without ``y``)."""
        y = None if y is None else self.labels(y)
        if self.kept is not None:
            yield self.kept, y
            return
        for start in range(0, len(self), self.chunk):
            end = start + self.chunk
            where = slice(start, end) if self.rows is None else self.rows[start:end]
            yield self._read(where), None if y is None else y[start:end]


def _moments(x: torch.Tensor, chunk: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and population std of ``x`` in float64 (two passes of ``chunk`` rows)."""
    if chunk is None:
        x = x.to(device).double()
        return x.mean(0), x.std(0, unbiased=False)
    parts = range(0, len(x), chunk)
    mean = sum(x[i : i + chunk].to(device).double().sum(0) for i in parts) / len(x)
    var = sum(((x[i : i + chunk].to(device).double() - mean) ** 2).sum(0) for i in parts)
    return mean, (var / len(x)).sqrt()


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def check_xy(x: torch.Tensor, y: torch.Tensor | None = None, chunk: int | None = None) -> None:
    if x.ndim != 2 or len(x) == 0:
        raise ConfigError(f"features must be a non-empty [N, D] matrix, got shape {tuple(x.shape)}")
    if y is not None and len(y) != len(x):
        raise ConfigError(f"{len(x)} feature rows but {len(y)} labels")
    step = chunk or len(x)
    bad = sum(int((~torch.isfinite(x[i : i + step])).any(1).sum()) for i in range(0, len(x), step))
    if bad:
        raise ConfigError(
            f"{bad} of {len(x)} feature rows hold NaN or inf values: the encoder's weights or"
            " the images hold NaN or inf; check them (a probe on them would report chance)"
        )


def _fit_torch(data: Rows, y, n_classes, c, max_iter, tol, init=None):
    """L-BFGS on the scaled objective, summed over ``data``'s chunks at every evaluation."""
    if init is None:
        w = torch.zeros(data.x.shape[1], n_classes, dtype=torch.float64, device=data.device)
        b = torch.zeros(n_classes, dtype=torch.float64, device=data.device)
    else:
        w, b = init
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
        history_size=20, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure():
        opt.zero_grad()
        return _objective(data, y, w, b, c)

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _fit_sklearn(data: Rows, y, n_classes, c, max_iter, tol, init=None):
    """scikit-learn's ``LogisticRegression`` (lbfgs) at the same objective and tolerance, on
    rows held in memory."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    # two classes: scikit-learn fits one logit difference v with penalty ||v||^2 / 2;
    # the multinomial optimum (rows -v/2, v/2, penalty ||v||^2 / 4) is that fit at 2C
    binary = n_classes == 2
    clf = LogisticRegression(C=2 * c if binary else c, max_iter=max_iter, tol=tol,
                             warm_start=init is not None)  # fmt: skip
    if init is not None:
        w0, b0 = init
        if binary:
            w0, b0 = w0[:, 1:] - w0[:, :1], b0[1:] - b0[:1]
        clf.coef_, clf.intercept_ = w0.T.cpu().numpy(), b0.cpu().numpy()
    with warnings.catch_warnings():  # judged by the caller, once, on the same criterion
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(data.kept.cpu().numpy(), data.labels(y).cpu().numpy())
    w = torch.as_tensor(clf.coef_.T, dtype=torch.float64, device=data.device)
    b = torch.as_tensor(clf.intercept_, dtype=torch.float64, device=data.device)
    if binary:
        w, b = torch.cat([-w / 2, w / 2], 1), torch.cat([-b / 2, b / 2])
    return w, b


#: ``backend`` -> the fit; ``auto`` fits with scikit-learn when the features are on the CPU
#: (1.2 s against torch's 3.3 s on 300 x 64 digits features, measured when this default was
#: chosen) and with torch on an accelerator.
BACKENDS = Registry(
    "probe backend",
    {"auto": None, "torch": _fit_torch, "sklearn": _fit_sklearn},
)


class LinearProbe:
    """Multinomial logistic regression with an L2 sweep selected on validation.

    Args:
        backend: ``torch`` (L-BFGS on the features' device), ``sklearn``
            (``LogisticRegression``) or ``auto`` (scikit-learn for CPU features, torch for
            features on an accelerator). Both minimize the same objective to ``tol``.
        Cs: inverse L2 strengths to sweep.
        val_fraction: share of train carved out (stratified, seeded) to choose ``C``.
        seed: seed of the validation split.
        max_iter: iteration budget of each fit.
        tol: convergence tolerance on the largest absolute gradient (see the module docstring).
        chunk_rows: None (the features are read once and kept in memory, in float64) or rows
            per chunk: every pass reads the features ``chunk_rows`` rows at a time, so they
            may be a memory-mapped file larger than memory (torch backend; see the module
            docstring).
        device: where the fit computes; None: the features' device.

    Fitted attributes: ``classes_``, ``mean_``, ``scale_`` (standardization), ``C_`` (chosen),
    ``val_scores_`` (C -> validation accuracy), ``gradients_`` (C -> largest absolute gradient
    at the end of the fit), ``coef_`` [D, classes], ``intercept_``.
    """

    def __init__(
        self,
        backend: str = "auto",
        Cs: Sequence[float] = DEFAULT_CS,
        val_fraction: float = 0.2,
        seed: int = 0,
        max_iter: int = 5000,
        tol: float = TOL,
        chunk_rows: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.backend = backend
        self.Cs = Cs
        self.val_fraction = val_fraction
        self.seed = seed
        self.max_iter = max_iter
        self.tol = tol
        self.chunk_rows = chunk_rows
        self.device = device

    def _rows(self, x: torch.Tensor, rows: torch.Tensor | None) -> Rows:
        return Rows(x, rows, self.mean_, self.scale_, self.chunk_rows, self.mean_.device)

    def _fit_one(self, data: Rows, y: torch.Tensor, c: float, init=None):
        """Fit at ``c`` (from ``init``, the solution at a smaller C: a warm start, which makes
        the weakly regularized fits converge in far fewer iterations)."""
        fit = BACKENDS[self.backend_]
        w, b = fit(data, y, len(self.classes_), c, self.max_iter, self.tol, init)
        self.gradients_[float(c)] = objective_gradient(data, y, w, b, c)
        return w, b

    def _check(self) -> None:
        BACKENDS.check(self.backend)
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        chunk = self.chunk_rows
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int)
                                  or chunk < 1):  # fmt: skip
            raise ConfigError(f"chunk_rows must be an int >= 1 or None, got {chunk!r}")
        if chunk is not None and self.backend == "sklearn":
            raise ConfigError(
                "the sklearn backend needs the features in memory; with chunk_rows use"
                " backend='torch' (or 'auto')"
            )

    def fit(self, x, y) -> LinearProbe:
        self._check()
        x, y = _as_tensor(x), _as_tensor(y).long()
        check_xy(x, y, self.chunk_rows)
        device = x.device if self.device is None else torch.device(self.device)
        self.backend_ = self.backend
        if self.backend == "auto":
            on_cpu = device.type == "cpu" and self.chunk_rows is None
            self.backend_ = "sklearn" if on_cpu else "torch"
        self.classes_, y_idx = torch.unique(y.to(device), return_inverse=True)
        if len(self.classes_) < 2:
            raise ConfigError(
                f"a linear probe needs at least 2 classes, got {self.classes_.tolist()}"
            )
        self.mean_, scale = _moments(x, self.chunk_rows, device)
        self.scale_ = scale.clamp_min(1e-12)
        self.val_scores_, self.gradients_ = {}, {}
        try:
            fix = "one C (Cs=[1.0]; CLI --cs 1.0) to skip the choice"
            tr, va = validation_split(y_idx, self.val_fraction, self.seed,
                                      "the linear probe chooses C", fix)  # fmt: skip
        except ConfigError:
            if len(self.Cs) > 1:
                raise
            # one C, nothing to choose: fit on every point, with no validation score
            self.C_ = float(self.Cs[0])
            self.coef_, self.intercept_ = self._fit_one(self._rows(x, None), y_idx, self.C_, None)
            self._warn_unconverged()
            return self
        train, val = self._rows(x, torch.as_tensor(tr)), self._rows(x, torch.as_tensor(va))
        fits, init = {}, None
        for c in sorted(self.Cs):  # ascending: each fit starts from the previous solution
            w, b = init = fits[float(c)] = self._fit_one(train, y_idx, c, init)
            right = sum(int(((xv @ w + b).argmax(1) == yv).sum()) for xv, yv in val.chunks(y_idx))
            self.val_scores_[float(c)] = right / len(val)
        del train, val
        self.C_ = max(
            self.val_scores_, key=lambda c: (self.val_scores_[c], -c)
        )  # ties: stronger L2
        every = self._rows(x, None)
        self.coef_, self.intercept_ = self._fit_one(every, y_idx, self.C_, fits[self.C_])
        self._warn_unconverged()
        return self

    def _warn_unconverged(self) -> None:
        worst = max(self.gradients_.values())
        if worst > 10 * self.tol:  # a converged fit ends at about tol; allow for line searches
            import warnings

            bad = [c for c, g in self.gradients_.items() if g > 10 * self.tol]
            warnings.warn(
                f"linear probe ({self.backend_}): {len(bad)} of {len(self.gradients_)} fits"
                f" (C = {', '.join(f'{c:g}' for c in bad)}) stopped at a gradient of {worst:.1e}"
                f" after max_iter={self.max_iter}, above tol={self.tol:g}; raise max_iter",
                ProbeConvergenceWarning,
                stacklevel=3,
            )

    def decision_function(self, x) -> torch.Tensor:
        """Logits [N, classes] (on the fit's device), ``chunk_rows`` rows at a time."""
        x = _as_tensor(x)
        check_xy(x, chunk=self.chunk_rows)
        if x.shape[1] != self.coef_.shape[0]:
            raise ConfigError(
                f"features have {x.shape[1]} dimensions but the probe was fitted on"
                f" {self.coef_.shape[0]}: extract them with the same encoder"
            )
        parts = [xs @ self.coef_ + self.intercept_ for xs, _ in self._rows(x, None).chunks()]
        return torch.cat(parts)

    def predict(self, x) -> torch.Tensor:
        return self.classes_[self.decision_function(x).argmax(1)]

    def predict_proba(self, x) -> torch.Tensor:
        return self.decision_function(x).softmax(1)

    def score(self, x, y) -> float:
        y = _as_tensor(y).long().to(self.classes_.device)
        return float((self.predict(x) == y).double().mean())
