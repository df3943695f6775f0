"""Whole attention heads removed from a timm attention module (docs/method.md §9).

A head lives inside one attention module: its query, key and value rows of the projections
(``qkv``, or ``q`` / ``k`` / ``v``, ``qk``, ``kv``), their biases (BEiT's and EVA's separate
``q_bias`` / ``v_bias``), its columns of ``proj``, and the parameters kept per head (relative
position bias tables, XCiT's ``temperature``, attention biases). Nothing outside the module
changes width, so memprune removes a head here directly, with torch-pruning's layer pruners,
instead of asking torch-pruning's graph to follow the reshapes and matrix products between
``qkv`` and ``proj`` (it follows them for timm's plain ``Attention`` and misses the rest).

Fused projections store their rows either section-major (all queries, then all keys, then all
values: ``reshape(B, N, 3, heads, d)``) or head-major (each head's query, key and value
together: TinyViT's ``view(B, N, heads, -1).split(...)``). Which one a module uses is not in
its weights, so :func:`head_layout` finds it by removing one head from a copy of the model and
comparing with the model whose ``proj`` ignores that head: removing a head must equal masking
its output, to float precision. A module for which no layout passes (its forward derives the
head width from the input width, or keeps per-head state memprune does not know) is left alone
with the reason.
"""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn

from memprune.attention import channel_children, use_pruned_forward
from memprune.errors import first_line

#: Child projections making queries, keys or values: name -> sections (q, k, v) it holds.
PROJECTIONS = {"qkv": 3, "qk": 2, "kv": 2, "q": 1, "k": 1, "v": 1,
               "q_proj": 1, "k_proj": 1, "v_proj": 1}  # fmt: skip
#: Per-channel biases of a fused ``qkv`` kept apart (BEiT, EVA).
QKV_BIASES = ("q_bias", "k_bias", "v_bias")
#: Parameters and buffers holding one slice per head: leaf name -> the usual head axis.
PER_HEAD = {
    "relative_position_bias_table": -1,
    "temperature": 0,
    "attention_biases": 0,
    "gating_param": 0,
}
#: Linear children over the head axis: ConViT's ``pos_proj`` makes one row per head;
#: CaiT's talking-heads ``proj_l`` / ``proj_w`` mix the heads (a row and a column per head).
HEAD_LINEARS = {"pos_proj": ("rows",), "proj_l": ("rows", "cols"), "proj_w": ("rows", "cols")}
#: Plain attributes holding the attention width (heads x head width) that forwards read.
WIDTH_ATTRS = ("attn_dim", "out_dim", "dim_attn", "all_head_dim", "val_attn_dim")
#: Per-device caches of per-head tensors some attentions fill in eval mode (TinyViT,
#: EfficientFormer): emptied when heads go, so the next forward recomputes them.
CACHES = ("attention_bias_cache",)
#: Row orders of a fused projection.
LAYOUTS = ("sections", "heads")


def _width(layer: nn.Module, side: str) -> int:
    return layer.weight.shape[0 if side == "out" else 1]


def _rows(out: int, sections: int, heads: int, layout: str, removed: list[int]) -> list[int]:
    """Rows of a projection with ``out`` rows that belong to the ``removed`` heads."""
    if layout == "sections" or sections == 1:
        block, per = out // (sections * heads), out // sections
        return [s * per + h * block + j for s in range(sections) for h in removed
                for j in range(block)]  # fmt: skip
    block = out // heads
    return [h * block + j for h in removed for j in range(block)]


def prune_rows(layer: nn.Module, rows: list[int]) -> None:
    if isinstance(layer, nn.Conv2d):
        tp.prune_conv_out_channels(layer, rows)
    else:
        tp.prune_linear_out_channels(layer, rows)


def prune_cols(layer: nn.Module, cols: list[int]) -> None:
    if isinstance(layer, nn.Conv2d):
        tp.prune_conv_in_channels(layer, cols)
    else:
        tp.prune_linear_in_channels(layer, cols)


