"""Minibatch unbiased CKA between layers, within one encoder or across two (docs/method.md §6).

For each batch of n images (n >= 4) and every layer, the Gram matrix K = X X^T of the layer's
flattened output (float64) is formed inside the forward hook, its diagonal set to 0, and the
unbiased HSIC of Song et al. accumulated over batches (Nguyen, Raghu & Kornblith, ICLR 2021):

    HSIC1(K, L) = [tr(KL) + (1'K1)(1'L1)/((n-1)(n-2)) - 2/(n-2) 1'KL1] / (n(n-3))
    CKA(a, b)   = sum_batches HSIC1(K_a, K_b) / sqrt(sum HSIC1(K_a, K_a) * sum HSIC1(K_b, K_b))

Minibatches have one size (``minibatch``, an estimator parameter: it changes the estimate); a
last, smaller minibatch is dropped (the estimate averages equal-size
batches). CKA against labels uses the one-hot Gram; augmentation invariance is the CKA of a
layer with itself between two augmented views of the same images. Under ``torchrun`` the
minibatches (runs of ``minibatch`` consecutive points) are dealt whole to the processes, each
sums its own and the sums are merged (:class:`CKA`): the same minibatches as on one process,
so the same estimate up to float summation order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from memprune.data import MultiView, dataset_labels
from memprune.engine import Compute, image_size, score_meta, view_batches
from memprune.errors import ConfigError
from memprune.results import Result
from memprune.sites import find_sites, resolve_sites
from memprune.stats import Metric

MIN_BATCH = 4


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``X X^T`` in float64 with a zero diagonal (a new tensor: ``x`` is not touched)."""
    x = x.flatten(1).double()
    k = x @ x.T
    k.fill_diagonal_(0.0)
    return k


