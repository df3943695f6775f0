"""Selective fine-tuning of the layers (or units) that memorize most (docs/method.md §10).

* :func:`select_layers`: top-k by a layer ranking (ΔLayerMem / LayerMem with a reference
  encoder; member gap / AUC, UnitMem profile or Auto-RGN from one encoder), or the last-k,
  first-k, random-k and all-layers baselines, with the parameters each layer owns.
* :func:`unitmem_profile`, :func:`auto_rgn`: single-encoder layer rankings.
* :func:`finetune`: train the chosen layers plus a linear head, everything else frozen.
* :func:`finetune_units`: gradient masks, so only chosen units of a layer change.
* :func:`shift_regret`: the oracle (every block fine-tuned) and each rule's regret against it
  on one task; :func:`estimate_shift`: which family a task's shift is, from the features.
"""

from memprune.tuning._compare import FinetuneRuns, compare_finetuning
from memprune.tuning._finetune import FinetuneResult, accuracy, finetune, finetune_units
from memprune.tuning._oracle import (
    CHOICE_COST,
    estimate_shift,
    feature_shift,
    layer_blocks,
    oracle_finetuning,
    shift_regret,
    trainable_parameters,
)
from memprune.tuning._rankings import LayerValues, auto_rgn, unitmem_profile
from memprune.tuning._select import (
    BY,
    LAYER_STRATEGIES,
    LayerSelection,
    layer_modules,
    layer_parameters,
    ranking_values,
    select_layers,
)

__all__ = [
    "BY",
    "CHOICE_COST",
    "LAYER_STRATEGIES",
    "FinetuneResult",
    "FinetuneRuns",
    "LayerSelection",
    "LayerValues",
    "accuracy",
    "auto_rgn",
    "compare_finetuning",
    "estimate_shift",
    "feature_shift",
    "finetune",
    "finetune_units",
    "layer_blocks",
    "layer_modules",
    "layer_parameters",
    "oracle_finetuning",
    "ranking_values",
    "select_layers",
    "shift_regret",
    "trainable_parameters",
    "unitmem_profile",
]
