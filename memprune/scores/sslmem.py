"""SSLMem per data point and LayerMem / ΔLayerMem per layer (docs/method.md §4-§5).

SSLMem (Wang et al., "Memorization in Self-Supervised Learning Improves Downstream
Generalization", ICLR 2024): with the alignment loss of encoder E on point x at a
representation h,

    L_E(x) = (1/K) sum_k || n(h_E(v_k)) - n(h_E(v'_k)) ||_2      (n: L2 normalization)

for K pairs of views (``pair="views"``, the paper) or the clean image against K views
(``pair="clean"``, the authors' code), SSLMem(x) = (L_g - L_f) / (L_f + L_g) in [-1, 1]; > 0
means f, trained with x, aligns its views better than g, trained without it. LayerMem(l)
(Wang et al., NeurIPS 2024) is the mean SSLMem over the scored candidates with h = layer l of
f and g, and ΔLayerMem(l) = LayerMem(l) - LayerMem(l-1).

All layers of both encoders come from one forward pass per view per encoder: each layer's
pair distances are computed inside its hook, so no layer output outlives its hook.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from memprune._dist import gather_by_index
from memprune._io import load_result, package_versions, save_result
from memprune.data import MultiView
from memprune.encoders import feature_dim
from memprune.errors import ConfigError
from memprune.hooks import layer_reducer
from memprune.scores._engine import image_size, view_batches
from memprune.sites import Site, find_sites

PAIRS = ("views", "clean")
OUTPUT = "output"


class PairedViews(Dataset):
    """Items ``(views [2K, 3, H, W], label, index)`` laid out as K pairs ``(2k, 2k+1)``:
    two independent views (``pair="views"``) or the clean image and one view (``"clean"``)."""

    def __init__(self, dataset: Dataset, n_views: int, pair: str, augment, seed: int, **params):
        if pair not in PAIRS:
            raise ConfigError(f"pair must be one of {PAIRS}, got {pair!r}")
        self.pair = pair
        self.views = MultiView(
            dataset, n_views * 2 if pair == "views" else n_views, augment, seed, **params
        )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, position: int):
        views, label, index = self.views[position]
        if self.pair == "clean":
            clean = self.dataset[position][0].expand_as(views)
            views = torch.stack([clean, views], dim=1).flatten(0, 1)  # x, v0, x, v1, ...
        return views, label, index


def output_site(model: nn.Module, dim: int) -> Site:
    """The encoder's own output (pre-logits features) as a layer site."""
    return Site(OUTPUT, "", "layers", "output", dim, 1, "output", (dim,))


def pair_distance(site: Site, representation: str):
    """A hook reducer ``[B*2K, ...] -> [B]``: mean distance of the K normalized view pairs."""
    rep = layer_reducer(site, representation, copy=False)

    def reduce(x: torch.Tensor) -> torch.Tensor:
        h = F.normalize(rep(x), dim=1)  # [B*2K, D]
        h = h.view(-1, 2, h.shape[1])  # [B*K, 2, D]: the pairs
        return (h[:, 0] - h[:, 1]).norm(dim=1)  # [B*K]

    return reduce


def _layer_sites(f: nn.Module, g: nn.Module, dataset: Dataset, layers) -> list[Site]:
    """The layer sites of f (equal to g's, else an error), then the ``output`` site."""
    size = image_size(dataset)
    patterns = [layers] if isinstance(layers, str) else layers
    patterns = None if patterns is None else [p for p in patterns if p != OUTPUT]
    if patterns == []:  # only the output
        sites, g_sites = [], []
    else:
        sites = find_sites(f, "layers", include=patterns, input_size=size)
        g_sites = find_sites(g, "layers", include=patterns, input_size=size)
    if [(s.name, s.shape) for s in sites] != [(s.name, s.shape) for s in g_sites]:
        raise ConfigError(
            "f and g must have the same architecture: their layer sites differ"
            f" ({len(sites)} vs {len(g_sites)} sites); score encoders made with the same recipe"
        )
    f_shapes = {k: v.shape for k, v in f.state_dict().items()}
    g_shapes = {k: v.shape for k, v in g.state_dict().items()}
    if f_shapes != g_shapes:
        diff = sorted(set(f_shapes) ^ set(g_shapes)) or [
            k for k in f_shapes if f_shapes[k] != g_shapes[k]
        ]
        raise ConfigError(
            f"f and g must have the same architecture; their weights differ at {diff[:5]}"
        )
    return [*sites, output_site(f, output_dim(f, size))]


