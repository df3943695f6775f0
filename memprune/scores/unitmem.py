"""UnitMem and ClassMem for every unit of an encoder in one batched pass (docs/method.md §2-§3).

UnitMem (Wang et al., "Localizing Memorization in SSL Vision Encoders", NeurIPS 2024, eq. 1):
for unit u and point i with ``mu_u(i)`` the mean activation over K augmented views,

    UnitMem(u) = (mu_max - mu_rest) / (mu_max + mu_rest),
    mu_max = max_i mu_u(i),  mu_rest = mean (or median) of mu_u(i) over i != argmax.

1 means the unit fires for one data point only. ClassMem is the class selectivity index of
Morcos et al. (ICLR 2018): the same index over per-class mean activations.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset

from memprune.data import MultiView, dataset_labels
from memprune.engine import Compute, image_size, score_meta, view_batches
from memprune.errors import ConfigError
from memprune.results import Result
from memprune.sites import Site, find_sites, resolve_sites
from memprune.stats import RESTS, ClassMeanState, Metric

FIELDS = ("score", "argmax", "mu_max", "mu_rest", "dead")
THRESHOLDS = (0.5, 0.8)


@dataclass
class UnitMemResult(Result):
    """Per-site unit scores.

    ``sites[name]`` maps ``score`` (UnitMem per unit, float32), ``argmax`` (the data index
    i*(u) a unit memorizes), ``mu_max``, ``mu_rest`` and ``dead`` (bool) to tensors
    ``[units]``. ``meta`` records how the scores were made.
    """

    kind = "unitmem"
    sites: dict[str, dict[str, torch.Tensor]]
    meta: dict = field(default_factory=dict)

    def __getitem__(self, site: str) -> dict[str, torch.Tensor]:
        return self.sites[site]

    def scores(self) -> dict[str, torch.Tensor]:
        """Site name -> score per unit."""
        return {name: s["score"] for name, s in self.sites.items()}

    def to_rows(self) -> list[dict]:
        """One row per site: units, mean score, fractions above 0.5 and 0.8, dead units."""
        rows = []
        for name, s in self.sites.items():
            score = s["score"]
            row = {"site": name, "units": len(score), "mean": float(score.mean())}
            for t in THRESHOLDS:
                row[f"frac>{t}"] = float((score > t).float().mean())
            row["dead"] = int(s["dead"].sum())
            rows.append(row)
        return rows

    summary = to_rows

    def histogram(self, bins: int = 20) -> dict[str, torch.Tensor]:
        """Counts of scores in ``bins`` equal bins over [0, 1], per site."""
        return {
            n: torch.histc(s["score"], bins=bins, min=0.0, max=1.0) for n, s in self.sites.items()
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f"{site}/{k}": v for site, s in self.sites.items() for k, v in s.items()}

    def _fields(self) -> dict:
        return {"site_order": list(self.sites)}

    @classmethod
    def _build(cls, tensors, fields, meta):
        order = fields["site_order"]
        return cls({name: {k: tensors[f"{name}/{k}"] for k in FIELDS} for name in order}, meta)


@dataclass
class ClassMemResult(UnitMemResult):
    """Per-site ClassMem: as :class:`UnitMemResult`, with ``argmax`` the class a unit prefers."""

    kind = "classmem"


def _widths(sites) -> dict[str, int]:
    """Site name -> units, from :class:`Site` objects or a ``{name: units}`` mapping."""
    if isinstance(sites, Mapping):
        return dict(sites)
    return {s.name: s.n_units for s in sites}


def _per_point(acts: Mapping[str, torch.Tensor], widths: dict[str, int]) -> torch.Tensor:
    """``[B, units of all sites]``: each site's ``[B, K, U]`` (or ``[B, U]``) averaged over its
    K views, all sites side by side (one state update per batch instead of one per site)."""
    missing = [name for name in widths if name not in acts]
    if missing:
        raise ConfigError(f"update() got no activations for sites {missing[:5]}")
    rows = []
    for name, width in widths.items():
        x = acts[name]
        x = x.mean(dim=1) if x.ndim == 3 else x  # [B, K, U] -> [B, U]
        if x.ndim != 2 or x.shape[1] != width:
            raise ConfigError(
                f"site {name!r}: expected activations [B, {width}] or [B, K, {width}], got"
                f" {tuple(acts[name].shape)}"
            )
        rows.append(x)
    return torch.cat(rows, dim=1).cpu()


def _split(scores: dict[str, torch.Tensor], widths: dict[str, int]) -> dict[str, dict]:
    """Per-site views of scores computed over all units side by side."""
    out, start = {}, 0
    for name, width in widths.items():
        out[name] = {k: v[start : start + width].clone() for k, v in scores.items()}
        start += width
    return out


class UnitMem(Metric):
    """Streaming UnitMem over the units of ``sites`` (:class:`Site` objects or ``{name: units}``).

    ``update(acts, indices)`` takes each site's per-unit activations of a batch of points,
    ``[B, K, U]`` (K views, averaged per point) or ``[B, U]``, and their data indices ``[B]``;
    feed it from your own loop (e.g. :func:`memprune.hooks.capture`) and ``compute()`` gives the
    :class:`UnitMemResult` that :func:`unit_mem` gives on the same activations. ``rest="mean"``
    keeps O(units) memory; ``"median"`` keeps every per-point row.
    """

    result_class = UnitMemResult

    def __init__(self, sites, rest: str = "mean", eps: float = 1e-8) -> None:
        self.rest, self.eps = RESTS.check(rest), eps
        self.widths = _widths(sites)
        super().__init__()

    def _empty(self):
        return RESTS[self.rest].empty(sum(self.widths.values()))

    def update(self, acts: Mapping[str, torch.Tensor], indices: torch.Tensor) -> None:
        self.state.update(_per_point(acts, self.widths), torch.as_tensor(indices))

    def compute(self) -> UnitMemResult:
        scores = self.state.compute(self.eps)
        return self.result_class(_split(scores, self.widths), {"rest": self.rest, "eps": self.eps})


class ClassMem(UnitMem):
    """Streaming ClassMem: ``update(acts, labels)`` with the points' class labels ``[B]``;
    per-class mean activations, selectivity over classes (``rest`` over the other classes)."""

    result_class = ClassMemResult

    def __init__(self, sites, n_classes: int, rest: str = "mean", eps: float = 1e-8) -> None:
        self.n_classes = n_classes
        super().__init__(sites, rest, eps)

    def _empty(self):
        return ClassMeanState.empty(sum(self.widths.values()), self.n_classes)

    def update(self, acts: Mapping[str, torch.Tensor], labels: torch.Tensor) -> None:
        self.state.update(_per_point(acts, self.widths), torch.as_tensor(labels))

    def compute(self) -> ClassMemResult:
        scores = self.state.compute(self.rest, self.eps)
        meta = {"rest": self.rest, "eps": self.eps, "n_classes": self.n_classes}
        return ClassMemResult(_split(scores, self.widths), meta)


def _check(dataset: Dataset, n_views: int, signed: str, minimum: int = 2) -> None:
    if not isinstance(n_views, int) or n_views < 1:
        raise ConfigError(f"n_views must be an int >= 1 (K views per point), got {n_views!r}")
    if len(dataset) < minimum:
        raise ConfigError(
            f"UnitMem compares each unit's top point with the rest: it needs N >= {minimum}"
            f" data points, got N = {len(dataset)}"
        )
    if signed == "raw":
        warnings.warn(
            "signed='raw' keeps negative activations: UnitMem then leaves [0, 1] and units whose"
            " mu_max + mu_rest <= eps are reported dead. Use 'abs' or 'relu' for a bounded index.",
            UserWarning,
            stacklevel=3,
        )


def _sites_for(encoder: nn.Module, dataset: Dataset, sites) -> list[Site]:
    if sites is None:
        return find_sites(encoder, "units", input_size=image_size(dataset))
    if isinstance(sites, str) or all(isinstance(s, str) for s in sites):
        return find_sites(encoder, "units", include=sites, input_size=image_size(dataset))
    return resolve_sites(encoder, sites, "units")


def _scan(metric: UnitMem, encoder, views: MultiView, sites, by: str, compute: Compute, **run):
    """Feed every batch's activations ``[B, K, U]`` to ``metric`` and merge all processes."""
    k = views.n_views
    for indices, labels, (acts,) in view_batches([encoder], views, [sites], compute, **run):
        per_view = {s.name: acts[s.name].view(-1, k, s.n_units) for s in sites}  # [B, K, U]
        metric.update(per_view, indices if by == "index" else labels)
    return metric.sync().compute()