def _per_head_tensors(attn: nn.Module):
    """(owner module, leaf name, tensor) of the per-head parameters and buffers of ``attn``
    and of its children other than the projections (a ``rel_pos`` module's table)."""
    skip = _own_children(attn)
    for name, owner in attn.named_modules():
        if name.split(".")[0] in skip:
            continue
        for leaf, t in [
            *owner.named_parameters(recurse=False),
            *owner.named_buffers(recurse=False),
        ]:
            if leaf in PER_HEAD and t is not None:
                yield owner, leaf, t


def _head_axis(t: torch.Tensor, heads: int, usual: int) -> int:
    axes = [d for d in range(t.dim()) if t.shape[d] == heads]
    if usual % t.dim() in axes:
        return usual % t.dim()
    if len(axes) == 1:
        return axes[0]
    raise ValueError(f"no single head axis in a tensor of shape {tuple(t.shape)}")


def _replace(owner: nn.Module, leaf: str, value: torch.Tensor) -> None:
    old = getattr(owner, leaf)
    if isinstance(old, nn.Parameter):
        setattr(owner, leaf, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:
        owner._buffers[leaf] = value.contiguous()


def _slices(heads: list[int], width: int) -> list[int]:
    """Channels of ``heads`` when each head has ``width`` consecutive channels."""
    return [h * width + j for h in heads for j in range(width)]


def _own_children(attn: nn.Module) -> set[str]:
    """Children of ``attn`` pruned by name (not scanned for per-head tensors)."""
    return {*PROJECTIONS, "proj", *HEAD_LINEARS, *channel_children(attn)}


def _remove_rows(attn: nn.Module, removed: list[int], layout: str) -> None:
    """The removed heads' query / key / value rows, and their separate q / k / v biases."""
    heads = attn.num_heads
    for name, sections in PROJECTIONS.items():
        layer = getattr(attn, name, None)
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            prune_rows(layer, _rows(_width(layer, "out"), sections, heads, layout, removed))
    for leaf in QKV_BIASES:
        bias = getattr(attn, leaf, None)
        if isinstance(bias, torch.Tensor):
            gone = set(_slices(removed, bias.shape[0] // heads))
            idx = torch.tensor([i for i in range(bias.shape[0]) if i not in gone])
            _replace(attn, leaf, bias.detach()[idx])


def _remove_head_slices(attn: nn.Module, removed: list[int], channels: list[int]) -> None:
    """Per-head tensors, linear layers over the head axis, per-channel children."""
    keep = torch.tensor([h for h in range(attn.num_heads) if h not in set(removed)])
    for owner, leaf, t in list(_per_head_tensors(attn)):
        axis = _head_axis(t, attn.num_heads, PER_HEAD[leaf])
        _replace(owner, leaf, t.detach().index_select(axis, keep.to(t.device)))
    for name, sides in HEAD_LINEARS.items():
        child = getattr(attn, name, None)
        if isinstance(child, nn.Linear):
            if "rows" in sides:
                prune_rows(child, sorted(removed))
            if "cols" in sides:
                prune_cols(child, sorted(removed))
    for name in channel_children(attn):  # EVA's scale norm and gate: one slice per channel
        child = getattr(attn, name, None)
        if isinstance(child, nn.LayerNorm):
            tp.prune_layernorm_out_channels(child, channels)
        elif isinstance(child, nn.Linear):
            prune_rows(child, channels)


def remove_heads(attn: nn.Module, removed: list[int], layout: str) -> None:
    """Remove the heads ``removed`` (indices) from the timm attention module ``attn``."""
    if not removed:
        return
    heads = attn.num_heads
    head_dim = _width(attn.proj, "in") // heads
    channels = _slices(removed, head_dim)
    _remove_rows(attn, removed, layout)
    _remove_head_slices(attn, removed, channels)
    prune_cols(attn.proj, channels)
    left = heads - len(set(removed))
    for attr in WIDTH_ATTRS:
        value = getattr(attn, attr, None)
        if isinstance(value, int) and value == heads * head_dim:
            setattr(attn, attr, left * head_dim)
    _stored_head_counts(attn, heads, left)
    attn.num_heads = left
    clear_caches(attn)
    use_pruned_forward(attn)


def _stored_head_counts(attn: nn.Module, old: int, new: int) -> None:
    """Head counts that a position-bias module of ``attn`` keeps (``num_heads``, a
    ``bias_shape`` tuple with the heads first or last) follow the new count."""
    own = _own_children(attn)
    for name, m in attn.named_modules():
        if not name or name.split(".")[0] in own:
            continue
        if getattr(m, "num_heads", None) == old:
            m.num_heads = new
        shape = getattr(m, "bias_shape", None)
        if isinstance(shape, tuple) and shape:
            if shape[-1] == old:
                m.bias_shape = (*shape[:-1], new)
            elif shape[0] == old:
                m.bias_shape = (new, *shape[1:])


def clear_caches(model: nn.Module) -> None:
    """Empty the per-head tensor caches of ``model``'s attention modules."""
    for m in model.modules():
        for attr in CACHES:
            if isinstance(getattr(m, attr, None), dict):
                setattr(m, attr, {})


def _masked(model: nn.Module, attn_name: str, head: int) -> nn.Module:
    """A copy of ``model`` whose attention ``attn_name`` ignores ``head``'s output."""
    masked = copy.deepcopy(model)
    attn = dict(masked.named_modules())[attn_name]
    d = _width(attn.proj, "in") // attn.num_heads
    with torch.no_grad():
        attn.proj.weight[:, head * d : (head + 1) * d] = 0
        for name, sides in HEAD_LINEARS.items():  # talking heads: the head feeds no other
            child = getattr(attn, name, None)
            if isinstance(child, nn.Linear) and "cols" in sides:
                child.weight[:, head] = 0
    return masked


def head_layout(model: nn.Module, attn_name: str, example: torch.Tensor) -> tuple[str, str]:
    """``(layout, '')`` under which removing a head of ``attn_name`` equals masking it, or
    ``('', why)`` when none does (checked on copies: ``model`` is not changed)."""
    clear_caches(model)  # a cache filled while tracing holds tensors deepcopy refuses
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(example.shape, generator=gen).to(example.device, example.dtype)
    with torch.inference_mode():
        want = _masked(model, attn_name, 0).eval()(x)
    attn = dict(model.named_modules())[attn_name]
    if attn.num_heads < 2:
        return "", "it has a single head (a module keeps at least one)"
    fused = any(PROJECTIONS[n] > 1 for n in PROJECTIONS if hasattr(attn, n))
    why = ""
    for layout in LAYOUTS if fused else LAYOUTS[:1]:
        trial = copy.deepcopy(model).eval()
        try:
            remove_heads(dict(trial.named_modules())[attn_name], [0], layout)
            with torch.inference_mode():
                got = trial(x)
        except (RuntimeError, ValueError, IndexError) as err:
            why = f"its forward fails with a head fewer ({first_line(err, 100)})"
            continue
        if got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            return layout, ""
        why = (
            "removing a head does not equal masking its output (it keeps per-head state"
            " memprune does not know)"
        )
    return "", why


def head_weights(
    attn: nn.Module, head: int, layout: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (weight, its gradient or None) slices of one head: its projection rows (and bias),
    its ``proj`` columns; what the magnitude, Taylor and Hessian criteria score a head by."""
    heads = attn.num_heads
    out = []
    for name, sections in PROJECTIONS.items():
        layer = getattr(attn, name, None)
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            rows = _rows(_width(layer, "out"), sections, heads, layout, [head])
            for p in (layer.weight, layer.bias):
                if p is not None:
                    out.append((p[rows], None if p.grad is None else p.grad[rows]))
    d = _width(attn.proj, "in") // heads
    w = attn.proj.weight
    cols = slice(head * d, (head + 1) * d)
    out.append((w[:, cols], None if w.grad is None else w.grad[:, cols]))
    return out
