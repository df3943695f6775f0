"""UnitMem and ClassMem for every unit of an encoder in one batched pass (docs/method.md §2-§3).

UnitMem (Wang et al., "Localizing Memorization in SSL Vision Encoders", NeurIPS 2024, eq. 1):
for unit u and point i with ``mu_u(i)`` the mean activation over K augmented views,

    UnitMem(u) = (mu_max - mu_rest) / (mu_max + mu_rest),
    mu_max = max_i mu_u(i),  mu_rest = mean (or median) of mu_u(i) over i != argmax.

1 means the unit fires for one data point only. ClassMem is the class selectivity index of
Morcos et al. (ICLR 2018): the same index over per-class mean activations.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from memprune._dist import merged, rank_world
from memprune._io import load_result, package_versions, save_result
from memprune.data import MultiView, dataset_labels
from memprune.errors import ConfigError
from memprune.scores._engine import image_size, view_batches
from memprune.sites import Site, find_sites, resolve_sites
from memprune.stats import ClassMeanState, MatrixState, MeanRestState

RESTS = ("mean", "median")
FIELDS = ("score", "argmax", "mu_max", "mu_rest", "dead")
THRESHOLDS = (0.5, 0.8)


@dataclass
class UnitMemResult:
    """Per-site unit scores.

    ``sites[name]`` maps ``score`` (UnitMem or ClassMem per unit, float32), ``argmax`` (the
    data index i*(u) a unit memorizes; the class for ClassMem), ``mu_max``, ``mu_rest`` and
    ``dead`` (bool) to tensors ``[units]``. ``meta`` records how the scores were made.
    """

    sites: dict[str, dict[str, torch.Tensor]]
    meta: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "unitmem")

    def __getitem__(self, site: str) -> dict[str, torch.Tensor]:
        return self.sites[site]

    def scores(self) -> dict[str, torch.Tensor]:
        """Site name -> score per unit."""
        return {name: s["score"] for name, s in self.sites.items()}

    def summary(self) -> list[dict]:
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

    def histogram(self, bins: int = 20) -> dict[str, torch.Tensor]:
        """Counts of scores in ``bins`` equal bins over [0, 1], per site."""
        return {
            n: torch.histc(s["score"], bins=bins, min=0.0, max=1.0) for n, s in self.sites.items()
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``PATH.safetensors`` (tensors) and ``PATH.json`` (metadata), atomically."""
        tensors = {f"{site}/{k}": v for site, s in self.sites.items() for k, v in s.items()}
        meta = {**self.meta, "site_order": list(self.sites)}
        return save_result(path, tensors, meta, self.kind)

    @classmethod
    def load(cls, path: str | os.PathLike) -> UnitMemResult:
        tensors, meta = load_result(path, "UnitMem/ClassMem")
        order = meta.pop("site_order")
        sites = {name: {k: tensors[f"{name}/{k}"] for k in FIELDS} for name in order}
        return cls(sites, meta)


def _check(dataset: Dataset, n_views: int, rest: str, signed: str, minimum: int = 2) -> None:
    if rest not in RESTS:
        raise ConfigError(f"rest must be one of {RESTS}, got {rest!r}")
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


def _per_point(acts: dict[str, torch.Tensor], sites: list[Site], n_views: int) -> torch.Tensor:
    """``[B, units of all sites]``: every site's ``[B*K, U]`` averaged over the K views of
    each point (views of one point are adjacent: batches are laid out [points, views]).

    One state over all units side by side costs one update per batch instead of one per site.
    """
    units = torch.cat([acts[s.name] for s in sites], dim=1)  # [B*K, U]
    return units.view(-1, n_views, units.shape[1]).mean(dim=1).cpu()


def _split(scores: dict[str, torch.Tensor], sites: list[Site]) -> dict[str, dict]:
    """Per-site views of scores computed over all units side by side."""
    out, start = {}, 0
    for s in sites:
        out[s.name] = {k: v[start : start + s.n_units].clone() for k, v in scores.items()}
        start += s.n_units
    return out


def _scan(encoder, dataset, sites, state, by: str, desc: str, **opts):
    """Fold every batch's per-point means into ``state``, keyed by data ``index`` (UnitMem) or
    ``label`` (ClassMem), and merge the states of all processes."""
    n_views = opts["n_views"]
    views = MultiView(dataset, n_views, opts["augment"], opts["seed"], **opts["augment_params"])
    run = {
        k: opts[k]
        for k in ("batch_size", "normalize", "signed", "device", "num_workers", "progress")
    }
    for indices, labels, (acts,) in view_batches([encoder], views, [sites], desc=desc, **run):
        state.update(_per_point(acts, sites, n_views), indices if by == "index" else labels)
    _, world = rank_world()
    return merged(state, world)


#: Options that change how a result is computed but not what it is.
_RUNTIME = ("device", "num_workers", "progress")


