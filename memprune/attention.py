"""Forwards for timm attention modules that have lost heads.

timm's BEiT, EVA, CaiT, ConViT and XCiT attention take the width of a head from the width of
their *input* (``C // num_heads``, ``reshape(B, N, C)``), which holds only while every head is
there. A module that lost heads runs the forward below instead: the same computation, with
the width taken from the heads that remain. The swap is a subclass that changes ``forward``
and nothing else; it is made when heads are removed and again when a pruned encoder is loaded
(a module runs it when its attention width differs from its input width).
``tests/test_prune.py`` checks that on a module with all its heads both forwards agree to
float precision.

The attention product is ``torch.nn.functional.scaled_dot_product_attention`` in both (timm
also computes it by hand when ``fused_attn`` is off; the two agree to float precision).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _qkv(self, x: torch.Tensor) -> torch.Tensor:
    """The fused projection, with BEiT / EVA's separate query and value biases."""
    if self.q_bias is None:
        return self.qkv(x)
    bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
    if getattr(self, "qkv_bias_separate", False):
        return self.qkv(x) + bias
    return F.linear(x, self.qkv.weight, bias)


def _attend(self, q, k, v, mask=None, is_causal: bool = False) -> torch.Tensor:
    drop = self.attn_drop.p if self.training else 0.0
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop,
                                          is_causal=is_causal, scale=self.scale)  # fmt: skip


def _beit_forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None):
    B, N, _ = x.shape
    q, k, v = _qkv(self, x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = self._get_rel_pos_bias() if self.relative_position_bias_table is not None else None
    if shared_rel_pos_bias is not None:
        bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
    x = _attend(self, q, k, v, bias).transpose(1, 2).reshape(B, N, -1)
    return self.proj_drop(self.proj(x))


def _eva_forward(self, x, rope=None, attn_mask=None, is_causal: bool = False):
    from timm.layers import apply_rot_embed_cat

    B, N, _ = x.shape
    gate = self.gate(x).sigmoid() if self.gate is not None else None
    if self.qkv is not None:
        qkv = _qkv(self, x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
    else:
        q, k, v = (p(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # fmt: skip
    q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
        npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
        q, k = (torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], rope, half=half)],
                          dim=2).type_as(v) for t in (q, k))  # fmt: skip
    x = self.norm(_attend(self, q, k, v, attn_mask, is_causal).transpose(1, 2).reshape(B, N, -1))
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


def _class_attn_forward(self, x: torch.Tensor) -> torch.Tensor:
    """CaiT's and XCiT's class attention: the class token's query over every token."""
    B, N, _ = x.shape
    q = self.q(x[:, :1]).reshape(B, 1, self.num_heads, -1).transpose(1, 2)
    k, v = (p(x).reshape(B, N, self.num_heads, -1).transpose(1, 2) for p in (self.k, self.v))
    x = _attend(self, q, k, v).transpose(1, 2).reshape(B, 1, -1)
    return self.proj_drop(self.proj(x))


def _split_heads(self, x: torch.Tensor, sections: int, layer: nn.Module) -> tuple:
    B, N, _ = x.shape
    return layer(x).reshape(B, N, sections, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, d] -> proj([B, N, heads * d])."""
    B, _, N, _ = x.shape
    return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))


def _talking_heads_forward(self, x: torch.Tensor) -> torch.Tensor:
    """CaiT's talking-heads attention: heads mixed before and after the softmax."""
    q, k, v = _split_heads(self, x, 3, self.qkv)
    attn = self.proj_l(((q * self.scale) @ k.transpose(-2, -1)).permute(0, 2, 3, 1))
    attn = self.proj_w(attn.permute(0, 3, 1, 2).softmax(dim=-1).permute(0, 2, 3, 1))
    return _merge_heads(self, self.attn_drop(attn.permute(0, 3, 1, 2)) @ v)


def _mhsa_forward(self, x: torch.Tensor) -> torch.Tensor:
    """ConViT's plain multi-head attention."""
    q, k, v = _split_heads(self, x, 3, self.qkv)
    attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
    return _merge_heads(self, attn @ v)