def unit_mem(
    encoder: nn.Module,
    dataset: Dataset,
    n_views: int = 10,
    sites: list[Site] | list[str] | str | None = None,
    rest: str = "mean",
    signed: str = "abs",
    augment="simclr",
    normalize="auto",
    seed: int = 0,
    eps: float = 1e-8,
    chunk_size: int = 32,
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    progress: bool | None = None,
    precision: str = "auto",
) -> UnitMemResult:
    """UnitMem of every unit at ``sites`` of ``encoder`` over the points of ``dataset``.

    Args:
        encoder: a timm model (sites found automatically) or any ``nn.Module`` with ``sites``
            given. Scored in eval mode under ``inference_mode``; moved to ``device``.
        dataset: items ``(image [3, H, W] in [0, 1], label, index)``; ``index`` identifies the
            point (``argmax`` holds these indices).
        n_views: K augmented views per point, averaged before the max over points.
        sites: None (all unit sites), module-name patterns, or :class:`Site` objects.
        rest: ``mean`` (the paper; streaming, O(units) memory independent of N) or ``median``
            (the authors' code; keeps the N x units matrix of per-point means in float32 on
            the CPU, e.g. 780 MB for 50,000 points and ResNet-18's 3,904 units).
        signed: rule making signed activations (GELU, attention projections) non-negative,
            applied element-wise before the spatial/token mean: ``abs`` (default), ``relu``,
            or ``raw`` (warns: the index then leaves [0, 1]).
        augment: a preset name, a mapping of its parameters, or a callable (see
            :class:`~memprune.data.MultiView`).
        normalize: ``auto`` (the encoder's mean/std, applied after augmentation), ``none`` or
            ``(mean, std)``.
        seed: view seed: view k of point i comes from (seed, i, k).
        eps: units with ``mu_max + mu_rest <= eps`` are dead and score 0.
        chunk_size, device, num_workers, progress: how the pass runs (:class:`Compute`); they
            never change the scores. A chunk of points holds ``chunk_size * n_views`` images.
        precision: ``auto`` (bf16 autocast on a CUDA device that supports it, else fp32),
            ``fp32`` or ``bf16``; the statistics accumulate in float32 either way.

    Under ``torchrun`` / ``accelerate launch`` each process scores a shard of the points and
    the states are merged: every process returns the single-process result.
    """
    return _unit_scores(
        UnitMem, "index", encoder, dataset, n_views, sites, rest, signed, augment, normalize,
        seed, eps, Compute(chunk_size, device, num_workers, progress, precision),
    )  # fmt: skip


