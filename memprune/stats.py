"""Mergeable streaming statistics behind UnitMem and ClassMem (docs/method.md §2-§3).

Each state follows torchmetrics' shape: ``update`` folds in a batch, ``merge`` folds in another
process's state, ``compute`` returns the scores. The pure functions ``selectivity`` and
``median_rest`` are shared by the streaming states and by the one-shot reference
(:func:`unitmem_reference`), so both compute the index the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memprune._dist import merged, rank_world
from memprune.registry import Registry

#: Sentinel above every data index, used to pick the lowest index among ties.
_NO_INDEX = torch.iinfo(torch.int64).max


def selectivity(
    mu_max: torch.Tensor, mu_rest: torch.Tensor, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu_max - mu_rest) / (mu_max + mu_rest)`` per unit, and the dead mask.

    A unit with ``mu_max + mu_rest <= eps`` is dead: its score is 0 (no division by zero).
    """
    denom = mu_max + mu_rest
    dead = denom <= eps
    score = torch.where(dead, torch.zeros_like(denom), (mu_max - mu_rest) / denom.clamp_min(eps))
    return score, dead


def median_rest(values: torch.Tensor) -> torch.Tensor:
    """Median over all rows but one maximal row, per column of ``values [N, U]``.

    Removing one maximum leaves the N-1 smallest values, so the k-th smallest of the rest is
    the k-th smallest of all for k <= N-1: ``kthvalue`` gives it without sorting (and without
    an N x U index tensor). Even counts take the mean of the two middle values.
    """
    m = values.shape[0] - 1
    if m % 2:
        return values.kthvalue(m // 2 + 1, dim=0).values
    return (values.kthvalue(m // 2, dim=0).values + values.kthvalue(m // 2 + 1, dim=0).values) / 2


def _max_lowest_index(
    values: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column max of ``values [N, U]`` and the lowest ``indices [N]`` attaining it."""
    top = values.max(dim=0).values
    candidates = torch.where(values == top, indices[:, None], _NO_INDEX)
    return top, candidates.min(dim=0).values


@dataclass
class MeanRestState:
    """Running sum, max, argmax (lowest index on ties) and count of per-point values, per unit.

    Memory is O(units), independent of the number of points. ``mu_rest`` is the mean over all
    points but the argmax: ``(sum - max) / (count - 1)``. Sums are kept in float64.
    """

    sum: torch.Tensor
    max: torch.Tensor
    argmax: torch.Tensor
    count: int = 0

    @classmethod
    def empty(cls, n_units: int, device: torch.device | str = "cpu") -> MeanRestState:
        return cls(
            sum=torch.zeros(n_units, dtype=torch.float64, device=device),
            max=torch.full((n_units,), -torch.inf, dtype=torch.float64, device=device),
            argmax=torch.full((n_units,), _NO_INDEX, dtype=torch.int64, device=device),
        )

    def _fold(self, top: torch.Tensor, top_index: torch.Tensor) -> None:
        better = (top > self.max) | ((top == self.max) & (top_index < self.argmax))
        self.max = torch.where(better, top, self.max)
        self.argmax = torch.where(better, top_index, self.argmax)

    def update(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        """Fold in per-point values ``[B, U]`` of the points with data indices ``[B]``."""
        values = values.to(torch.float64)
        self.sum += values.sum(dim=0)
        self._fold(*_max_lowest_index(values, indices.to(values.device)))
        self.count += len(values)

    def merge(self, other: MeanRestState) -> None:
        self.sum += other.sum.to(self.sum.device)
        self._fold(other.max.to(self.max.device), other.argmax.to(self.argmax.device))
        self.count += other.count

    def compute(self, eps: float = 1e-8) -> dict[str, torch.Tensor]:
        if self.count < 2:
            raise ValueError(f"selectivity needs at least 2 points, got {self.count}")
        mu_rest = (self.sum - self.max) / (self.count - 1)
        score, dead = selectivity(self.max, mu_rest, eps)
        return _result(score, self.argmax, self.max, mu_rest, dead)


@dataclass
class MatrixState:
    """Keeps every per-point row: needed for the median over the rest.

    Memory is ``N x units`` float32 (e.g. 50,000 points x 3,904 ResNet-18 units = 780 MB).
    """

    values: list[torch.Tensor]
    indices: list[torch.Tensor]

    @classmethod
    def empty(cls, n_units: int, device: torch.device | str = "cpu") -> MatrixState:
        return cls([], [])

    def update(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        self.values.append(values.to("cpu", torch.float32))  # kept off the accelerator
        self.indices.append(indices.to("cpu"))

    def merge(self, other: MatrixState) -> None:
        self.values += other.values
        self.indices += other.indices

    def compute(self, eps: float = 1e-8, block: int = 1024) -> dict[str, torch.Tensor]:
        """Scores, ``block`` units at a time so the transient copy stays ``N x block``."""
        indices = torch.cat(self.indices)
        if len(indices) < 2:
            raise ValueError(f"selectivity needs at least 2 points, got {len(indices)}")
        tops, args, rests = [], [], []
        for start in range(0, self.values[0].shape[1], block):
            cols = torch.cat([v[:, start : start + block] for v in self.values])  # [N, block]
            top, arg = _max_lowest_index(cols, indices)
            tops.append(top)
            args.append(arg)
            rests.append(median_rest(cols))
        top, mu_rest = torch.cat(tops), torch.cat(rests)
        score, dead = selectivity(top, mu_rest, eps)
        return _result(score, torch.cat(args), top, mu_rest, dead)


@dataclass
class ClassMeanState:
    """Per-class sums and counts of per-point values; ClassMem selects over class means.

    ``rest="mean"`` averages the other classes' means, ``"median"`` takes their median.
    """

    sum: torch.Tensor  # [C, U] float64
    count: torch.Tensor  # [C] float64

    @classmethod
    def empty(cls, n_units: int, n_classes: int, device: torch.device | str = "cpu"):
        return cls(
            torch.zeros(n_classes, n_units, dtype=torch.float64, device=device),
            torch.zeros(n_classes, dtype=torch.float64, device=device),
        )

    def update(self, values: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.to(self.sum.device)
        self.sum.index_add_(0, labels, values.to(self.sum))
        self.count.index_add_(0, labels, torch.ones_like(labels, dtype=self.count.dtype))

    def merge(self, other: ClassMeanState) -> None:
        self.sum += other.sum.to(self.sum.device)
        self.count += other.count.to(self.count.device)

    def compute(self, rest: str = "mean", eps: float = 1e-8) -> dict[str, torch.Tensor]:
        present = self.count > 0
        if int(present.sum()) < 2:
            raise ValueError(f"ClassMem needs at least 2 classes, got {int(present.sum())}")
        means = self.sum[present] / self.count[present, None]  # [C', U]
        classes = torch.nonzero(present).flatten()
        top, arg = _max_lowest_index(means, torch.arange(len(means), device=means.device))
        if rest == "median":
            mu_rest = median_rest(means)
        else:
            mu_rest = (means.sum(0) - top) / (len(means) - 1)
        score, dead = selectivity(top, mu_rest, eps)
        return _result(score, classes[arg], top, mu_rest, dead)


#: ``rest``: how mu_rest is taken over the points but the top one -> the state that keeps it.
RESTS = Registry("rest statistic", {"mean": MeanRestState, "median": MatrixState})


@dataclass
class RowsState:
    """Per-point rows (data indices and values), kept as they come; merged by concatenation."""

    indices: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    def update(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        self.indices.append(indices.to("cpu", torch.long))
        self.values.append(values.detach().to("cpu", torch.float64))

    def merge(self, other: RowsState) -> None:
        self.indices += other.indices
        self.values += other.values

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices [N], values [N, ...])`` sorted by data index."""
        indices, values = torch.cat(self.indices), torch.cat(self.values)
        order = indices.argsort()
        return indices[order], values[order]


class Metric:
    """A streaming metric: ``update`` on batches, ``merge`` another instance, ``compute``,
    ``reset``; ``sync`` merges the states of every process (torchrun / accelerate launch) in
    rank order, the one distributed path every metric shares. The state is a dataclass of
    tensors, ints and lists of row tensors with its own ``merge``."""

    def __init__(self) -> None:
        self.reset()

    def _empty(self):
        raise NotImplementedError

    def reset(self) -> None:
        """Forget every update."""
        self.state = self._empty()

    def merge(self, other: Metric) -> Metric:
        """Fold in ``other``'s updates (another shard of the same data); returns self."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}")
        self.state.merge(other.state)
        return self

    def sync(self) -> Metric:
        """Merge every process's state into every process (a no-op in one process)."""
        _, world = rank_world()
        self.state = merged(self.state, world)
        return self


def _result(score, argmax, mu_max, mu_rest, dead) -> dict[str, torch.Tensor]:
    return {
        "score": score.float(),
        "argmax": argmax.long(),
        "mu_max": mu_max.float(),
        "mu_rest": mu_rest.float(),
        "dead": dead,
    }


def unitmem_reference(
    acts: torch.Tensor, indices: torch.Tensor, rest: str = "mean", eps: float = 1e-8
) -> dict[str, torch.Tensor]:
    """One-shot UnitMem from stored activations ``[N, K, U]`` (views of each point).

    The brute-force reference the streaming states are tested against.
    """
    mu = acts.double().mean(dim=1)  # [N, U]: the K views averaged before the max
    top, argmax = _max_lowest_index(mu, indices)
    if rest == "median":
        mu_rest = median_rest(mu)
    else:
        mask = indices[:, None] == argmax[None, :]  # [N, U]: the memorized point of each unit
        mu_rest = (mu * ~mask).sum(0) / (~mask).sum(0)
    score, dead = selectivity(top, mu_rest, eps)
    return _result(score, argmax, top, mu_rest, dead)