def _gpsa_forward(self, x: torch.Tensor) -> torch.Tensor:
    """ConViT's gated positional attention: per head, a learned gate between the patch
    attention and a positional one (``pos_proj`` of the relative offsets)."""
    B, N, _ = x.shape
    if self.rel_indices is None or self.rel_indices.shape[1] != N:
        self.rel_indices = self.get_rel_indices(N)
    q, k = _split_heads(self, x, 2, self.qk)
    patch = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    pos = self.pos_proj(self.rel_indices.expand(B, -1, -1, -1)).permute(0, 3, 1, 2).softmax(-1)
    gate = torch.sigmoid(self.gating_param.view(1, -1, 1, 1))
    attn = (1.0 - gate) * patch + gate * pos
    attn = self.attn_drop(attn / attn.sum(dim=-1, keepdim=True))
    v = self.v(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
    return _merge_heads(self, attn @ v)


def _xca_forward(self, x: torch.Tensor) -> torch.Tensor:
    """XCiT's cross-covariance attention: over channels, within each head."""
    B, N, _ = x.shape
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 4, 1).unbind(0)
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1))
    return self.proj_drop(self.proj((attn @ v).permute(0, 3, 1, 2).reshape(B, N, -1)))


#: (timm module, class name) -> the forward of that attention with fewer heads, and its
#: children that hold one slice per attention channel (pruned with the heads).
FORWARDS = {
    ("timm.models.beit", "Attention"): (_beit_forward, ()),
    ("timm.models.eva", "EvaAttention"): (_eva_forward, ("norm", "gate")),
    ("timm.models.cait", "ClassAttn"): (_class_attn_forward, ()),
    ("timm.models.cait", "TalkingHeadAttn"): (_talking_heads_forward, ()),
    ("timm.models.convit", "MHSA"): (_mhsa_forward, ()),
    ("timm.models.convit", "GPSA"): (_gpsa_forward, ()),
    ("timm.models.xcit", "XCA"): (_xca_forward, ()),
}
_SUBCLASSES: dict[type, type] = {}


def _key(cls: type) -> tuple[str, str]:
    return cls.__module__, cls.__name__


def base_class(module: nn.Module) -> type:
    cls = type(module)
    return cls.__bases__[0] if cls in _SUBCLASSES.values() else cls


def channel_children(attn: nn.Module) -> tuple[str, ...]:
    """Children of ``attn`` with one slice per attention channel (EVA's ``norm``, ``gate``)."""
    return FORWARDS.get(_key(base_class(attn)), (None, ()))[1]


def has_pruned_forward(attn: nn.Module) -> bool:
    return _key(base_class(attn)) in FORWARDS


def use_pruned_forward(attn: nn.Module) -> None:
    """Give ``attn`` the forward that works with fewer heads (no-op for other classes)."""
    base = base_class(attn)
    if _key(base) not in FORWARDS:
        return
    if base not in _SUBCLASSES:
        fn = FORWARDS[_key(base)][0]
        doc = f"timm's {base.__name__} that has lost heads (memprune.attention)."
        body = {"forward": fn, "__doc__": doc, "__module__": __name__}
        _SUBCLASSES[base] = type(f"Pruned{base.__name__}", (base,), body)
    attn.__class__ = _SUBCLASSES[base]


def fit_forwards(model: nn.Module) -> None:
    """After pruning, or loading a pruned encoder: the attention modules whose width no longer
    matches their input (heads removed, or the residual stream narrowed) get the forward that
    allows it, and a non-persistent key bias (zeros, not in the state dict) the width of the
    query bias."""
    for m in model.modules():
        if not has_pruned_forward(m):
            continue
        if m.proj.weight.shape[1] != m.proj.weight.shape[0]:
            use_pruned_forward(m)
        q_bias, k_bias = getattr(m, "q_bias", None), getattr(m, "k_bias", None)
        if q_bias is not None and k_bias is not None and k_bias.shape != q_bias.shape:
            m._buffers["k_bias"] = torch.zeros_like(q_bias.detach())