def class_mem(
    encoder: nn.Module,
    dataset: Dataset,
    n_views: int = 1,
    sites: list[Site] | list[str] | str | None = None,
    rest: str = "mean",
    signed: str = "abs",
    augment="none",
    normalize="auto",
    seed: int = 0,
    eps: float = 1e-8,
    chunk_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    progress: bool | None = None,
    precision: str = "auto",
) -> ClassMemResult:
    """ClassMem (class selectivity, Morcos et al. 2018) of every unit at ``sites``.

    ``mu_u(c)`` is the mean activation of unit u over all points of class c (and their
    ``n_views`` views; default one un-augmented view), and ``ClassMem(u) = (mu_max,c -
    mu_rest,c) / (mu_max,c + mu_rest,c)``, the rest being the mean (or median) over the other
    classes. ``argmax`` holds the class each unit prefers. Streaming: O(classes x units)
    memory. Arguments as in :func:`unit_mem`.
    """
    return _unit_scores(
        ClassMem, "label", encoder, dataset, n_views, sites, rest, signed, augment, normalize,
        seed, eps, Compute(chunk_size, device, num_workers, progress, precision),
    )  # fmt: skip


def _unit_scores(cls, by, encoder, dataset, n_views, sites, rest, signed, augment, normalize,
                 seed, eps, compute: Compute):  # fmt: skip
    """What :func:`unit_mem` and :func:`class_mem` share: checks, sites, one pass, metadata."""
    _check(dataset, n_views, signed)
    RESTS.check(rest)
    sites = _sites_for(encoder, dataset, sites)
    if cls is ClassMem:
        labels = dataset_labels(dataset)
        if len(labels.unique()) < 2:
            raise ConfigError(
                f"ClassMem needs at least 2 classes in the data, got {labels.unique().tolist()}"
            )
        metric = ClassMem(sites, int(labels.max()) + 1, rest, eps)
    else:
        metric = UnitMem(sites, rest, eps)
    views = MultiView(dataset, n_views, augment, seed)
    result = _scan(metric, encoder, views, sites, by, compute, normalize=normalize,
                   signed=signed, desc=cls.__name__)  # fmt: skip
    result.meta = score_meta(
        result.kind, encoder, dataset, sites, **result.meta, n_views=n_views,
        signed=signed, augment=augment, normalize=normalize, seed=seed, compute=compute,
    )  # fmt: skip
    return result
