"""Minibatch unbiased CKA between layers, within one encoder or across two (docs/method.md §6).

For each batch of n images (n >= 4) and every layer, the Gram matrix K = X X^T of the layer's
flattened output (float64) is formed inside the forward hook, its diagonal set to 0, and the
unbiased HSIC of Song et al. accumulated over batches (Nguyen, Raghu & Kornblith, ICLR 2021):

    HSIC1(K, L) = [tr(KL) + (1'K1)(1'L1)/((n-1)(n-2)) - 2/(n-2) 1'KL1] / (n(n-3))
    CKA(a, b)   = sum_batches HSIC1(K_a, K_b) / sqrt(sum HSIC1(K_a, K_a) * sum HSIC1(K_b, K_b))

Batches have one size; a last, smaller batch is dropped (the estimate averages equal-size
batches). CKA against labels uses the one-hot Gram; augmentation invariance is the CKA of a
layer with itself between two augmented views of the same images. Under ``torchrun`` each
process sums its batches and the sums are added across processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from memprune._io import load_result, package_versions, save_result
from memprune.data import MultiView
from memprune.errors import ConfigError
from memprune.scores._engine import image_size, view_batches
from memprune.sites import resolve_sites

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
    x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None
) -> torch.Tensor:
    """Minibatch unbiased CKA of precomputed features ``x [N, p]`` and ``y [N, q]`` (rows:
    the same N points, in the same order; ``batch_size=None``: one batch of all N). The
    inputs are read, never modified. Returns a float64 scalar tensor."""
    if len(x) != len(y):
        raise ConfigError(f"x has {len(x)} rows but y has {len(y)}: rows must be the same points")
    n = len(x) if batch_size is None else batch_size
    if n < MIN_BATCH or n > len(x):
        raise ConfigError(f"batch_size must be in [{MIN_BATCH}, {len(x)}], got {n}")
    sums = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(x) - n + 1, n):
        kx, ky = _gram(x[start : start + n]), _gram(y[start : start + n])
        sums += torch.stack([hsic1(kx, ky), hsic1(kx, kx), hsic1(ky, ky)]).cpu()
    return _cka(sums[0:1, None], sums[1:2], sums[2:3])[0, 0]


@dataclass
class CKAResult:
    """CKA between the layers of encoder a (rows) and b (columns; a again when b is omitted).

    ``labels_a`` / ``labels_b``: CKA of each layer with the one-hot labels; ``invariance_a`` /
    ``invariance_b``: CKA of each layer between two augmented views (None when not computed).
    """

    matrix: torch.Tensor
    layers_a: list[str]
    layers_b: list[str]
    labels_a: torch.Tensor
    labels_b: torch.Tensor
    invariance_a: torch.Tensor | None = None
    invariance_b: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def table(self) -> list[dict]:
        """One row per layer of a: its CKA with every layer of b."""
        return [
            {"layer": name, **{b: float(v) for b, v in zip(self.layers_b, row)}}
            for name, row in zip(self.layers_a, self.matrix)
        ]

    def save(self, path: str | os.PathLike) -> Path:
        tensors = {"matrix": self.matrix, "labels_a": self.labels_a, "labels_b": self.labels_b}
        if self.invariance_a is not None:
            tensors.update(invariance_a=self.invariance_a, invariance_b=self.invariance_b)
        meta = {**self.meta, "layers_a": self.layers_a, "layers_b": self.layers_b}
        return save_result(path, tensors, meta, "CKA")

    @classmethod
    def load(cls, path: str | os.PathLike) -> CKAResult:
        t, meta = load_result(path, "CKA")
        a, b = meta.pop("layers_a"), meta.pop("layers_b")
        return cls(t["matrix"], a, b, t["labels_a"], t["labels_b"], t.get("invariance_a"),
                   t.get("invariance_b"), meta)  # fmt: skip


def _sum_processes(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def _zeros(*shape) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.float64)


def _accumulate(models, sites, views, n_classes, run) -> dict[str, torch.Tensor]:
    """Sums of HSIC over equal-size batches. One view per image: between a's and b's layers
    (``cross``), of each layer with itself (``aa``, ``bb``) and with the labels (``la``, ``lb``,
    ``ll``). Two views: of each layer's view-1 Gram with its view-2 Gram (``v12``) and of each
    view with itself (``v11``, ``v22``), for a's layers then b's."""
    batch_size = run["batch_size"]
    sa, sb = sites[0], sites[-1]
    two = views.n_views == 2
    out = {"cross": _zeros(len(sa), len(sb)), "aa": _zeros(len(sa)), "bb": _zeros(len(sb)),
           "la": _zeros(len(sa)), "lb": _zeros(len(sb)), "ll": _zeros(1)}  # fmt: skip
    if two:
        n = len(sa) + (len(sb) if len(models) > 1 else 0)
        out = {"v12": _zeros(n), "v11": _zeros(n), "v22": _zeros(n)}
    for _, labels, acts in view_batches(models, views, sites, **run):
        if len(labels) < batch_size:
            continue  # equal-size batches only
        if two:  # rows are [point 0 view 0, point 0 view 1, point 1 view 0, ...]
            pairs = [(_gram(a[x.name][0::2]), _gram(a[x.name][1::2]))
                     for a, ss in zip(acts, sites) for x in ss]  # fmt: skip
            for key, fn in (("v12", lambda p: hsic1(*p)), ("v11", lambda p: hsic1(p[0], p[0])),
                            ("v22", lambda p: hsic1(p[1], p[1]))):  # fmt: skip
                out[key] += torch.stack([fn(p) for p in pairs]).cpu()
            continue
        ga = [_gram(acts[0][x.name]) for x in sa]
        gb = ga if len(models) == 1 else [_gram(acts[-1][x.name]) for x in sb]
        lab = _gram(F.one_hot(labels.long(), n_classes).to(ga[0].device))
        out["aa"] += torch.stack([hsic1(k, k) for k in ga]).cpu()
        out["bb"] += torch.stack([hsic1(k, k) for k in gb]).cpu()
        out["la"] += torch.stack([hsic1(k, lab) for k in ga]).cpu()
        out["lb"] += torch.stack([hsic1(k, lab) for k in gb]).cpu()
        out["ll"] += hsic1(lab, lab).cpu()
        out["cross"] += torch.stack([torch.stack([hsic1(k, kb) for kb in gb]) for k in ga]).cpu()
    return {k: _sum_processes(v) for k, v in out.items()}


def cka(
    dataset: Dataset,
    model_a: nn.Module,
    model_b: nn.Module | None = None,
    layers_a: list[str] | str | None = None,
    layers_b: list[str] | str | None = None,
    batch_size: int = 256,
    representation: str = "flatten",
    invariance: bool = True,
    normalize="auto",
    seed: int = 0,
    device=None,
    num_workers: int = 0,
    progress: bool | None = None,
    **augment_params,
) -> CKAResult:
    """CKA between every layer site of ``model_a`` and of ``model_b`` (a itself when omitted)
    on the un-augmented images of ``dataset``, with the labels per layer, and (``invariance``)
    between two SimCLR views of the same images per layer (``augment_params``: the preset's
    parameters). ``representation``: ``flatten`` (default), ``pool`` or ``cls``.

    Example: ``memprune.cka(test, ssl_encoder, supervised_encoder).matrix`` is ``[La, Lb]``.
    """
    from memprune.data import dataset_labels
    from memprune.sites import find_sites

    if not isinstance(batch_size, int) or batch_size < MIN_BATCH:
        raise ConfigError(f"batch_size must be an int >= {MIN_BATCH}, got {batch_size!r}")
    if len(dataset) < batch_size:
        raise ConfigError(f"batch_size {batch_size} exceeds the {len(dataset)} points: lower it")
    size = image_size(dataset)
    same = model_b is None
    model_b = model_a if same else model_b
    if same and layers_b is not None:
        raise ConfigError("layers_b needs model_b; within one model name the layers by layers_a")

    def layers(model, names):
        if names:
            return resolve_sites(model, names, "layers")
        return find_sites(model, "layers", input_size=size)

    sa = layers(model_a, layers_a)
    sb = sa if same else layers(model_b, layers_b)

    n_classes = int(dataset_labels(dataset).max()) + 1
    models = [model_a] if same else [model_a, model_b]
    sites = [sa] if same else [sa, sb]
    run = dict(batch_size=batch_size, normalize=normalize, representation=representation,
               device=device, num_workers=num_workers, progress=progress)  # fmt: skip
    plain = MultiView(dataset, 1, "none", seed)
    s = _accumulate(models, sites, plain, n_classes, {**run, "desc": "CKA"})
    matrix = _cka(s["cross"], s["aa"], s["bb"])
    labels_a = _cka(s["la"][:, None], s["aa"], s["ll"])[:, 0]
    labels_b = _cka(s["lb"][:, None], s["bb"], s["ll"])[:, 0]
    inv_a = inv_b = None
    if invariance:
        two = MultiView(dataset, 2, "simclr", seed, **augment_params)
        t = _accumulate(models, sites, two, n_classes, {**run, "desc": "CKA views"})
        inv = torch.diagonal(_cka(t["v12"][:, None].expand(-1, len(t["v12"])), t["v11"],
                                  t["v22"]))  # fmt: skip
        inv_a, inv_b = inv[: len(sa)], (inv[: len(sa)] if same else inv[len(sa) :])
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in augment_params.items()}
    meta = {
        "data": getattr(dataset, "name", type(dataset).__name__), "n_points": len(dataset),
        "batch_size": batch_size, "representation": representation, "seed": seed,
        "same_model": same, "name_a": "a", "name_b": "a" if same else "b",
        "augment_params": params, "versions": package_versions(),
    }  # fmt: skip
    return CKAResult(matrix, [x.name for x in sa], [x.name for x in sb], labels_a, labels_b,
                     inv_a, inv_b, meta)  # fmt: skip
