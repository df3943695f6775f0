"""Which layers to fine-tune: ranked by (Δ)LayerMem, or a baseline choice (docs/method.md §10)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from memprune.encoders import input_size, weights_hash
from memprune.errors import ConfigError, SiteError
from memprune.registry import Registry
from memprune.sites import OUTPUT, Site, find_sites, is_conv, is_linear, is_norm, trace

#: ``by``: the per-layer value ``top`` ranks by -> the call whose result provides it.
BY = Registry(
    "layer ranking",
    {
        "delta": "memprune.layer_mem (ΔLayerMem, needs a reference encoder)",
        "layermem": "memprune.layer_mem (LayerMem, needs a reference encoder)",
        "gap": "memprune.scores.member_gap (member gap, one encoder)",
        "auc": "memprune.scores.member_gap (membership AUC, one encoder)",
        "unitmem": "memprune.tuning.unitmem_profile (mean UnitMem of the layer's units)",
        "unitmem_frac": "memprune.tuning.unitmem_profile (fraction of units above 0.5)",
        "rgn": "memprune.tuning.auto_rgn (Auto-RGN, relative gradient norm)",
    },
)


def _top(values: torch.Tensor, k: int, seed: int) -> list[int]:
    values = values.nan_to_num(nan=float("-inf"))  # a layer without a value is never on top
    return torch.sort(values, descending=True, stable=True).indices[:k].tolist()


def _random(values: torch.Tensor, k: int, seed: int) -> list[int]:
    return torch.randperm(len(values), generator=torch.Generator().manual_seed(seed))[:k].tolist()


#: ``strategy`` -> positions of the chosen layers, given the layers' values, k and a seed.
LAYER_STRATEGIES = Registry(
    "layer strategy",
    {
        "top": _top,
        "last": lambda values, k, seed: list(range(len(values) - k, len(values))),
        "first": lambda values, k, seed: list(range(k)),
        "random": _random,
        "all": lambda values, k, seed: list(range(len(values))),
    },
)


@dataclass
class LayerSelection:
    """Chosen layer sites (forward order) and, given an encoder, the parameters they own.

    ``values`` holds the ranking value (ΔLayerMem or LayerMem) of every candidate layer;
    ``parameters`` maps parameter names to the layer that owns them (empty without encoder).
    """

    layers: list[str]
    strategy: str
    by: str
    k: int
    values: dict[str, float] = field(default_factory=dict)
    parameters: dict[str, str] = field(default_factory=dict)


def _sites_and_trace(encoder: nn.Module, kind: str, size=None):
    """The encoder's ``kind`` sites and the trace of one dry forward pass."""
    size = tuple(size) if size is not None else input_size(encoder)
    sites = find_sites(encoder, kind, input_size=size)
    param = next(encoder.parameters())
    return sites, trace(encoder, torch.zeros(1, *size, device=param.device))


def layer_modules(
    encoder: nn.Module, layers: list[str] | None = None, size=None
) -> dict[str, list[str]]:
    """Layer site -> the modules it owns: every module that finishes after the previous layer
    site's point and by this one's (the stem owns ``conv1``/``bn1``; ``layer1.0`` its block;
    ``blocks.i:after_attn`` owns ``norm1``, ``attn``, ``ls1``; ``:after_mlp`` the MLP half).
    Modules after the last layer (a ViT's final ``norm``) and parameters held directly by the
    root module (class token, position embedding) belong to no layer."""
    sites, tr = _sites_and_trace(encoder, "layers", size)
    names = [s.name for s in sites]
    if layers is not None:
        unknown = [n for n in layers if n not in names]
        if unknown:
            raise SiteError(
                f"layers {unknown} are not layer sites of {type(encoder).__name__}; its layers:"
                f" {', '.join(names)}"
            )
    point = {}
    for s in sites:
        event = ("enter", s.module) if s.point == "input" else ("exit", s.module)
        point[s.name] = tr.events.index(event)
    done = {}
    for i, (kind, name) in enumerate(tr.events):
        if kind == "exit" and name not in done:
            done[name] = i
    bounds = sorted((point[s.name], s.name) for s in sites)
    owner_of = {}
    for module, at in done.items():
        owner_of[module] = next((site for p, site in bounds if at <= p), None)
    owned: dict[str, list[str]] = {s.name: [] for s in sites}
    for module, owner in owner_of.items():
        inner = [o for m, o in owner_of.items() if m.startswith(module + ".")]
        if owner is not None and all(o == owner for o in inner):  # not a container of others
            owned[owner].append(module)
    return owned if layers is None else {n: owned[n] for n in layers}


def layer_parameters(encoder: nn.Module, layers: list[str], size=None) -> dict[str, str]:
    """Parameter name -> owning layer, for the parameters of ``layers``."""
    owned = layer_modules(encoder, layers, size)
    out = {}
    for layer, modules in owned.items():
        for module in modules:
            mod = encoder.get_submodule(module)
            for pname, _ in mod.named_parameters(recurse=False):
                out[f"{module}.{pname}"] = layer
    return out


