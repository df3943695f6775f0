"""Run directories, tables and plots."""

from memprune.report._rundir import prepare_out_dir
from memprune.report.plots import (
    plot_cka,
    plot_confusion,
    plot_consistency,
    plot_finetune,
    plot_layer_mem,
    plot_learnedness,
    plot_prune_tradeoff,
    plot_unit_scores,
)

__all__ = [
    "plot_cka",
    "plot_confusion",
    "plot_consistency",
    "plot_finetune",
    "plot_layer_mem",
    "plot_learnedness",
    "plot_prune_tradeoff",
    "plot_unit_scores",
    "prepare_out_dir",
]
