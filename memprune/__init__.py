"""memprune: localize memorization in vision encoders and act on it.

The root exports the workflow; lower-level pieces live in their subpackages
(:mod:`memprune.hooks` ``capture``, :mod:`memprune.scores` ``cka_from_features``,
:mod:`memprune.data` ``MultiView``, :mod:`memprune.pruning` ``UnitMemImportance``, ...).

* load: :func:`load_dataset`, :func:`make_splits`, :func:`make_canaries`,
  :func:`load_encoder`, :func:`find_sites`, :func:`eval_transform`
* score: :func:`unit_mem`, :func:`class_mem`, :func:`ssl_mem`, :func:`layer_mem`, :func:`cka`,
  :func:`learnedness`, :func:`member_gap` (one encoder, no reference), :func:`canary_audit`
  and :func:`canary_units` (canaries included at random: a known answer); streaming:
  :class:`UnitMem`, :class:`ClassMem`, :class:`LayerMem`, :class:`CKA`
* make encoders: :func:`pretrain_simclr`, :func:`pretrain_pair`, :func:`train_supervised`
* act: :func:`prune`, :func:`ablate`, :func:`recover`, :func:`save_pruned`, :func:`load_pruned`,
  :func:`select_layers` (by LayerMem, the member gap, :func:`unitmem_profile` or
  :func:`auto_rgn`), :func:`finetune`, :func:`finetune_units`
* evaluate: :func:`linear_probe`, :func:`knn_probe`, :class:`LinearProbe`
* run: :func:`load_recipe`, :func:`run_recipe`
* results (``kind``, ``meta``, ``to_rows()``, ``save`` / ``load``; :func:`load_result` reads
  any) and errors (:class:`MemPruneError` and its subclasses)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# The root is lazy (PEP 562): ``import memprune`` and ``memprune --help`` stay fast, and torch,
# timm and torch-pruning are imported on first use of a name that needs them.
_EXPORTS = {
    "CKA": "memprune.scores",
    "CKAResult": "memprune.scores",
    "CanaryAuditResult": "memprune.scores",
    "CheckpointError": "memprune.errors",
    "CheckpointWarning": "memprune.errors",
    "ClassMem": "memprune.scores",
    "ClassMemResult": "memprune.scores",
    "ConfigError": "memprune.errors",
    "DataError": "memprune.errors",
    "DatasetNotFoundError": "memprune.errors",
    "EncoderError": "memprune.errors",
    "FinetuneResult": "memprune.tuning",
    "LayerMem": "memprune.scores",
    "LayerMemResult": "memprune.scores",
    "LayerSelection": "memprune.tuning",
    "LayerValues": "memprune.tuning",
    "LearnednessResult": "memprune.scores",
    "LinearProbe": "memprune.probe",
    "MemPruneError": "memprune.errors",
    "MemberGapResult": "memprune.scores",
    "ProbeResult": "memprune.probe",
    "PruneResult": "memprune.pruning",
    "RecipeError": "memprune.recipes",
    "SSLMemResult": "memprune.scores",
    "SiteError": "memprune.errors",
    "Splits": "memprune.data",
    "TrainResult": "memprune.train",
    "UnitMem": "memprune.scores",
    "UnitMemResult": "memprune.scores",
    "ablate": "memprune.pruning",
    "auto_rgn": "memprune.tuning",
    "canary_audit": "memprune.scores",
    "canary_units": "memprune.scores",
    "cka": "memprune.scores",
    "class_mem": "memprune.scores",
    "find_sites": "memprune.sites",
    "eval_transform": "memprune.encoders",
    "finetune": "memprune.tuning",
    "finetune_units": "memprune.tuning",
    "knn_probe": "memprune.probe",
    "layer_mem": "memprune.scores",
    "learnedness": "memprune.scores",
    "linear_probe": "memprune.probe",
    "load_dataset": "memprune.data",
    "load_encoder": "memprune.encoders",
    "load_pruned": "memprune.pruning",
    "load_recipe": "memprune.recipes",
    "make_canaries": "memprune.data",
    "load_result": "memprune.results",
    "make_splits": "memprune.data",
    "member_gap": "memprune.scores",
    "pretrain_pair": "memprune.train",
    "pretrain_simclr": "memprune.train",
    "prune": "memprune.pruning",
    "recover": "memprune.pruning",
    "run_recipe": "memprune.recipes",
    "save_pruned": "memprune.pruning",
    "select_layers": "memprune.tuning",
    "ssl_mem": "memprune.scores",
    "train_supervised": "memprune.train",
    "unit_mem": "memprune.scores",
    "unitmem_profile": "memprune.tuning",
}

if TYPE_CHECKING:  # pragma: no cover
    from memprune.data import Splits, load_dataset, make_canaries, make_splits
    from memprune.encoders import eval_transform, load_encoder
    from memprune.errors import (
        CheckpointError,
        CheckpointWarning,
        ConfigError,
        DataError,
        DatasetNotFoundError,
        EncoderError,
        MemPruneError,
        SiteError,
    )
    from memprune.probe import LinearProbe, ProbeResult, knn_probe, linear_probe
    from memprune.pruning import PruneResult, ablate, load_pruned, prune, recover, save_pruned
    from memprune.recipes import RecipeError, load_recipe, run_recipe
    from memprune.results import load_any as load_result
    from memprune.scores import (
        CKA,
        CanaryAuditResult,
        CKAResult,
        ClassMem,
        ClassMemResult,
        LayerMem,
        LayerMemResult,
        LearnednessResult,
        MemberGapResult,
        SSLMemResult,
        UnitMem,
        UnitMemResult,
        canary_audit,
        canary_units,
        cka,
        class_mem,
        layer_mem,
        learnedness,
        member_gap,
        ssl_mem,
        unit_mem,
    )
    from memprune.sites import find_sites
    from memprune.train import TrainResult, pretrain_pair, pretrain_simclr, train_supervised
    from memprune.tuning import (
        FinetuneResult,
        LayerSelection,
        LayerValues,
        auto_rgn,
        finetune,
        finetune_units,
        select_layers,
        unitmem_profile,
    )


#: Subpackages and modules loaded on first attribute access (``memprune.data.MultiView`` after
#: a plain ``import memprune``), as SciPy's are.
SUBMODULES = (
    "checkpoints", "data", "encoders", "engine", "errors", "hooks", "probe", "pruning",
    "recipes", "registry", "report", "results", "scores", "sites", "stats", "train", "tuning",
)  # fmt: skip


def __getattr__(name: str):
    if name in SUBMODULES:
        return importlib.import_module(f"memprune.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'memprune' has no attribute {name!r}")
    attr = "load_any" if name == "load_result" else name
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, *SUBMODULES])


__version__ = "0.1.0"

#: The curated public API: the names of ``_EXPORTS``, which the ``TYPE_CHECKING`` imports
#: above also name, for type checkers (tests/test_registry.py keeps the three equal).
__all__ = [
    "CKA",
    "CKAResult",
    "CanaryAuditResult",
    "CheckpointError",
    "CheckpointWarning",
    "ClassMem",
    "ClassMemResult",
    "ConfigError",
    "DataError",
    "DatasetNotFoundError",
    "EncoderError",
    "FinetuneResult",
    "LayerMem",
    "LayerMemResult",
    "LayerSelection",
    "LayerValues",
    "LearnednessResult",
    "LinearProbe",
    "MemPruneError",
    "MemberGapResult",
    "ProbeResult",
    "PruneResult",
    "RecipeError",
    "SSLMemResult",
    "SiteError",
    "Splits",
    "TrainResult",
    "UnitMem",
    "UnitMemResult",
    "ablate",
    "auto_rgn",
    "canary_audit",
    "canary_units",
    "cka",
    "class_mem",
    "eval_transform",
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
    "load_recipe",
    "load_result",
    "make_canaries",
    "make_splits",
    "member_gap",
    "pretrain_pair",
    "pretrain_simclr",
    "prune",
    "recover",
    "run_recipe",
    "save_pruned",
    "select_layers",
    "ssl_mem",
    "train_supervised",
    "unit_mem",
    "unitmem_profile",
]
