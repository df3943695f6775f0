"""Run directories, tables and plots."""

from memprune.report._rundir import (
    OutputDir,
    check_output,
    check_writable,
    open_output,
    read_marker,
)
from memprune.report.plots import (
    plot_canaries,
    plot_cka,
    plot_confusion,
    plot_consistency,
    plot_finetune,
    plot_layer_mem,
    plot_learnedness,
    plot_member_gap,
    plot_prune_tradeoff,
    plot_regret,
    plot_unit_scores,
)

__all__ = [
    "OutputDir",
    "check_output",
    "check_writable",
    "open_output",
    "plot_canaries",
    "plot_cka",
    "plot_confusion",
    "plot_consistency",
    "plot_finetune",
    "plot_layer_mem",
    "plot_learnedness",
    "plot_member_gap",
    "plot_prune_tradeoff",
    "plot_regret",
    "plot_unit_scores",
    "read_marker",
]