def output_dim(model: nn.Module, size: tuple[int, ...]) -> int:
    """Width of the encoder's output, from one dry forward pass (see :func:`feature_dim`)."""
    return feature_dim(model, size)


def alignment_losses(
    f: nn.Module,
    g: nn.Module,
    dataset: Dataset,
    sites: list[Site],
    *,
    n_views: int,
    pair: str,
    representation: str,
    augment,
    seed: int,
    batch_size: int,
    normalize,
    device,
    num_workers: int,
    progress,
    augment_params: dict,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(indices [N], L_f [N, L], L_g [N, L])`` over every point of ``dataset``, sorted by
    index, gathered from all processes. f and g see exactly the same views."""
    if not isinstance(n_views, int) or n_views < 1:
        raise ConfigError(f"n_views must be an int >= 1 (K view pairs per point), got {n_views!r}")
    views = PairedViews(dataset, n_views, pair, augment, seed, **augment_params)
    reduce = {s.name: pair_distance(s, representation) for s in sites}
    rows_i, rows_f, rows_g = [], [], []
    for indices, _, (af, ag) in view_batches(
        [f, g], views, [sites, sites], reduce=[reduce, reduce], batch_size=batch_size,
        normalize=normalize, device=device, num_workers=num_workers, progress=progress,
        desc="LayerMem",
    ):  # fmt: skip
        rows_i.append(indices)
        rows_f.append(torch.stack([af[s.name].view(-1, n_views).mean(1) for s in sites], 1).cpu())
        rows_g.append(torch.stack([ag[s.name].view(-1, n_views).mean(1) for s in sites], 1).cpu())
    return gather_by_index(
        torch.cat(rows_i), torch.cat(rows_f).double(), torch.cat(rows_g).double()
    )


def normalized_gap(lf: torch.Tensor, lg: torch.Tensor) -> torch.Tensor:
    """``(L_g - L_f) / (L_f + L_g)``, 0 where both losses are 0."""
    denom = lf + lg
    return torch.where(denom > 0, (lg - lf) / denom.clamp_min(1e-30), torch.zeros_like(denom))


@dataclass
class SSLMemResult:
    """Per-point SSLMem at one site: ``score`` (normalized), ``raw`` (L_g - L_f), the losses."""

    indices: torch.Tensor
    score: torch.Tensor
    raw: torch.Tensor
    loss_f: torch.Tensor
    loss_g: torch.Tensor
    meta: dict = field(default_factory=dict)


def _subset(dataset: Dataset, indices) -> Dataset:
    if indices is None:
        return dataset
    bad = [i for i in indices if not 0 <= int(i) < len(dataset)]
    if bad:
        raise ConfigError(f"indices {bad[:5]} are outside the data set of {len(dataset)} points")
    return Subset(dataset, [int(i) for i in indices])


def ssl_mem(
    f: nn.Module,
    g: nn.Module,
    dataset: Dataset,
    indices: list[int] | None = None,
    n_views: int = 10,
    pair: str = "views",
    site: str | None = None,
    representation: str = "flatten",
    augment="simclr",
    normalize="auto",
    batch_size: int = 32,
    seed: int = 0,
    device=None,
    num_workers: int = 0,
    progress: bool | None = None,
    **augment_params,
) -> SSLMemResult:
    """SSLMem of every point of ``dataset`` (or ``dataset[indices]``) for f (trained with the
    points) against g (trained without them), at the encoders' output or a layer ``site``.

    Returns normalized scores in [-1, 1] (> 0: f memorized the point) and the raw gap
    ``L_g - L_f``. See the module docstring for the definition.
    """
    data = _subset(dataset, indices)
    if len(data) == 0:
        raise ConfigError("no points to score")
    if site in (None, OUTPUT):
        sites = _layer_sites(f, g, data, [OUTPUT])
    else:
        sites = [s for s in _layer_sites(f, g, data, [site]) if s.name != OUTPUT]
    idx, lf, lg = alignment_losses(
        f, g, data, sites, n_views=n_views, pair=pair, representation=representation,
        augment=augment, seed=seed, batch_size=batch_size, normalize=normalize, device=device,
        num_workers=num_workers, progress=progress, augment_params=augment_params,
    )  # fmt: skip
    meta = {"site": sites[0].name, "n_views": n_views, "pair": pair, "seed": seed,
            "representation": representation, "n_points": len(data)}  # fmt: skip
    return SSLMemResult(idx, normalized_gap(lf, lg)[:, 0].float(), (lg - lf)[:, 0].float(),
                        lf[:, 0].float(), lg[:, 0].float(), meta)  # fmt: skip


def _kendall_tau(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import kendalltau

    tau = kendalltau(a.numpy(), b.numpy()).statistic
    return float("nan") if tau != tau else float(tau)


@dataclass
class LayerMemResult:
    """LayerMem and ΔLayerMem of every layer, and the per-point scores behind them.

    Attributes:
        layers: layer site names in forward order, ending with ``output``.
        indices: data indices of the scored points ``[N]``.
        loss_f, loss_g: alignment losses ``[N, L]`` (float64).
        meta: how the scores were made.
    """

    layers: list[str]
    indices: torch.Tensor
    loss_f: torch.Tensor
    loss_g: torch.Tensor
    meta: dict = field(default_factory=dict)
    top_k: int = 50

    @property
    def sslmem(self) -> torch.Tensor:
        """Per-point, per-layer SSLMem ``[N, L]``."""
        return normalized_gap(self.loss_f, self.loss_g)

    @property
    def raw(self) -> torch.Tensor:
        """Per-point, per-layer ``L_g - L_f`` ``[N, L]``."""
        return self.loss_g - self.loss_f

    def layer_mem(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """LayerMem per layer ``[L]``: mean SSLMem over the points (or ``rows`` of them)."""
        s = self.sslmem if rows is None else self.sslmem[rows]
        return s.mean(dim=0)

    def delta(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """ΔLayerMem per layer ``[L]``; the first layer's is its LayerMem."""
        lm = self.layer_mem(rows)
        return torch.cat([lm[:1], lm[1:] - lm[:-1]])

    def ranked(self) -> dict[str, torch.Tensor]:
        """Row positions of the top-k and least-k points by output-layer SSLMem. k is
        ``top_k`` or half the scored points, whichever is smaller, so the two sets never
        overlap (with 60 points: top-30 and least-30); the table's column names carry k."""
        k = max(1, min(self.top_k, len(self.indices) // 2))
        order = self.sslmem[:, -1].argsort(descending=True, stable=True)
        return {"top": order[:k], "least": order.flip(0)[:k]}

    def table(self) -> list[dict]:
        """One row per layer: LayerMem and ΔLayerMem over all points, the top-k and least-k."""
        ranked = self.ranked()
        cols = {"all": None, **ranked}
        values = {name: (self.layer_mem(r), self.delta(r)) for name, r in cols.items()}
        rows = []
        for i, layer in enumerate(self.layers):
            row = {"layer": layer}
            for name, (lm, d) in values.items():
                suffix = "" if name == "all" else f"_{name}{len(ranked['top'])}"
                row[f"LayerMem{suffix}"] = float(lm[i])
                row[f"dLayerMem{suffix}"] = float(d[i])
            rows.append(row)
        return rows

    def consistency(self, k: int | None = None) -> dict[str, torch.Tensor]:
        """Between every pair of layers: Kendall tau of the per-point SSLMem rankings and the
        overlap (fraction) of their top-k points. Both ``[L, L]``."""
        k = min(k or self.top_k, len(self.indices))
        s = self.sslmem
        n = len(self.layers)
        tau, overlap = torch.eye(n, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
        tops = [set(s[:, i].argsort(descending=True, stable=True)[:k].tolist()) for i in range(n)]
        for i, j in combinations(range(n), 2):
            tau[i, j] = tau[j, i] = _kendall_tau(s[:, i], s[:, j])
            overlap[i, j] = overlap[j, i] = len(tops[i] & tops[j]) / k
        return {"kendall_tau": tau, "topk_overlap": overlap}

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``PATH.safetensors`` and ``PATH.json`` atomically."""
        tensors = {"indices": self.indices, "loss_f": self.loss_f, "loss_g": self.loss_g}
        meta = {**self.meta, "layers": self.layers, "top_k": self.top_k}
        return save_result(path, tensors, meta, "layermem")

    @classmethod
    def load(cls, path: str | os.PathLike) -> LayerMemResult:
        t, meta = load_result(path, "LayerMem")
        layers, top_k = meta.pop("layers"), meta.pop("top_k")
        return cls(layers, t["indices"], t["loss_f"], t["loss_g"], meta, top_k)


def layer_mem(
    f: nn.Module,
    g: nn.Module,
    dataset: Dataset,
    indices: list[int] | None = None,
    n_views: int = 10,
    layers: list[str] | str | None = None,
    representation: str = "flatten",
    pair: str = "views",
    n_points: int | None = None,
    augment="simclr",
    normalize="auto",
    batch_size: int = 32,
    seed: int = 0,
    device=None,
    num_workers: int = 0,
    progress: bool | None = None,
    top_k: int = 50,
    **augment_params,
) -> LayerMemResult:
    """LayerMem and ΔLayerMem for every layer site of f and g (plus their output).

    Args:
        f, g: encoders of the same architecture; f saw the scored points, g did not.
        dataset, indices: the scored points (normally the candidates): ``dataset[indices]``.
        n_views: K view pairs per point; f and g see the same views.
        layers: layer-site patterns (default: every layer site, see :func:`find_sites`).
        representation: ``flatten`` (whole output, paper practice), ``pool`` (spatial/token
            mean) or ``cls`` (class token, ViTs).
        pair: ``views`` (two independent views, paper) or ``clean`` (clean image vs a view).
        n_points: score a seeded random subset of this many of the points.
        top_k: size of the top / least sets by output-layer SSLMem (default 50).

    Every layer of both encoders comes from one forward pass per view per encoder; under a
    launcher each process scores a shard and per-point losses are gathered by data index.
    """
    data = _subset(dataset, indices)
    if n_points is not None and n_points < len(data):
        g_ = torch.Generator().manual_seed(seed)
        data = Subset(data, sorted(torch.randperm(len(data), generator=g_)[:n_points].tolist()))
    if len(data) < 2:
        raise ConfigError(f"LayerMem needs at least 2 points to score, got {len(data)}")
    sites = _layer_sites(f, g, data, layers)
    idx, lf, lg = alignment_losses(
        f, g, data, sites, n_views=n_views, pair=pair, representation=representation,
        augment=augment, seed=seed, batch_size=batch_size, normalize=normalize, device=device,
        num_workers=num_workers, progress=progress, augment_params=augment_params,
    )  # fmt: skip
    meta = {
        "kind": "layermem", "n_points": len(data), "n_views": n_views, "pair": pair,
        "representation": representation, "seed": seed,
        "augment": augment if isinstance(augment, str) else "callable",
        "sites": {s.name: {"module": s.module, "role": s.role, "shape": list(s.shape)}
                  for s in sites},
        "versions": package_versions(),
    }  # fmt: skip
    return LayerMemResult([s.name for s in sites], idx, lf, lg, meta, top_k)
