"""Prunable groups: unit sites mapped onto torch-pruning's dependency graph (docs/method.md §9).

A *unit* is one output channel of the module that produces a site's units (its ``source``: the
conv or norm before a CNN activation, ``fc1`` of an MLP). torch-pruning's dependency graph
couples every parameter that must shrink with it: the conv's weight and bias, its norm, the
next layer's input channels, and, across residual additions, every block of a stage. Sites
whose units are the same coupled channels (a ResNet stage's ``act2`` outputs and the stem or
downsample feeding them) form one :class:`Group`, scored by the mean of their units' scores.

Attention heads (``heads`` groups) are the input channels of ``attn.proj`` taken ``head_dim``
at a time; the graph maps them back to the query, key and value rows of ``attn.qkv``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from memprune.errors import SiteError
from memprune.sites import Site, trace, weight_modules

UNITS, HEADS = "units", "heads"


@dataclass
class Group:
    """Channels that are removed together.

    Attributes:
        name: the root module (``heads``: the attention module).
        kind: ``units`` (channels) or ``heads``.
        root: module whose output channels (``heads``: input channels) are indexed.
        width: current number of units (heads for ``heads`` groups).
        sites: site name -> ``(site unit index, root index)`` pairs as two long tensors.
        output: the channels reach the encoder's output (pooled feature width).
        head_dim: channels per head (1 for ``units`` groups).
        blocked: why the group cannot be pruned ('' when it can).
    """

    name: str
    kind: str
    root: str
    width: int
    sites: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    output: bool = False
    head_dim: int = 1
    blocked: str = ""

    def unit_scores(self, site_scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-unit (per-head) score: the mean over the group's scored sites (and a head's
        ``head_dim`` units)."""
        total = torch.zeros(self.width * self.head_dim)
        count = torch.zeros(self.width * self.head_dim)
        for site, (idx, root_idx) in self.sites.items():
            if site in site_scores:
                total[root_idx] += site_scores[site].float()[idx]
                count[root_idx] += 1
        if (count == 0).any():
            raise SiteError(
                f"group {self.name!r} has units without scores (sites {list(self.sites)})"
            )
        per = total / count
        return per.view(self.width, self.head_dim).mean(dim=1)

    def channels(self, units: torch.Tensor) -> list[int]:
        """Root channel indices of ``units`` (heads expand to their ``head_dim`` channels)."""
        units = units.long()
        if self.kind == HEADS:
            units = (units[:, None] * self.head_dim + torch.arange(self.head_dim)).flatten()
        return sorted(units.tolist())


def dependency_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's graph of ``model`` traced on ``example`` (ViT class tokens and position
    embeddings are picked up as unwrapped parameters, pruned along their last dimension)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        return tp.DependencyGraph().build_dependency(model, example_inputs=example)


def out_fn(graph: tp.DependencyGraph, module: nn.Module):
    pruner = graph.get_pruner_of_module(module)
    if pruner is None:
        raise SiteError(f"torch-pruning cannot prune the output channels of {module}")
    return pruner.prune_out_channels


def _out_members(graph: tp.DependencyGraph, group) -> set[str]:
    return {
        it.dep.target._name
        for it in group
        if graph.is_out_channel_pruning_fn(it.dep.handler) and it.dep.target._name
    }


def _output_source(model: nn.Module, example: torch.Tensor) -> str | None:
    """The last conv / linear / norm that runs: its channels are the encoder's output width."""
    tr = trace(model, example)
    modules = dict(model.named_modules())
    return next(weight_modules(modules, tr, len(tr.events)), (None, None))[0]


def build_groups(
    model: nn.Module, sites: list[Site], example: torch.Tensor, heads: bool
) -> tuple[tp.DependencyGraph, list[Group]]:
    """The dependency graph and the prunable groups holding ``sites``, in site order."""
    modules = dict(model.named_modules())
    graph = dependency_graph(model, example)
    out_src = _output_source(model, example)
    out_members: set[str] = set()
    if out_src is not None and out_src in modules:
        try:
            last = modules[out_src]
            full = list(range(graph.get_out_channels(last)))
            out_members = _out_members(
                graph, graph.get_pruning_group(last, out_fn(graph, last), full)
            )
        except (SiteError, KeyError, TypeError):
            out_members = set()
    groups: dict[frozenset | str, Group] = {}
    full_groups: dict[frozenset, object] = {}
    for site in sites:
        if site.role == HEADS:
            if heads:
                groups[site.name] = _head_group(site, modules)
            continue
        if not site.source or site.source not in modules:
            raise SiteError(
                f"site {site.name!r} has no conv / linear / norm producing its units, so its"
                " units cannot be pruned; name sites that follow one"
            )
        src = modules[site.source]
        n = graph.get_out_channels(src)
        if n != site.n_units:
            raise SiteError(
                f"site {site.name!r} has {site.n_units} units but {site.source!r} has {n} output"
                " channels; pruning needs sites whose units are a module's output channels"
            )
        group = graph.get_pruning_group(src, out_fn(graph, src), list(range(n)))
        members = frozenset(_out_members(graph, group))
        if members not in groups:
            full_groups[members] = group  # rooted at this site's source, all channels
            groups[members] = Group(site.source, UNITS, site.source, n, {},
                                    output=bool(members & out_members),
                                    blocked=_grouped_conv(group))  # fmt: skip
        g = groups[members]
        root_group = full_groups[members]
        item = next(
            it
            for it in root_group
            if it.dep.target._name == site.source
            and graph.is_out_channel_pruning_fn(it.dep.handler)
        )
        g.sites[site.name] = (torch.tensor(item.idxs), torch.tensor(item.root_idxs))
    return graph, list(groups.values())


def _grouped_conv(group) -> str:
    """Grouped (not depthwise) convolutions need the same channels removed in every group,
    which a unit ranking does not give; such groups are left alone."""
    for it in group:
        mod = it.dep.target.module
        if isinstance(mod, nn.Conv2d) and 1 < mod.groups < mod.in_channels:
            return f"grouped convolution {it.dep.target._name} (groups={mod.groups})"
    return ""


def _head_group(site: Site, modules: dict[str, nn.Module]) -> Group:
    attn_name = site.module.rpartition(".")[0]
    attn = modules[attn_name]
    n_heads, head_dim = attn.num_heads, getattr(attn, "head_dim", site.n_units // attn.num_heads)
    if n_heads * head_dim != site.n_units:
        raise SiteError(
            f"{attn_name}: num_heads {n_heads} x head_dim {head_dim} != {site.n_units} channels"
            f" entering {site.module}; heads can only be pruned in timm-style attention"
        )
    idx = torch.arange(site.n_units)
    return Group(attn_name, HEADS, site.module, n_heads, {site.name: (idx, idx)}, head_dim=head_dim)


def prune_group(graph: tp.DependencyGraph, model: nn.Module, group: Group, units: torch.Tensor):
    """Remove ``units`` (current indices) of ``group`` from ``model`` through the graph."""
    if len(units) == 0:
        return
    modules = dict(model.named_modules())
    root = modules[group.root]
    fn = tp.prune_linear_in_channels if group.kind == HEADS else out_fn(graph, root)
    pg = graph.get_pruning_group(root, fn, group.channels(units))
    if not graph.check_pruning_group(pg):
        raise SiteError(f"torch-pruning refuses to remove {len(units)} units of {group.name!r}")
    pg.prune()
    if group.kind == HEADS:  # timm attention reshapes by these attributes
        attn = modules[group.name]
        attn.num_heads -= len(units)
        if hasattr(attn, "attn_dim"):
            attn.attn_dim = attn.num_heads * group.head_dim
