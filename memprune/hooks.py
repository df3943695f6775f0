"""Capture reduced activations of many sites in one forward pass of the real model.

Hooks sit on the model's own modules, so residual additions and everything else in the
model's ``forward`` are respected (reading layers with a sequential layer getter would drop
them, docs/method.md §12). Each hook reduces its tensor at once, before any in-place activation
downstream can change it, keeps no reference to the raw output, and every hook is removed when
the ``with`` block ends, also on error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from memprune.errors import SiteError
from memprune.registry import Registry
from memprune.sites import Site

#: ``signed``: the element-wise rule making signed activations non-negative (None: keep).
SIGNED = Registry("signed-activation rule", {"abs": torch.abs, "relu": F.relu, "raw": None})
#: ``representation``: what of a layer's output a layer score reads.
REPRESENTATIONS = Registry(
    "representation",
    {"flatten": "the whole output", "pool": "the spatial / token mean", "cls": "the class token"},
)

Reducer = Callable[[torch.Tensor], torch.Tensor]


def _other_dims(x: torch.Tensor, axis: int) -> tuple[int, ...]:
    axis = axis % x.ndim
    return tuple(d for d in range(1, x.ndim) if d != axis)


def _per_image(x: torch.Tensor, site: Site) -> tuple[torch.Tensor, int]:
    """``x`` with the windows of each image side by side (``[B, windows, ...]``), and the
    channel axis in that layout."""
    if site.windows == 1:
        return x, site.channel_axis
    x = x.reshape(-1, site.windows, *x.shape[1:])  # windows of one image are consecutive rows
    return x, site.channel_axis + 1 if site.channel_axis > 0 else site.channel_axis


def unit_reducer(site: Site, signed: str = "abs") -> Reducer:
    """``[B, ...] -> [B, units]``: per-unit mean over space / tokens of the signed-rule output.

    The signed rule (``abs`` | ``relu`` | ``raw``) is applied element-wise before the mean, so
    a unit that fires strongly with either sign on a few tokens is not cancelled out. (Measured
    on CPU: ``x.abs().mean(dims)`` is ~10x faster than the copy-free
    ``linalg.vector_norm(x, 1, dims)``, so the rectified copy is made.) Sites known to be
    non-negative (ReLU outputs) skip the rule.
    """
    rule = SIGNED[signed]  # an unknown name fails here, on any site
    rule = None if site.nonneg else rule

    def reduce(x: torch.Tensor) -> torch.Tensor:
        # bf16 / fp16 activations (autocast) are summed in float32 without a float32 copy: the
        # rule is exact in any float dtype, the mean accumulates in its ``dtype``
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        if rule is not None:
            x = rule(x)
        x, axis = _per_image(x, site)
        dims = _other_dims(x, axis)
        return x.mean(dim=dims, dtype=dtype) if dims else x.to(dtype, copy=True)  # [B, units]

    return reduce


def layer_reducer(site: Site, representation: str = "flatten", copy: bool = True) -> Reducer:
    """``[B, ...] -> [B, D]``: the whole output flattened (``flatten``), the spatial / token mean
    (``pool``) or the class token (``cls``). Not normalized here; scores normalize.

    ``copy=False`` may return a view of the output: only for reducers that use it at once.
    """
    keep = (lambda t: t.clone()) if copy else (lambda t: t)
    REPRESENTATIONS.check(representation)

    def reduce(x: torch.Tensor) -> torch.Tensor:
        x, axis = _per_image(x, site)
        if representation == "flatten" or x.ndim == 2:  # a vector per image is its own summary
            return keep(x.flatten(1).float())
        if representation == "pool":
            dims = _other_dims(x, axis)
            return x.float().mean(dim=dims) if dims else keep(x.float())
        if x.ndim != 3:
            raise SiteError(
                f"representation='cls' needs token outputs [B, T, D]; site {site.name!r} gives"
                f" {tuple(x.shape)}: use 'flatten' or 'pool'"
            )
        return keep(x[:, 0].float())

    return reduce


class Captured(dict):
    """Site name -> reduced activations of the last forward pass; ``shapes`` holds the raw
    output shape (without batch) of every site."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: dict[str, tuple[int, ...]] = {}


