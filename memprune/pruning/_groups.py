"""Prunable groups: unit sites mapped onto torch-pruning's dependency graph (docs/method.md §9).

A *unit* is one output channel of the module that produces a site's units (its ``source``: the
conv or norm before a CNN activation, ``fc1`` of an MLP). torch-pruning's dependency graph
couples every parameter that must shrink with it: the conv's weight and bias, its norm, the
next layer's input channels, and, across residual additions, every block of a stage. Sites
whose units are the same coupled channels (a ResNet stage's ``act2`` outputs and the stem or
downsample feeding them) form one :class:`Group`, scored by the mean of their units' scores.

Attention heads (``heads`` groups) are the input channels of ``attn.proj`` taken ``head_dim``
at a time, with their query, key and value rows; a head lives inside its attention module and
is removed there (:mod:`memprune.pruning._heads`), not through the graph.

A grouped convolution (``1 < groups < in_channels``, RegNet's 3x3) ties its input and output
channels group by group, so its units go a whole convolution group at a time (``convgroups``
groups): the channels feeding the group (``root``, ``head_dim`` per group) and those it
produces (``partner``, ``partner_dim`` per group), scored by the mean of all their units.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from memprune.attention import fit_forwards
from memprune.errors import SiteError, first_line
from memprune.pruning._glu import is_glu, remove_glu_units
from memprune.pruning._heads import head_layout, remove_heads
from memprune.pruning._importance import channel_scores
from memprune.sites import Site, trace, weight_modules

UNITS, HEADS, CONV_GROUPS = "units", "heads", "convgroups"
KINDS = (UNITS, HEADS, CONV_GROUPS)


def _is_grouped(module: nn.Module) -> bool:
    """A convolution whose channels go a group at a time: grouped (``1 < groups <
    in_channels``) or depthwise with a channel multiplier (each input channel feeds
    ``out / in`` output channels), which torch-pruning's depthwise rule (out = in) mangles."""
    if not isinstance(module, nn.Conv2d) or module.groups == 1:
        return False
    return module.groups < module.in_channels or module.out_channels != module.in_channels


def _refresh_mixed(conv: nn.Module) -> None:
    """timm's ``MixedConv2d`` splits its input by a stored list of widths."""
    conv.splits = [c.in_channels for c in conv.values()]
    conv.in_channels = sum(conv.splits)
    conv.out_channels = sum(c.out_channels for c in conv.values())


#: Module class name -> what refreshes the widths it stores after channels were removed (its
#: forward reads them, torch-pruning does not know them).
STORED_WIDTHS = {"MixedConv2d": _refresh_mixed}


def refresh_widths(model: nn.Module) -> None:
    """Update the channel counts modules of ``model`` keep in plain attributes (and a
    linear layer's ``in_features`` / ``out_features``, which torch-pruning lowers by the
    indices it was given even when some fall outside the layer)."""
    for m in model.modules():
        if fix := STORED_WIDTHS.get(type(m).__name__):
            fix(m)
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape


class _GroupedConvPruner(tp.pruner.function.ConvPruner):
    """Whole groups of a grouped convolution: torch-pruning's conv pruner keeps the first
    input channels of every group, which is right for none of them once a group goes. Its
    output rows go by the conv pruner; its input channels must be whole groups, which lowers
    ``groups`` and leaves each group's weight slice as it is."""

    def prune_in_channels(self, layer: nn.Module, idxs) -> nn.Module:
        width = layer.weight.shape[1]  # input channels per group
        gone = {int(i) // width for i in idxs}
        if len(idxs) != len(gone) * width:
            raise SiteError(
                f"a grouped convolution loses whole groups of {width} input channels, not"
                f" {len(idxs)} channels of {len(gone)} groups"
            )
        layer.in_channels -= len(idxs)
        layer.groups -= len(gone)
        return layer


_GROUPED = _GroupedConvPruner()


class _GroupedConv2d(nn.Conv2d):
    """``nn.Conv2d`` under another name while a model is pruned, so that torch-pruning (which
    takes customized pruners per type: per instance, 1.6 fails while tracing) gives grouped
    convolutions :class:`_GroupedConvPruner` and every other convolution its own."""


@contextmanager
def grouped_convs(model: nn.Module) -> Iterator[None]:
    """Mark the grouped ``nn.Conv2d`` of ``model`` as :class:`_GroupedConv2d` inside the block
    (the class only: weights and forward are untouched); restored on exit, also on error."""
    marked = [m for m in model.modules() if type(m) is nn.Conv2d and _is_grouped(m)]
    for m in marked:
        m.__class__ = _GroupedConv2d
    try:
        yield
    finally:
        for m in marked:
            m.__class__ = nn.Conv2d


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
        head_dim: channels per head (``convgroups``: root channels per conv group; 1 for
            ``units`` groups).
        blocked: why the group cannot be pruned ('' when it can).
        partner: ``convgroups`` only: the module producing the grouped conv's output
            channels, with ``partner_dim`` channels per conv group and ``partner_sites``.
        glu: the gated MLP whose hidden units these are ('' for none;
            :mod:`memprune.pruning._glu`), removed inside it rather than through the graph.
        layout: ``heads`` only: the row order of the attention's fused projections
            (:func:`~memprune.pruning._heads.head_layout`).
    """

    name: str
    kind: str
    root: str
    width: int
    sites: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    output: bool = False
    head_dim: int = 1
    blocked: str = ""
    partner: str = ""
    partner_dim: int = 0
    partner_sites: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    layout: str = ""
    glu: str = ""

    def _per_channel(self, sites, dim: int, site_scores) -> torch.Tensor:
        found = ((root_idx, site_scores[site][idx]) for site, (idx, root_idx) in sites.items()
                 if site in site_scores)  # fmt: skip
        mean, count = channel_scores(self.width * dim, found)
        if (count == 0).any():
            raise SiteError(f"group {self.name!r} has units without scores (sites {list(sites)})")
        return mean

    def unit_scores(self, site_scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-unit (per-head, per-conv-group) score: the mean over the group's scored sites
        (and over a head's or a conv group's channels)."""
        per = self._per_channel(self.sites, self.head_dim, site_scores)
        if self.kind != CONV_GROUPS:
            return per.view(self.width, self.head_dim).mean(dim=1)
        out = self._per_channel(self.partner_sites, self.partner_dim, site_scores)
        return self.merge(per, out)

    def merge(self, root: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
        """Per-channel values of a ``convgroups`` group's two sides -> one per conv group."""
        total = root.view(self.width, -1).sum(1) + partner.view(self.width, -1).sum(1)
        return total / (self.head_dim + self.partner_dim)

    def channels(self, units: torch.Tensor, dim: int | None = None) -> list[int]:
        """Root channel indices of ``units`` (heads and conv groups expand to their ``dim``
        channels, ``head_dim`` by default)."""
        units, dim = units.long(), dim or self.head_dim
        if self.kind != UNITS:
            units = (units[:, None] * dim + torch.arange(dim)).flatten()
        return sorted(units.tolist())


def dependency_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's graph of ``model`` traced on ``example`` (ViT class tokens and position
    embeddings are picked up as unwrapped parameters, pruned along their last dimension;
    grouped convolutions get :class:`_GroupedConvPruner`)."""
    grouped = any(isinstance(m, _GroupedConv2d) for m in model.modules())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        try:
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example,
                customized_pruners={_GroupedConv2d: _GROUPED} if grouped else None,
            )  # fmt: skip
        except (RuntimeError, TypeError, IndexError, KeyError, ValueError) as err:
            arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
            raise SiteError(
                f"torch-pruning cannot trace the channel dependencies of"
                f" {arch or type(model).__name__} ({type(err).__name__}: {first_line(err, 140)}):"
                " its graph does not follow this architecture's concatenations or slices, so"
                " its units cannot be removed; prune another encoder"
            ) from None


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
    layouts: dict[tuple, tuple[str, str]] = {}
    for site in sites:
        if site.role == HEADS:
            if heads:
                groups[site.name] = _head_group(site, modules, model, example, layouts)
            continue
        if not site.source or site.source not in modules:
            raise SiteError(
                f"site {site.name!r} has no conv / linear / norm producing its units, so its"
                " units cannot be pruned; name sites that follow one"
            )
        src = modules[site.source]
        n = graph.get_out_channels(src)
        if _is_glu(modules, site, n):
            _add_glu(graph, groups, full_groups, site, src, n, out_members)
            continue
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
        idx, root_idx = torch.tensor(item.idxs), torch.tensor(item.root_idxs)
        if len(idx) and (idx.max() >= site.n_units or root_idx.max() >= g.width):
            g.blocked = g.blocked or (
                f"torch-pruning maps the channels of {site.source!r} outside its"
                f" {site.n_units} units (a split or concatenation it does not follow)"
            )
            continue
        g.sites[site.name] = (idx, root_idx)
    _block_overlaps(groups)
    return graph, _merge_grouped(graph, groups, full_groups, modules)


def _is_glu(modules: dict, site: Site, n: int) -> bool:
    """A gated MLP's units (``fc1`` makes value and gate: twice the units)."""
    return is_glu(modules.get(site.source.rpartition(".")[0])) and n == 2 * site.n_units


def _add_glu(graph, groups, full_groups, site: Site, src, n: int, out_members) -> None:
    """A gated MLP's units: one group of its own, removed inside the MLP."""
    group = graph.get_pruning_group(src, out_fn(graph, src), list(range(n)))
    members = frozenset(_out_members(graph, group))
    idx = torch.arange(site.n_units)
    full_groups[members] = group
    groups[members] = Group(site.source, UNITS, site.source, site.n_units,
                            {site.name: (idx, idx)}, output=bool(members & out_members),
                            glu=site.source.rpartition(".")[0])  # fmt: skip


def _block_overlaps(groups: dict) -> None:
    """A group whose channels are a concatenation of other groups' channels (DenseNet's
    norm before each layer reads every earlier layer's output) overlaps them: the two cannot
    both be pruned by their own plans, so the larger one is left alone and its channels go
    through the groups it is made of."""
    keys = [k for k in groups if isinstance(k, frozenset)]
    for k in keys:
        for other in keys:
            if other != k and k & other and (len(k), sorted(k)) > (len(other), sorted(other)):
                groups[k].blocked = groups[k].blocked or (
                    f"its channels are also those of group {groups[other].name!r} (a"
                    " concatenation of other groups' outputs); pruned through those"
                )
                break


def _grouped_conv(group) -> str:
    """The grouped convolution a group reaches ('' for none): its channels go a whole conv
    group at a time, or not at all."""
    for it in group:
        if _is_grouped(it.dep.target.module):
            return f"grouped convolution {it.dep.target._name}"
    return ""


def _merge_grouped(graph, groups: dict, full_groups: dict, modules) -> list[Group]:
    """Each grouped convolution's two unit groups (the channels entering it, those leaving it)
    become one ``convgroups`` group. Where that mapping is not one to one (several groups on
    a side, or a group that also enters or leaves another grouped convolution: a chain), both
    stay blocked. Parallel grouped convolutions between the same two groups (FastViT's large
    and small kernels) are one pair."""
    pairs = {}
    for name, conv in modules.items():
        if not isinstance(conv, _GroupedConv2d):
            continue
        sides = {}
        for members, full in full_groups.items():
            for it in full:
                if it.dep.target._name == name:
                    side = "out" if graph.is_out_channel_pruning_fn(it.dep.handler) else "in"
                    sides.setdefault(side, set()).add(members)
        ins, outs = sides.get("in", set()), sides.get("out", set())
        if len(ins) == 1 and len(outs) == 1 and ins != outs:
            pairs.setdefault((*ins, *outs), (name, conv))
    uses = [m for pair in pairs for m in pair]
    merged, used = {}, set()
    for (a_key, b_key), (name, conv) in pairs.items():
        a, b = groups[a_key], groups[b_key]
        if uses.count(a_key) > 1 or uses.count(b_key) > 1 or a.output or b.output:
            continue
        if a.width % conv.groups or b.width % conv.groups:
            continue
        used |= {a_key, b_key}
        merged[a_key] = Group(
            name, CONV_GROUPS, a.root, conv.groups, a.sites, head_dim=a.width // conv.groups,
            partner=b.root, partner_dim=b.width // conv.groups, partner_sites=b.sites,
        )  # fmt: skip
    out = []
    for members, g in groups.items():
        if members in merged:
            out.append(merged[members])
        elif members not in used:
            if g.blocked.startswith("grouped convolution"):
                g.blocked += " (its input and output channels are not one group each)"
            out.append(g)
    return out


def _head_group(site: Site, modules: dict, model, example, layouts: dict) -> Group:
    """The heads of one attention module, with the row layout of its projections (checked
    once per attention class and shape; a module no layout fits is blocked with why)."""
    attn_name = site.module.rpartition(".")[0]
    attn = modules[attn_name]
    n_heads = attn.num_heads
    head_dim = site.n_units // n_heads
    idx = torch.arange(site.n_units)
    group = Group(attn_name, HEADS, site.module, n_heads, {site.name: (idx, idx)},
                  head_dim=head_dim)  # fmt: skip
    if n_heads * head_dim != site.n_units:
        group.blocked = (
            f"num_heads {n_heads} does not divide the {site.n_units} channels entering"
            f" {site.module}"
        )
        return group
    key = (type(attn).__name__, n_heads, head_dim, attn.proj.weight.shape[0])
    if key not in layouts:
        layouts[key] = head_layout(model, attn_name, example)
    group.layout, why = layouts[key]
    if why:
        group.blocked = f"the heads of {type(attn).__name__} cannot be removed: {why}"
    return group


def prune_group(graph: tp.DependencyGraph, model: nn.Module, group: Group, units: torch.Tensor):
    """Remove ``units`` (current indices) of ``group`` from ``model`` through the graph."""
    if len(units) == 0:
        return
    modules = dict(model.named_modules())
    if group.kind == HEADS:  # inside one module: removed there (memprune.pruning._heads)
        remove_heads(modules[group.name], sorted(units.tolist()), group.layout)
        return
    if group.glu:
        remove_glu_units(modules[group.glu], sorted(units.tolist()))
        return
    root = modules[group.root]
    fn = out_fn(graph, root)
    parts = [(root, fn, group.channels(units))]
    if group.kind == CONV_GROUPS:  # the conv's output rows, then its input channels
        partner = modules[group.partner]
        parts.insert(0, (partner, out_fn(graph, partner), group.channels(units, group.partner_dim)))
    pgs = [graph.get_pruning_group(m, f, idx) for m, f, idx in parts]
    if not all(graph.check_pruning_group(pg) for pg in pgs):
        raise SiteError(f"torch-pruning refuses to remove {len(units)} units of {group.name!r}")
    for pg in pgs:
        pg.prune()
    refresh_widths(model)
    fit_forwards(model)  # BEiT / EVA attention after the residual stream narrowed