def _meta(kind: str, encoder: nn.Module, dataset: Dataset, sites: list[Site], **options) -> dict:
    """JSON-able record of how scores were made (model, data, views, seed, options, versions)."""
    cfg = getattr(encoder, "pretrained_cfg", None) or {}
    augment = options.get("augment")
    normalize = options.get("normalize")
    options.update(
        augment=augment if isinstance(augment, str) else getattr(augment, "__name__", "callable"),
        augment_params={
            k: list(v) if isinstance(v, tuple) else v
            for k, v in (options.get("augment_params") or {}).items()
        },
        normalize=normalize if isinstance(normalize, str) or normalize is None else list(normalize),
    )
    return {
        "kind": kind,
        "model": cfg.get("architecture", type(encoder).__name__),
        "data": getattr(dataset, "name", type(dataset).__name__),
        "n_points": len(dataset),
        **{k: v for k, v in options.items() if k not in _RUNTIME},
        "sites": {
            s.name: {"module": s.module, "role": s.role, "units": s.n_units, "source": s.source}
            for s in sites
        },
        "versions": package_versions(),
    }


def unit_mem(
    encoder: nn.Module,
    dataset: Dataset,
    n_views: int = 10,
    sites: list[Site] | list[str] | str | None = None,
    rest: str = "mean",
    signed: str = "abs",
    augment="simclr",
    normalize="auto",
    batch_size: int = 32,
    seed: int = 0,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool | None = None,
    eps: float = 1e-8,
    **augment_params,
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
        augment: ``simclr``, ``none`` or a callable ``fn(image, generator)`` (see MultiView).
        normalize: ``auto`` (the encoder's mean/std, applied after augmentation), ``none`` or
            ``(mean, std)``.
        batch_size: points per forward pass (the pass holds ``batch_size * n_views`` images).
        seed: view seed: view k of point i comes from (seed, i, k).
        device: default: the launcher's device, else CUDA if available, else CPU.
        num_workers: DataLoader workers for augmentation (views do not depend on it).
        progress: progress bar; None shows it on a TTY only.
        eps: units with ``mu_max + mu_rest <= eps`` are dead and score 0.
        **augment_params: parameters of the augmentation preset.

    Under ``torchrun`` / ``accelerate launch`` each process scores a shard of the points and
    the states are merged: every process returns the single-process result.
    """
    _check(dataset, n_views, rest, signed)
    sites = _sites_for(encoder, dataset, sites)
    opts = dict(n_views=n_views, augment=augment, seed=seed, batch_size=batch_size,
                normalize=normalize, signed=signed, device=device, num_workers=num_workers,
                progress=progress, augment_params=augment_params)  # fmt: skip
    state_cls = MeanRestState if rest == "mean" else MatrixState
    state = state_cls.empty(sum(s.n_units for s in sites))  # all units side by side
    scores = _scan(encoder, dataset, sites, state, by="index", desc="UnitMem", **opts).compute(eps)
    meta = _meta("unitmem", encoder, dataset, sites, rest=rest, eps=eps, **opts)
    return UnitMemResult(_split(scores, sites), meta)


def class_mem(
    encoder: nn.Module,
    dataset: Dataset,
    n_views: int = 1,
    sites: list[Site] | list[str] | str | None = None,
    rest: str = "mean",
    signed: str = "abs",
    augment="none",
    normalize="auto",
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool | None = None,
    eps: float = 1e-8,
    **augment_params,
) -> UnitMemResult:
    """ClassMem (class selectivity, Morcos et al. 2018) of every unit at ``sites``.

    ``mu_u(c)`` is the mean activation of unit u over all points of class c (and their
    ``n_views`` views; default one un-augmented view), and ``ClassMem(u) = (mu_max,c -
    mu_rest,c) / (mu_max,c + mu_rest,c)``, the rest being the mean (or median) over the other
    classes. ``argmax`` holds the class each unit prefers. Streaming: O(classes x units)
    memory. Arguments as in :func:`unit_mem`.
    """
    _check(dataset, n_views, rest, signed)
    labels = dataset_labels(dataset)
    n_classes = int(labels.max()) + 1
    if len(labels.unique()) < 2:
        raise ConfigError(
            f"ClassMem needs at least 2 classes in the data, got {labels.unique().tolist()}"
        )
    sites = _sites_for(encoder, dataset, sites)
    opts = dict(n_views=n_views, augment=augment, seed=seed, batch_size=batch_size,
                normalize=normalize, signed=signed, device=device, num_workers=num_workers,
                progress=progress, augment_params=augment_params)  # fmt: skip
    state = ClassMeanState.empty(sum(s.n_units for s in sites), n_classes)
    scores = _scan(encoder, dataset, sites, state, by="label", desc="ClassMem", **opts)
    meta = _meta(
        "classmem", encoder, dataset, sites, rest=rest, eps=eps, n_classes=n_classes, **opts
    )
    return UnitMemResult(_split(scores.compute(rest, eps), sites), meta)