def ranking_values(result, by: str | None = None) -> tuple[str, torch.Tensor]:
    """``(by, values of the layers [L])`` of a layer ranking result: a
    :class:`~memprune.LayerMemResult` (``delta``, ``layermem``), a
    :class:`~memprune.scores.MemberGapResult` (``gap``, ``auc``) or the
    :class:`~memprune.tuning.LayerValues` of ``unitmem_profile`` / ``auto_rgn``; ``by``
    defaults to the result's first ranking."""
    offered = tuple(getattr(result, "rankings", ()))
    if not offered:
        raise ConfigError(
            f"{type(result).__name__} is not a layer ranking: pass the result of layer_mem,"
            " member_gap, unitmem_profile or auto_rgn"
        )
    by = offered[0] if by is None else BY.check(by)
    if by not in offered:
        raise ConfigError(
            f"by={by!r} comes from {BY[by]}; this {type(result).__name__} ranks by"
            f" {', '.join(offered)}"
        )
    return by, result.ranking(by)


def check_same_encoder(result, encoder: nn.Module) -> None:
    """Refuse a ranking computed on an encoder with other weights than ``encoder``."""
    made_on = (getattr(result, "meta", None) or {}).get("weights")
    if made_on is not None and made_on != weights_hash(encoder)[: len(made_on)]:
        raise ConfigError(
            f"this {type(result).__name__} was computed on an encoder with other weights"
            f" (weights {made_on}): rank the layers of the encoder you fine-tune"
        )


def select_layers(
    result,
    k: int,
    by: str | None = None,
    strategy: str = "top",
    seed: int = 0,
    encoder: nn.Module | None = None,
) -> LayerSelection:
    """Choose ``k`` layers of an encoder to fine-tune from a per-layer ranking.

    Args:
        result: a layer ranking of the encoder: LayerMem (:func:`memprune.layer_mem`), the
            member gap (:func:`memprune.scores.member_gap`), the UnitMem profile
            (:func:`memprune.tuning.unitmem_profile`) or Auto-RGN
            (:func:`memprune.tuning.auto_rgn`). An ``output`` entry is a read-out of the last
            layer, not a layer that owns parameters, and is never chosen.
        k: number of layers (ignored by ``all``).
        by: the value ``top`` ranks by (:data:`BY`): ``delta`` (ΔLayerMem) or ``layermem``;
            ``gap`` or ``auc``; ``unitmem`` or ``unitmem_frac``; ``rgn``. Default: the
            result's first (``delta``, ``gap``, ``unitmem``, ``rgn``).
        strategy: ``top`` (the k highest values), ``last`` / ``first`` (the last / first k
            in forward order), ``random`` (k drawn with ``seed``), ``all``.
        seed: seed of ``random``.
        encoder: when given, the selection's ``parameters`` are filled, the layers checked
            against it, and a ranking computed on other weights refused.
    Returns:
        A :class:`LayerSelection` with the layers in forward order.
    """
    choose = LAYER_STRATEGIES[strategy]
    by, values = ranking_values(result, by)
    layers = [name for name in result.layers if name != OUTPUT]
    keep = torch.tensor([name != OUTPUT for name in result.layers])
    values = values[keep]
    if strategy == "all":
        k = len(layers)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(layers):
        raise ConfigError(
            f"k must be an int in [1, {len(layers)}] (the encoder's {len(layers)} layers), got"
            f" {k!r}"
        )
    picked = [layers[i] for i in sorted(choose(values, k, seed))]
    selection = LayerSelection(
        picked, strategy, by, k, {n: float(v) for n, v in zip(layers, values)}
    )
    if encoder is not None:
        check_same_encoder(result, encoder)
        selection.parameters = layer_parameters(encoder, picked)
    return selection


def unit_parameters(encoder: nn.Module, units: dict[str, list[int]], size=None):
    """For ``{unit site: unit indices}``: parameter name -> (site, mask of the entries that
    belong to the chosen units). A unit's parameters are its row in the module producing it
    (``Site.source``: a norm's weight and bias, an ``fc1`` row) and, when that is a norm, the
    output row of the conv / linear right before it."""
    found, tr = _sites_and_trace(encoder, "units", size)
    sites: dict[str, Site] = {s.name: s for s in found}
    unknown = [n for n in units if n not in sites]
    if unknown:
        raise SiteError(
            f"{unknown} are not unit sites of {type(encoder).__name__} (e.g."
            f" {', '.join(list(sites)[:5])}); see memprune.find_sites(encoder)"
        )
    modules = dict(encoder.named_modules())
    masks: dict[str, tuple[str, torch.Tensor]] = {}
    for name, idx in units.items():
        site = sites[name]
        if site.role not in ("conv", "mlp") or not site.source:
            raise SiteError(f"site {name!r} ({site.role}) has no per-unit parameters to train")
        idx = torch.as_tensor(list(idx), dtype=torch.long)
        if len(idx) and (idx.min() < 0 or idx.max() >= site.n_units):
            raise ConfigError(f"unit indices of {name!r} must be in [0, {site.n_units})")
        owners = [site.source]
        if is_norm(modules[site.source]):
            start = tr.events.index(("enter", site.source))
            before = next(
                (n for kind, n in reversed(tr.events[:start])
                 if kind == "enter" and (is_conv(modules[n]) or is_linear(modules[n]))),
                None,
            )  # fmt: skip
            if before is not None:
                owners.append(before)
        for owner in owners:
            for pname, p in modules[owner].named_parameters(recurse=False):
                if p.shape[0] != site.n_units:
                    continue
                mask = torch.zeros_like(p, dtype=torch.bool)
                mask[idx] = True
                masks[f"{owner}.{pname}"] = (name, mask)
    return masks
