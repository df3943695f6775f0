"""SSLMem per data point and LayerMem / ΔLayerMem per layer (docs/method.md §4-§5).

SSLMem (Wang et al., "Memorization in Self-Supervised Learning Improves Downstream
Generalization", ICLR 2024): with the alignment loss of encoder E on point x at a
representation h,

    L_E(x) = (1/K) sum_k || n(h_E(v_k)) - n(h_E(v'_k)) ||_2      (n: L2 normalization)

for K view pairs (``n_pairs``) (``pair="views"``, the paper) or the clean image against K views
(``pair="clean"``, the authors' code), SSLMem(x) = (L_g - L_f) / (L_f + L_g) in [-1, 1]; > 0
means f, trained with x, aligns its views better than g, trained without it. LayerMem(l)
(Wang et al., NeurIPS 2024) is the mean SSLMem over the scored candidates with h = layer l of
f and g, and ΔLayerMem(l) = LayerMem(l) - LayerMem(l-1).

All layers of both encoders come from one forward pass per view per encoder: each layer's
pair distances are computed inside its hook, so no layer output outlives its hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from memprune.data import MultiView, seeded_subset
from memprune.encoders import feature_dim
from memprune.engine import Compute, image_size, score_meta, view_batches
from memprune.errors import ConfigError
from memprune.hooks import layer_reducer
from memprune.registry import Registry
from memprune.results import Result
from memprune.sites import OUTPUT, Site, find_sites, output_site
from memprune.stats import Metric, RowsState

#: ``pair``: how a view pair is made -> augmented views drawn per pair.
PAIRS = Registry("view pairing", {"views": 2, "clean": 1})


class PairedViews(Dataset):
    """Items ``(views [2K, 3, H, W], label, index)`` laid out as K pairs ``(2k, 2k+1)``:
    two independent views (``pair="views"``) or the clean image and one view (``"clean"``)."""

    def __init__(self, dataset: Dataset, n_pairs: int, pair: str, augment, seed: int):
        self.pair, self.n_pairs = PAIRS.check(pair), n_pairs
        self.views = MultiView(dataset, n_pairs * PAIRS[pair], augment, seed)
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, position: int):
        views, label, index = self.views[position]
        if self.pair == "clean":
            clean = self.dataset[position][0].expand_as(views)
            views = torch.stack([clean, views], dim=1).flatten(0, 1)  # x, v0, x, v1, ...
        return views, label, index


def pair_distance(site: Site, representation: str):
    """A hook reducer ``[B*2K, ...] -> [B]``: mean distance of the K normalized view pairs."""
    rep = layer_reducer(site, representation, copy=False)

    def reduce(x: torch.Tensor) -> torch.Tensor:
        h = F.normalize(rep(x), dim=1)  # [B*2K, D]
        h = h.view(-1, 2, h.shape[1])  # [B*K, 2, D]: the pairs
        return (h[:, 0] - h[:, 1]).norm(dim=1)  # [B*K]

    return reduce


def _layer_sites(f: nn.Module, g: nn.Module | None, dataset: Dataset, layers) -> list[Site]:
    """The layer sites of f (equal to g's, else an error; no check without g), then the
    ``output`` site."""
    size = image_size(dataset)
    patterns = [layers] if isinstance(layers, str) else layers
    patterns = None if patterns is None else [p for p in patterns if p != OUTPUT]
    sites = [] if patterns == [] else find_sites(f, "layers", include=patterns, input_size=size)
    if g is not None:
        _check_same_architecture(f, g, sites, patterns, size)
    return [*sites, output_site(feature_dim(f, size))]


def _check_same_architecture(f, g, sites, patterns, size) -> None:
    g_sites = [] if patterns == [] else find_sites(g, "layers", include=patterns, input_size=size)
    f_layout = [(s.name, tuple(s.shape)) for s in sites]
    g_layout = [(s.name, tuple(s.shape)) for s in g_sites]
    if f_layout != g_layout:
        diff = [(a, b) for a, b in zip(f_layout, g_layout) if a != b] or [
            (len(sites), len(g_sites))
        ]
        raise ConfigError(
            "f and g must have the same architecture: their layer sites differ (first"
            f" difference, f vs g: {diff[0]}); score encoders made with the same recipe"
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


def normalized_gap(lf: torch.Tensor, lg: torch.Tensor) -> torch.Tensor:
    """``(L_g - L_f) / (L_f + L_g)``, 0 where both losses are 0."""
    denom = lf + lg
    return torch.where(denom > 0, (lg - lf) / denom.clamp_min(1e-30), torch.zeros_like(denom))


class LayerMem(Metric):
    """Streaming alignment losses of f and g per point and layer, merged across processes.

    ``update(indices [B], loss_f [B, L], loss_g [B, L])`` with the mean pair distance of each
    point's K view pairs at each of ``layers`` (see the module docstring); ``compute()`` gives
    the :class:`LayerMemResult` (rows sorted by data index).
    """

    def __init__(self, layers: list[str], top_k: int = 50) -> None:
        self.layers, self.top_k = list(layers), top_k
        super().__init__()

    def _empty(self) -> RowsState:
        return RowsState()

    def update(self, indices: torch.Tensor, loss_f: torch.Tensor, loss_g: torch.Tensor) -> None:
        if loss_f.shape != loss_g.shape or loss_f.shape[-1] != len(self.layers):
            raise ConfigError(
                f"loss_f and loss_g must both be [B, {len(self.layers)}], got"
                f" {tuple(loss_f.shape)} and {tuple(loss_g.shape)}"
            )
        self.state.update(torch.as_tensor(indices), torch.stack([loss_f, loss_g], dim=1))

    def compute(self) -> LayerMemResult:
        indices, losses = self.state.compute()  # [N], [N, 2, L]
        return LayerMemResult(self.layers, indices, losses[:, 0], losses[:, 1], {}, self.top_k)


def _losses(f, g, views: PairedViews, sites, representation, normalize, compute, metric):
    """Feed ``metric`` the per-point losses of f and g (the same views) and merge processes."""
    reduce = {s.name: pair_distance(s, representation) for s in sites}
    k = views.n_pairs
    for indices, _, (af, ag) in view_batches(
        [f, g], views, [sites, sites], compute, reduce=[reduce, reduce], normalize=normalize,
        desc="LayerMem",
    ):  # fmt: skip
        lf = torch.stack([af[s.name].view(-1, k).mean(1) for s in sites], 1)  # [B, L]
        lg = torch.stack([ag[s.name].view(-1, k).mean(1) for s in sites], 1)
        metric.update(indices, lf, lg)
    return metric.sync().compute()


@dataclass
class SSLMemResult(Result):
    """Per-point SSLMem at one site: ``score`` (normalized), ``raw`` (L_g - L_f), the losses."""

    kind = "sslmem"
    indices: torch.Tensor
    score: torch.Tensor
    raw: torch.Tensor
    loss_f: torch.Tensor
    loss_g: torch.Tensor
    meta: dict = field(default_factory=dict)

    def to_rows(self) -> list[dict]:
        """One row per point: data index, SSLMem, raw gap and both losses."""
        cols = {"index": self.indices, "sslmem": self.score, "raw": self.raw,
                "loss_f": self.loss_f, "loss_g": self.loss_g}  # fmt: skip
        return [dict(zip(cols, row)) for row in zip(*(v.tolist() for v in cols.values()))]

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"indices": self.indices, "score": self.score, "raw": self.raw,
                "loss_f": self.loss_f, "loss_g": self.loss_g}  # fmt: skip

    @classmethod
    def _build(cls, t, fields, meta):
        return cls(t["indices"], t["score"], t["raw"], t["loss_f"], t["loss_g"], meta)


def _subset(dataset: Dataset, indices) -> Dataset:
    if indices is None:
        return dataset
    bad = [i for i in indices if not 0 <= int(i) < len(dataset)]
    if bad:
        raise ConfigError(f"indices {bad[:5]} are outside the data set of {len(dataset)} points")
    return Subset(dataset, [int(i) for i in indices])


def _check_pairs(n_pairs) -> None:
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, int) or n_pairs < 1:
        raise ConfigError(f"n_pairs must be an int >= 1 (K view pairs per point), got {n_pairs!r}")


def ssl_mem(
    f: nn.Module,
    g: nn.Module,
    dataset: Dataset,
    indices: list[int] | None = None,
    n_pairs: int = 10,
    pair: str = "views",
    site: str | None = None,
    representation: str = "flatten",
    augment="simclr",
    normalize="auto",
    seed: int = 0,
    chunk_size: int = 32,
    device=None,
    num_workers: int | None = None,
    progress: bool | None = None,
    precision: str = "auto",
) -> SSLMemResult:
    """SSLMem of every point of ``dataset`` (or ``dataset[indices]``) for f (trained with the
    points) against g (trained without them), at the encoders' output or a layer ``site``.

    Returns normalized scores in [-1, 1] (> 0: f memorized the point) and the raw gap
    ``L_g - L_f``. ``n_pairs`` view pairs per point; the other arguments as in
    :func:`layer_mem`. See the module docstring for the definition.
    """
    data = _subset(dataset, indices)
    if len(data) == 0:
        raise ConfigError("no points to score")
    _check_pairs(n_pairs)
    if site in (None, OUTPUT):
        sites = _layer_sites(f, g, data, [OUTPUT])
    else:
        sites = [s for s in _layer_sites(f, g, data, [site]) if s.name != OUTPUT]
    views = PairedViews(data, n_pairs, pair, augment, seed)
    compute = Compute(chunk_size, device, num_workers, progress, precision)
    r = _losses(f, g, views, sites, representation, normalize, compute, LayerMem([sites[0].name]))
    meta = score_meta("sslmem", f, data, sites, site=sites[0].name, n_pairs=n_pairs, pair=pair,
                      representation=representation, augment=augment, seed=seed,
                      compute=compute, normalize=normalize)  # fmt: skip
    return SSLMemResult(r.indices, r.sslmem[:, 0].float(), r.raw[:, 0].float(),
                        r.loss_f[:, 0].float(), r.loss_g[:, 0].float(), meta)  # fmt: skip


def _kendall_tau(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import kendalltau

    tau = kendalltau(a.numpy(), b.numpy()).statistic
    return float("nan") if tau != tau else float(tau)


@dataclass
class LayerMemResult(Result):
    """LayerMem and ΔLayerMem of every layer, and the per-point scores behind them.

    Attributes:
        layers: layer site names in forward order, ending with ``output``.
        indices: data indices of the scored points ``[N]``.
        loss_f, loss_g: alignment losses ``[N, L]`` (float64).
        meta: how the scores were made.
    """

    kind = "layermem"
    #: the per-layer values :func:`memprune.select_layers` can rank by (``by=``)
    rankings = ("delta", "layermem")
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

    def ranking(self, by: str) -> torch.Tensor:
        """The value of every layer ``[L]`` under ranking ``by`` (``delta`` or ``layermem``)."""
        return {"delta": self.delta, "layermem": self.layer_mem}[by]()

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

    to_rows = table

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"indices": self.indices, "loss_f": self.loss_f, "loss_g": self.loss_g}

    def _fields(self) -> dict:
        return {"layers": self.layers, "top_k": self.top_k}

    @classmethod
    def _build(cls, t, fields, meta):
        return cls(fields["layers"], t["indices"], t["loss_f"], t["loss_g"], meta, fields["top_k"])


def layer_mem(
    f: nn.Module,
    g: nn.Module,
    dataset: Dataset,
    indices: list[int] | None = None,
    n_pairs: int = 10,
    layers: list[str] | str | None = None,
    representation: str = "flatten",
    pair: str = "views",
    n_points: int | None = None,
    augment="simclr",
    normalize="auto",
    seed: int = 0,
    top_k: int = 50,
    chunk_size: int = 32,
    device=None,
    num_workers: int | None = None,
    progress: bool | None = None,
    precision: str = "auto",
) -> LayerMemResult:
    """LayerMem and ΔLayerMem for every layer site of f and g (plus their output).

    Args:
        f, g: encoders of the same architecture; f saw the scored points, g did not.
        dataset, indices: the scored points (normally the candidates): ``dataset[indices]``.
        n_pairs: K view pairs per point (2K images for ``pair="views"``); f and g see the
            same views.
        layers: layer-site patterns (default: every layer site, see :func:`find_sites`).
        representation: ``flatten`` (whole output, paper practice), ``pool`` (spatial/token
            mean) or ``cls`` (class token, ViTs).
        pair: ``views`` (two independent views, paper) or ``clean`` (clean image vs a view).
        n_points: score a seeded random subset of this many of the points.
        augment: a preset name, a mapping of its parameters, or a callable.
        top_k: size of the top / least sets by output-layer SSLMem (default 50).
        chunk_size, device, num_workers, progress, precision: how the pass runs
            (:class:`~memprune.engine.Compute`; only ``precision`` changes values).

    Every layer of both encoders comes from one forward pass per view per encoder; under a
    launcher each process scores a shard and per-point losses are gathered by data index.
    """
    data = seeded_subset(_subset(dataset, indices), n_points, seed)
    if len(data) < 2:
        raise ConfigError(f"LayerMem needs at least 2 points to score, got {len(data)}")
    _check_pairs(n_pairs)
    sites = _layer_sites(f, g, data, layers)
    views = PairedViews(data, n_pairs, pair, augment, seed)
    compute = Compute(chunk_size, device, num_workers, progress, precision)
    metric = LayerMem([s.name for s in sites], top_k)
    result = _losses(f, g, views, sites, representation, normalize, compute, metric)
    result.meta = score_meta("layermem", f, data, sites, n_pairs=n_pairs, pair=pair,
                             representation=representation, augment=augment, seed=seed,
                             compute=compute, normalize=normalize)  # fmt: skip
    return result
