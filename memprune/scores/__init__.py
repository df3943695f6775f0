"""Memorization scores."""

from memprune.scores.sslmem import LayerMemResult, SSLMemResult, layer_mem, ssl_mem
from memprune.scores.unitmem import UnitMemResult, class_mem, unit_mem

__all__ = [
    "LayerMemResult",
    "SSLMemResult",
    "UnitMemResult",
    "class_mem",
    "layer_mem",
    "ssl_mem",
    "unit_mem",
]