@contextmanager
def capture(
    model: nn.Module,
    sites: Sequence[Site],
    signed: str = "abs",
    representation: str = "flatten",
    reduce: Reducer | dict[str, Reducer] | None = None,
) -> Iterator[Captured]:
    """Hook ``sites`` of ``model``; after each ``model(x)`` the yielded dict maps site names to
    reduced activations ``[B, D]``.

    Unit sites are reduced with :func:`unit_reducer` (``signed``), layer sites with
    :func:`layer_reducer` (``representation``); ``reduce`` (one callable, or one per site name)
    overrides both. The dict is cleared when ``model`` is called again; a site module that runs
    twice in one forward pass is an error.

    Example::

        with capture(model, find_sites(model, "units")) as acts:
            model(x)
        acts["layer1.0.act1"]  # [B, 64]
    """
    modules = dict(model.named_modules())
    missing = [s.module for s in sites if s.module not in modules]
    if missing:
        raise SiteError(f"sites not in {type(model).__name__}: {', '.join(missing)}")
    store = Captured()
    handles = []

    def record(site: Site, fn: Reducer, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise SiteError(f"site {site.name!r} did not produce a tensor")
        if site.name in store:
            raise SiteError(
                f"site {site.name!r} (module {site.module!r}) ran twice in one forward pass;"
                " a site must run once (name a module that is not reused)"
            )
        store.shapes[site.name] = tuple(x.shape[1:])
        store[site.name] = fn(x.detach())

    def make_hook(site: Site, fn: Reducer):
        if site.point == "input":
            return lambda _m, args: record(site, fn, args[0])
        return lambda _m, _args, out: record(site, fn, out)

    try:
        handles.append(model.register_forward_pre_hook(lambda _m, _a: store.clear()))
        for site in sites:
            if isinstance(reduce, dict):
                fn = reduce[site.name]
            elif reduce is not None:
                fn = reduce
            elif site.kind == "units":
                fn = unit_reducer(site, signed)
            else:
                fn = layer_reducer(site, representation)
            module = modules[site.module]
            if site.point == "input":
                handles.append(module.register_forward_pre_hook(make_hook(site, fn)))
            else:
                handles.append(module.register_forward_hook(make_hook(site, fn)))
        yield store
    finally:
        for h in handles:
            h.remove()


def describe_sites(model: nn.Module, data, n_views: int = 4, n_points: int = 8, seed: int = 0):
    """Every unit and layer site of ``model`` with what one batch of ``n_points`` x
    ``n_views`` views of ``data`` gives there: rows ``(name, kind, role, units, output shape,
    captured shape)``, and the parameter count, input shape and output width."""
    from memprune.data import MultiView
    from memprune.encoders import normalization
    from memprune.sites import find_sites

    sites = find_sites(model, "units") + find_sites(model, "layers")
    views = MultiView(data, n_views=n_views, seed=seed)
    batch = torch.stack([views[i][0] for i in range(min(n_points, len(views)))])
    b, k = batch.shape[:2]  # [B, K, 3, H, W]
    mean, std = (torch.tensor(v)[:, None, None] for v in normalization(model))
    x = (batch.flatten(0, 1) - mean) / std
    with torch.inference_mode(), capture(model, sites) as acts:
        out = model(x)
    rows = [(s.name, s.kind, s.role, s.n_units, "x".join(map(str, acts.shapes[s.name])),
             tuple(acts[s.name].shape)) for s in sites]  # fmt: skip
    n_params = sum(p.numel() for p in model.parameters())
    return {"rows": rows, "params": n_params, "input": tuple(x.shape[1:]),
            "output": out.shape[1], "points": b, "views": k}  # fmt: skip