def hsic1(k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC of two zero-diagonal Gram matrices ``[n, n]`` (n >= 4)."""
    n = k.shape[0]
    if n < MIN_BATCH:
        raise ConfigError(f"unbiased HSIC needs batches of at least {MIN_BATCH} points, got {n}")
    k1, m1 = k.sum(dim=1), m.sum(dim=0)
    trace = (k * m.T).sum()
    middle = k1.sum() * m1.sum() / ((n - 1) * (n - 2))
    return (trace + middle - 2.0 / (n - 2) * (k1 @ m1)) / (n * (n - 3))


def _cka(cross: torch.Tensor, self_a: torch.Tensor, self_b: torch.Tensor) -> torch.Tensor:
    denom = (self_a[:, None] * self_b[None, :]).clamp_min(0).sqrt()
    return torch.where(denom > 0, cross / denom.clamp_min(1e-300), torch.zeros_like(cross))


def cka_from_features(
    x: torch.Tensor, y: torch.Tensor, minibatch: int | None = None
) -> torch.Tensor:
    """Minibatch unbiased CKA of precomputed features ``x [N, p]`` and ``y [N, q]`` (rows:
    the same N points, in the same order; ``minibatch=None``: one minibatch of all N). The
    inputs are read, never modified. Returns a float64 scalar tensor."""
    if len(x) != len(y):
        raise ConfigError(f"x has {len(x)} rows but y has {len(y)}: rows must be the same points")
    n = len(x) if minibatch is None else minibatch
    if n < MIN_BATCH or n > len(x):
        raise ConfigError(f"minibatch must be in [{MIN_BATCH}, {len(x)}], got {n}")
    sums = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(x) - n + 1, n):
        kx, ky = _gram(x[start : start + n]), _gram(y[start : start + n])
        sums += torch.stack([hsic1(kx, ky), hsic1(kx, kx), hsic1(ky, ky)]).cpu()
    return _cka(sums[0:1, None], sums[1:2], sums[2:3])[0, 0]


@dataclass
class CKAResult(Result):
    """CKA between the layers of encoder a (rows) and b (columns; a again when b is omitted).

    ``labels_a`` / ``labels_b``: CKA of each layer with the one-hot labels; ``invariance_a`` /
    ``invariance_b``: CKA of each layer between two augmented views (None when not computed).
    """

    kind = "cka"
    matrix: torch.Tensor
    layers_a: list[str]
    layers_b: list[str]
    labels_a: torch.Tensor
    labels_b: torch.Tensor
    invariance_a: torch.Tensor | None = None
    invariance_b: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def to_rows(self) -> list[dict]:
        """One row per layer of a: its CKA with every layer of b."""
        return [
            {"layer": name, **{b: float(v) for b, v in zip(self.layers_b, row)}}
            for name, row in zip(self.layers_a, self.matrix)
        ]

    table = to_rows

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"matrix": self.matrix, "labels_a": self.labels_a, "labels_b": self.labels_b}
        if self.invariance_a is not None:
            tensors.update(invariance_a=self.invariance_a, invariance_b=self.invariance_b)
        return tensors

    def _fields(self) -> dict:
        return {"layers_a": self.layers_a, "layers_b": self.layers_b}

    @classmethod
    def _build(cls, t, fields, meta):
        return cls(t["matrix"], fields["layers_a"], fields["layers_b"], t["labels_a"],
                   t["labels_b"], t.get("invariance_a"), t.get("invariance_b"), meta)  # fmt: skip


def _zeros(*shape) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.float64)


@dataclass
class HSICSums:
    """Sums over minibatches of unbiased HSIC: between a's and b's layers (``cross``), of each
    layer with itself (``aa``, ``bb``), with the labels (``la``, ``lb``) and of the labels with
    themselves (``ll``). Merged by addition."""

    cross: torch.Tensor
    aa: torch.Tensor
    bb: torch.Tensor
    la: torch.Tensor
    lb: torch.Tensor
    ll: torch.Tensor

    def merge(self, other: HSICSums) -> None:
        for name in ("cross", "aa", "bb", "la", "lb", "ll"):
            setattr(self, name, getattr(self, name) + getattr(other, name).to(torch.float64).cpu())


class CKA(Metric):
    """Streaming minibatch CKA between ``layers_a`` and ``layers_b`` (``None``: a with itself).

    ``update(feats_a, feats_b=None, labels=None)`` takes one minibatch of ``n >= 4`` points:
    each layer's features ``[n, ...]`` (the same points, in the same order, for a and b), and
    their labels ``[n]`` when ``n_classes`` is given. Every minibatch should have the same
    size. ``compute()`` gives a :class:`CKAResult`. Two views of the same images as a and b
    give the view invariance (the diagonal).
    """

    def __init__(self, layers_a: Sequence[str], layers_b: Sequence[str] | None = None,
                 n_classes: int | None = None) -> None:  # fmt: skip
        self.layers_a = list(layers_a)
        self.same = layers_b is None
        self.layers_b = self.layers_a if self.same else list(layers_b)
        self.n_classes = n_classes
        super().__init__()

    def _empty(self) -> HSICSums:
        a, b = len(self.layers_a), len(self.layers_b)
        return HSICSums(_zeros(a, b), _zeros(a), _zeros(b), _zeros(a), _zeros(b), _zeros(1))

    def update(self, feats_a: Mapping[str, torch.Tensor],
               feats_b: Mapping[str, torch.Tensor] | None = None,
               labels: torch.Tensor | None = None) -> None:  # fmt: skip
        ga = [_gram(feats_a[name]) for name in self.layers_a]
        gb = ga if feats_b is None else [_gram(feats_b[name]) for name in self.layers_b]
        s = self.state
        s.aa += torch.stack([hsic1(k, k) for k in ga]).cpu()
        s.bb += torch.stack([hsic1(k, k) for k in gb]).cpu()
        s.cross += torch.stack([torch.stack([hsic1(k, kb) for kb in gb]) for k in ga]).cpu()
        if self.n_classes is not None:
            if labels is None:
                raise ConfigError("this CKA was made with n_classes: update() needs the labels")
            lab = _gram(F.one_hot(torch.as_tensor(labels).long(), self.n_classes).to(ga[0].device))
            s.la += torch.stack([hsic1(k, lab) for k in ga]).cpu()
            s.lb += torch.stack([hsic1(k, lab) for k in gb]).cpu()
            s.ll += hsic1(lab, lab).cpu()

    def compute(self) -> CKAResult:
        s = self.state
        matrix = _cka(s.cross, s.aa, s.bb)
        labels_a = _cka(s.la[:, None], s.aa, s.ll)[:, 0]
        labels_b = _cka(s.lb[:, None], s.bb, s.ll)[:, 0]
        return CKAResult(matrix, self.layers_a, self.layers_b, labels_a, labels_b)


def _scan(models, sites, views: MultiView, minibatch: int, compute: Compute, representation,
          normalize, metrics: list[CKA], desc: str) -> None:  # fmt: skip
    """Feed ``metrics`` every full minibatch: with one view per image, ``metrics[0]`` gets a
    against b; with two views, ``metrics[i]`` gets model i's view 1 against its view 2."""
    compute = replace(compute, chunk_size=minibatch)
    for _, labels, acts in view_batches(models, views, sites, compute, normalize=normalize,
                                        representation=representation, desc=desc,
                                        block=minibatch):  # fmt: skip
        if len(labels) < minibatch:
            continue  # equal-size minibatches only
        if views.n_views == 1:
            metrics[0].update(acts[0], None if len(acts) == 1 else acts[-1], labels)
            continue
        for metric, a in zip(metrics, acts):  # rows: [point 0 view 0, point 0 view 1, ...]
            metric.update({k: v[0::2] for k, v in a.items()}, {k: v[1::2] for k, v in a.items()})
    for metric in metrics:
        metric.sync()


def cka(
    dataset: Dataset,
    model_a: nn.Module,
    model_b: nn.Module | None = None,
    layers_a: list[str] | str | None = None,
    layers_b: list[str] | str | None = None,
    minibatch: int = 256,
    representation: str = "flatten",
    invariance: bool = True,
    augment="simclr",
    normalize="auto",
    seed: int = 0,
    device=None,
    num_workers: int | None = None,
    progress: bool | None = None,
    precision: str = "auto",
) -> CKAResult:
    """CKA between every layer site of ``model_a`` and of ``model_b`` (a itself when omitted)
    on the un-augmented images of ``dataset``, with the labels per layer, and (``invariance``)
    between two ``augment`` views of the same images per layer. ``minibatch``: points per
    HSIC estimate (>= 4; an estimator parameter, see the module docstring).
    ``representation``: ``flatten`` (default), ``pool`` or ``cls``.

    Example: ``memprune.cka(test, ssl_encoder, supervised_encoder).matrix`` is ``[La, Lb]``.
    """
    if isinstance(minibatch, bool) or not isinstance(minibatch, int) or minibatch < MIN_BATCH:
        raise ConfigError(f"minibatch must be an int >= {MIN_BATCH}, got {minibatch!r}")
    if len(dataset) < minibatch:
        raise ConfigError(f"minibatch {minibatch} exceeds the {len(dataset)} points: lower it")
    same = model_b is None
    if same and layers_b is not None:
        raise ConfigError("layers_b needs model_b; within one model name the layers by layers_a")
    size = image_size(dataset)

    def layers(model, names):
        if names:
            return resolve_sites(model, names, "layers")
        return find_sites(model, "layers", input_size=size)

    sa = layers(model_a, layers_a)
    sb = sa if same else layers(model_b, layers_b)
    models, sites = ([model_a], [sa]) if same else ([model_a, model_b], [sa, sb])
    compute = Compute(minibatch, device, num_workers, progress, precision)
    na, nb = [x.name for x in sa], [x.name for x in sb]
    n_classes = int(dataset_labels(dataset).max()) + 1
    main = CKA(na, None if same else nb, n_classes)
    run = dict(minibatch=minibatch, compute=compute, representation=representation,
               normalize=normalize)  # fmt: skip
    _scan(models, sites, MultiView(dataset, 1, "none", seed), metrics=[main], desc="CKA", **run)
    result = main.compute()
    if invariance:
        views = [CKA(na, na), CKA(nb, nb)][: len(models)]
        _scan(models, sites, MultiView(dataset, 2, augment, seed), metrics=views,
              desc="CKA views", **run)  # fmt: skip
        result.invariance_a = torch.diagonal(views[0].compute().matrix).clone()
        result.invariance_b = torch.diagonal(views[-1].compute().matrix).clone()
    result.meta = score_meta("cka", model_a, dataset, [], minibatch=minibatch, seed=seed,
                             representation=representation, augment=augment,
                             same_model=same, name_a="a", name_b="a" if same else "b",
                             compute=compute, normalize=normalize)  # fmt: skip
    return result
