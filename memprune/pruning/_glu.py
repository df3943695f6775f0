"""Units of a gated MLP (timm's ``GluMlp``, EVA-02's SwiGLU with a fused ``fc1``).

``fc1`` makes both halves of the hidden layer and the forward computes ``act(x1) * x2`` (or
``x1 * act(x2)``) before ``norm`` and ``fc2``: unit ``j`` is ``fc1``'s rows ``j`` and
``j + n/2`` and ``fc2``'s column ``j``. torch-pruning's graph maps ``fc1``'s rows through the
chunk onto ``fc2`` with the gate's indices out of range, so these units are removed here,
inside the module, with torch-pruning's layer pruners.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from memprune.pruning._heads import prune_cols, prune_rows


def is_glu(module: nn.Module | None) -> bool:
    return module is not None and hasattr(module, "chunk_dim") and hasattr(module, "fc2")


def glu_rows(width: int, units: list[int]) -> list[int]:
    return sorted([*units, *(u + width for u in units)])


def remove_glu_units(mlp: nn.Module, units: list[int]) -> None:
    """Remove hidden units ``units`` of the gated MLP ``mlp``."""
    width = mlp.fc2.weight.shape[1]
    prune_rows(mlp.fc1, glu_rows(width, units))
    prune_cols(mlp.fc2, sorted(units))
    norm = getattr(mlp, "norm", None)
    if isinstance(norm, nn.LayerNorm):
        tp.prune_layernorm_out_channels(norm, sorted(units))


def glu_weights(mlp: nn.Module, unit: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The (weight, gradient or None) slices of one unit: its two ``fc1`` rows (and biases)
    and its ``fc2`` column."""
    width = mlp.fc2.weight.shape[1]
    rows = [unit, unit + width]
    out = []
    for p in (mlp.fc1.weight, mlp.fc1.bias):
        if p is not None:
            out.append((p[rows], None if p.grad is None else p.grad[rows]))
    w = mlp.fc2.weight
    out.append((w[:, unit], None if w.grad is None else w.grad[:, unit]))
    return out
