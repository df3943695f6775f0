"""Ablation: units switched off in a copy of an encoder, shapes unchanged (docs/method.md §8b).

A unit is ablated by zeroing its channel at its site on every forward pass: a forward hook on
the site's module (a forward pre-hook for a site read at a module's input, such as the heads'
outputs entering ``proj``) multiplies the chosen channels by 0, whatever produced them. Zeroing
the weights that make a channel would not do at a residual site (``act2`` of a ResNet block
also adds the shortcut), so the hook is the one definition that holds at every site. The hooks
live on the copy: an ablated encoder scores and probes as any other, and :func:`save_pruned`
refuses it (save the original and the ablated units instead). :func:`ablate` checks on a random
batch that every ablated unit reads 0.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from memprune.encoders import evaluating, input_size
from memprune.errors import SiteError
from memprune.hooks import capture, unit_reducer
from memprune.sites import Site, find_sites


class _ZeroChannels:
    """Multiplies channels ``units`` along ``axis`` of a tensor by 0 (a hook's body)."""

    def __init__(self, units: list[int], axis: int) -> None:
        self.units, self.axis = torch.tensor(units), axis

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(x.shape[self.axis], dtype=x.dtype, device=x.device)
        mask[self.units.to(x.device)] = 0
        shape = [1] * x.ndim
        shape[self.axis] = -1
        return x * mask.view(shape)


def _hook(site: Site, units: list[int]):
    zero = _ZeroChannels(units, site.channel_axis)
    if site.point == "input":
        return "pre", lambda mod, args: (zero(args[0]), *args[1:])
    return "post", lambda mod, args, out: zero(out)


#: Attribute an ablated copy carries: site name -> ablated units.
ABLATED = "memprune_ablated"


def ablate(encoder: nn.Module, units: dict[str, list[int]], check: bool = True) -> nn.Module:
    """A copy of ``encoder`` whose ``units`` (site name -> unit indices, as in a
    :class:`~memprune.UnitMemResult`) read 0 on every input (module docstring)."""
    model = copy.deepcopy(encoder).eval()
    units = {name: sorted({int(u) for u in idx}) for name, idx in units.items() if len(idx)}
    if not units:
        return model
    try:
        auto = {s.name: s for s in find_sites(model, "units")}
    except SiteError:  # a model without automatic sites: named ones only
        auto = {}
    sites = {n: auto.get(n) or find_sites(model, "units", include=n)[0] for n in units}
    modules = dict(model.named_modules())
    for name, idx in units.items():
        site = sites[name]
        if max(idx) >= site.n_units or min(idx) < 0:
            raise SiteError(f"site {name!r} has {site.n_units} units; got units {idx[:5]}")
        kind, fn = _hook(site, idx)
        module = modules[site.module]
        if kind == "pre":
            module.register_forward_pre_hook(fn)
        else:
            module.register_forward_hook(fn)
    setattr(model, ABLATED, {**getattr(encoder, ABLATED, {}), **units})
    if check:
        _check_zero(model, [sites[n] for n in units], units)
    return model


def _check_zero(model: nn.Module, sites, units: dict[str, list[int]]) -> None:
    """Every ablated unit reads 0 on a random batch (its activation maps 0 to 0)."""
    param = next(model.parameters(), torch.zeros(()))  # a model may hold no weights
    x = torch.rand(2, *input_size(model), generator=torch.Generator().manual_seed(0))
    reducers = {s.name: unit_reducer(s, "abs") for s in sites}
    with evaluating(model), torch.inference_mode(), capture(model, sites, reduce=reducers) as got:
        model(x.to(param.device, param.dtype))
    for name, idx in units.items():
        left = got[name][:, idx].abs().max().item()
        if left > 0:
            raise SiteError(
                f"ablating units of {name!r} left them at up to {left:.3g}: the activation"
                " after its source does not map 0 to 0, or another module adds to it;"
                " ablate a site that follows a conv / linear / norm and an activation"
            )


def _lowest(unitmem, counts: dict[str, int]) -> dict[str, list[int]]:
    return {site: torch.argsort(unitmem.sites[site]["score"].float())[:k].tolist()
            for site, k in counts.items()}  # fmt: skip


def _random(unitmem, counts: dict[str, int], seed: int) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(seed)
    return {site: torch.randperm(len(unitmem.sites[site]["score"]), generator=g)[:k].tolist()
            for site, k in counts.items()}  # fmt: skip


def canary_ablation(
    f: nn.Module,
    g: nn.Module,
    dataset,
    unitmem,
    included: list[int],
    excluded: list[int],
    evaluate=None,
    seeds=(0, 1, 2),
    **audit,
) -> list[dict]:
    """The causal test of UnitMem's localization (docs/method.md §8b).

    Ablates the units whose UnitMem argmax is an included canary (``canary``), as many of the
    lowest-UnitMem units of the same sites (``lowest``) and as many random units of the same
    sites (``random``, one row per seed), and measures on each copy the canaries' membership
    signal (the output AUC of included against excluded, and their SSLMem difference, f
    against ``g``) and ``evaluate(model)`` (e.g. linear-probe accuracy on a test split). One
    row per arm, ``none`` being f itself; the drops are against ``none``, and
    ``removed_per_point`` is the SSLMem drop per point of accuracy lost (None where no
    accuracy was lost: the ratio is then unbounded, and the two drops say more).
    ``audit``: arguments of :func:`memprune.canary_audit`.
    """
    from memprune.scores import canary_audit, canary_unit_map

    canary = {s: u for s, u in canary_unit_map(unitmem, included).items() if u}
    counts = {site: len(u) for site, u in canary.items()}
    arms = [
        ("none", None, {}),
        ("canary", None, canary),
        ("lowest", None, _lowest(unitmem, counts)),
    ]
    arms += [("random", s, _random(unitmem, counts, s)) for s in seeds]
    rows = []
    for arm, seed, units in arms:
        model = ablate(f, units) if units else copy.deepcopy(f)
        result = canary_audit(model, g, dataset, included, excluded, layers=["output"], **audit)
        diff, se = result.sslmem_difference()
        row = {"arm": arm, "seed": seed, "units": sum(len(u) for u in units.values()),
               "auc": float(result.auc()[-1]), "sslmem_diff": diff, "sslmem_se": se,
               "accuracy": None if evaluate is None else float(evaluate(model))}  # fmt: skip
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["auc_drop"] = base["auc"] - row["auc"]
        row["sslmem_drop"] = base["sslmem_diff"] - row["sslmem_diff"]
        if base["accuracy"] is not None:
            row["accuracy_drop"] = lost = base["accuracy"] - row["accuracy"]
            row["removed_per_point"] = row["sslmem_drop"] / (100 * lost) if lost > 0 else None
    return rows
