"""Memorization scores and layer similarity (CKA): streaming metrics and one-call functions.

* metrics (``update`` / ``merge`` / ``compute`` / ``reset`` / ``sync``): :class:`UnitMem`,
  :class:`ClassMem`, :class:`LayerMem`, :class:`CKA`;
* functions over an encoder and a data set: :func:`unit_mem`, :func:`class_mem`,
  :func:`ssl_mem`, :func:`ssl_mem_against` (many f, one g), :func:`layer_mem`,
  :func:`member_gap` (one encoder, no reference),
  :func:`canary_audit` / :func:`canary_units` (canaries included at random: a known answer),
  :func:`cka`, :func:`cka_from_features`, :func:`learnedness`;
* results (``kind``, ``meta``, ``to_rows``, ``save`` / ``load``).
"""

from memprune.scores.canaries import (
    CanaryAuditResult,
    canary_audit,
    canary_unit_map,
    canary_units,
)
from memprune.scores.cka import CKA, CKAResult, cka, cka_from_features
from memprune.scores.learnedness import LearnednessResult, learnedness
from memprune.scores.membership import (
    AlignmentLoss,
    MemberGapResult,
    member_gap,
    ssl_mem_against,
)
from memprune.scores.sslmem import (
    PAIRS,
    LayerMem,
    LayerMemResult,
    PairedViews,
    SSLMemResult,
    layer_mem,
    ssl_mem,
)
from memprune.scores.unitmem import (
    ClassMem,
    ClassMemResult,
    UnitMem,
    UnitMemResult,
    class_mem,
    unit_mem,
)

__all__ = [
    "CKA",
    "PAIRS",
    "AlignmentLoss",
    "CKAResult",
    "CanaryAuditResult",
    "ClassMem",
    "ClassMemResult",
    "LayerMem",
    "LayerMemResult",
    "LearnednessResult",
    "MemberGapResult",
    "PairedViews",
    "SSLMemResult",
    "UnitMem",
    "UnitMemResult",
    "canary_audit",
    "canary_unit_map",
    "canary_units",
    "cka",
    "cka_from_features",
    "class_mem",
    "layer_mem",
    "learnedness",
    "member_gap",
    "ssl_mem",
    "ssl_mem_against",
    "unit_mem",
]
