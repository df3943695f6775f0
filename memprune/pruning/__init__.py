"""Structured pruning of units ranked by UnitMem (docs/method.md §9).

* :func:`prune`: remove units for real (torch-pruning's dependency graph), by ``lowest`` /
  ``highest`` UnitMem, ``random``, or torch-pruning's ``magnitude`` / ``lamp`` / ``bnscale`` /
  ``taylor`` criteria (gradients from :func:`ssl_gradient_fn` / :func:`head_gradient_fn`), per
  layer or globally, with a report of
  parameters, MACs and latency before and after.
* :class:`UnitMemImportance`: UnitMem as a torch-pruning ``Importance`` for your own loop.
* :func:`recover`: a short distillation (or supervised / SimCLR) training of a pruned encoder.
* :func:`save_pruned` / :func:`load_pruned`: safetensors weights + a structure spec.
* :func:`ablate`: units switched off (zeroed where they are made) in a copy, shapes unchanged;
  :func:`canary_ablation`: the causal test of UnitMem's localization on canaries.
"""

from memprune.pruning._ablate import ablate, canary_ablation
from memprune.pruning._compare import COSTS, compare_pruning, mark_pareto, prune_verdicts
from memprune.pruning._export import export_encoder, exported_module
from memprune.pruning._forgetting import (
    by_setting,
    forgetting_rows,
    pie_rows,
    privacy_rows,
    privacy_verdicts,
    typicality,
)
from memprune.pruning._gradients import head_gradient_fn, ssl_gradient_fn
from memprune.pruning._importance import SCORE_SIGNS, UnitMemImportance, channel_scores
from memprune.pruning._prune import (
    DEFAULT_STRATEGIES,
    PRUNING_STRATEGIES,
    SCOPES,
    PruneResult,
    Strategy,
    check_options,
    measure_latency,
    prune,
)
from memprune.pruning._recover import DISTILL_LOSSES, RECOVERY, recover, recovery_fn
from memprune.pruning._save import load_pruned, save_pruned

__all__ = [
    "COSTS",
    "DEFAULT_STRATEGIES",
    "DISTILL_LOSSES",
    "PRUNING_STRATEGIES",
    "RECOVERY",
    "SCOPES",
    "SCORE_SIGNS",
    "PruneResult",
    "Strategy",
    "UnitMemImportance",
    "ablate",
    "by_setting",
    "canary_ablation",
    "channel_scores",
    "check_options",
    "compare_pruning",
    "export_encoder",
    "exported_module",
    "forgetting_rows",
    "head_gradient_fn",
    "load_pruned",
    "mark_pareto",
    "measure_latency",
    "pie_rows",
    "privacy_rows",
    "privacy_verdicts",
    "prune",
    "prune_verdicts",
    "recover",
    "recovery_fn",
    "save_pruned",
    "ssl_gradient_fn",
    "typicality",
]
