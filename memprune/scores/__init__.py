"""Memorization scores and layer similarity (CKA)."""

from memprune.scores.cka import CKAResult, cka, cka_from_features
from memprune.scores.learnedness import LearnednessResult, learnedness
from memprune.scores.sslmem import LayerMemResult, SSLMemResult, layer_mem, ssl_mem
from memprune.scores.unitmem import UnitMemResult, class_mem, unit_mem

__all__ = [
    "CKAResult",
    "LayerMemResult",
    "LearnednessResult",
    "SSLMemResult",
    "UnitMemResult",
    "cka",
    "cka_from_features",
    "class_mem",
    "layer_mem",
    "learnedness",
    "ssl_mem",
    "unit_mem",
]
