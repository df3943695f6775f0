"""memprune: localize memorization in vision encoders and act on it.

Public API (everything else is private):

* data: :func:`load_dataset`, :class:`MultiView`, :func:`make_splits`, :class:`Splits`
* encoders: :func:`load_encoder`, :func:`normalization`, :func:`find_sites`, :class:`Site`,
  :func:`capture`
* scores: :func:`unit_mem`, :func:`class_mem`, :func:`ssl_mem`, :func:`layer_mem`,
  :func:`cka` / :func:`cka_from_features`, :func:`learnedness`
* probes: :func:`linear_probe`, :func:`knn_probe` (and :mod:`memprune.probe`)
* training: :mod:`memprune.train` (SimCLR pretraining, the pair f / g, supervised)
* pruning: :func:`prune`, :class:`PruneReport`, :class:`UnitMemImportance`,
  :func:`save_pruned`, :func:`load_pruned` (and :mod:`memprune.pruning`)
* fine-tuning: :func:`select_layers`, :func:`finetune`, :func:`finetune_units`
  (and :mod:`memprune.tuning`)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# The root is lazy (PEP 562): ``import memprune`` and ``memprune --help`` stay fast, and torch,
# timm and torch-pruning are imported on first use of a name that needs them.
_EXPORTS = {
    "CKAResult": "memprune.scores",
    "FinetuneResult": "memprune.tuning",
    "LayerMemResult": "memprune.scores",
    "LayerSelection": "memprune.tuning",
    "LearnednessResult": "memprune.scores",
    "MemPruneError": "memprune.errors",
    "MultiView": "memprune.data",
    "PruneReport": "memprune.pruning",
    "SSLMemResult": "memprune.scores",
    "Site": "memprune.sites",
    "Splits": "memprune.data",
    "UnitMemImportance": "memprune.pruning",
    "UnitMemResult": "memprune.scores",
    "capture": "memprune.hooks",
    "cka": "memprune.scores",
    "cka_from_features": "memprune.scores",
    "class_mem": "memprune.scores",
    "find_sites": "memprune.sites",
    "finetune": "memprune.tuning",
    "finetune_units": "memprune.tuning",
    "knn_probe": "memprune.probe",
    "layer_mem": "memprune.scores",
    "learnedness": "memprune.scores",
    "linear_probe": "memprune.probe",
    "load_dataset": "memprune.data",
    "load_encoder": "memprune.encoders",
    "load_pruned": "memprune.pruning",
    "make_splits": "memprune.data",
    "normalization": "memprune.encoders",
    "prune": "memprune.pruning",
    "save_pruned": "memprune.pruning",
    "select_layers": "memprune.tuning",
    "ssl_mem": "memprune.scores",
    "unit_mem": "memprune.scores",
}

if TYPE_CHECKING:  # pragma: no cover
    from memprune.data import MultiView, Splits, load_dataset, make_splits
    from memprune.encoders import load_encoder, normalization
    from memprune.errors import MemPruneError
    from memprune.hooks import capture
    from memprune.probe import knn_probe, linear_probe
    from memprune.pruning import PruneReport, UnitMemImportance, load_pruned, prune, save_pruned
    from memprune.scores import (
        CKAResult,
        LayerMemResult,
        LearnednessResult,
        SSLMemResult,
        UnitMemResult,
        cka,
        cka_from_features,
        class_mem,
        layer_mem,
        learnedness,
        ssl_mem,
        unit_mem,
    )
    from memprune.sites import Site, find_sites
    from memprune.tuning import (
        FinetuneResult,
        LayerSelection,
        finetune,
        finetune_units,
        select_layers,
    )


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'memprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__version__ = "0.1.0"

__all__ = [
    "CKAResult",
    "FinetuneResult",
    "LayerMemResult",
    "LayerSelection",
    "LearnednessResult",
    "MemPruneError",
    "MultiView",
    "PruneReport",
    "SSLMemResult",
    "Site",
    "Splits",
    "UnitMemImportance",
    "UnitMemResult",
    "capture",
    "cka",
    "cka_from_features",
    "class_mem",
    "find_sites",
    "finetune",
    "finetune_units",
    "knn_probe",
    "layer_mem",
    "learnedness",
    "linear_probe",
    "load_dataset",
    "load_encoder",
    "load_pruned",
    "make_splits",
    "normalization",
    "prune",
    "save_pruned",
    "select_layers",
    "ssl_mem",
    "unit_mem",
]
