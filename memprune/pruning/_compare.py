"""Every pruning strategy and ratio side by side, each pruned encoder evaluated."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch import nn

from memprune.pruning._prune import check_options, prune
from memprune.pruning._save import save_pruned


def compare_pruning(
    encoder: nn.Module,
    scores,
    evaluate: Callable[[nn.Module], float],
    ratios,
    strategies,
    models_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    log=print,
    **options,
) -> tuple[list[dict], list[dict]]:
    """Prune ``encoder`` by each strategy at each ratio (``options``: arguments of
    :func:`prune`), save each pruned encoder under ``models_dir/STRATEGY_RATIO`` and score it
    with ``evaluate(model) -> accuracy`` (e.g. a linear probe retrained on its features).

    Returns table rows (the unpruned encoder first, as strategy ``none``) and one full record
    per run (the :class:`PruneResult` with its accuracy).
    """
    keys = ("scope", "max_layer_ratio", "iterative_steps", "rescore", "gradients")
    for strategy in strategies:  # the whole sweep is validated before any work
        for ratio in ratios:
            check_options(ratio, strategy, scores=scores, **{k: options[k] for k in keys
                                                             if k in options})  # fmt: skip
    rows, runs = [], []
    baseline = None  # the unpruned latency, measured once: every row's ratio shares it
    for strategy in strategies:
        for ratio in ratios:
            pruned, report = prune(encoder, scores, ratio, strategy, **options,
                                   baseline_latency_s=baseline)  # fmt: skip
            if report.latency_s is not None:
                baseline = report.latency_s[0]
            name = f"{strategy}_{ratio:g}"
            if models_dir is not None:
                save_pruned(pruned, Path(models_dir) / name, overwrite=overwrite)
            accuracy = evaluate(pruned)
            if not rows:  # the unpruned encoder, measured once
                base = evaluate(encoder)
                row = {"strategy": "none", "ratio": 0.0, "params": report.params[0],
                       "params_ratio": 1.0, "macs": round(report.macs[0])}  # fmt: skip
                row["macs_ratio"] = 1.0
                if report.latency_s is not None:
                    row.update(latency_ms=1e3 * report.latency_s[0], latency_ratio=1.0)
                rows.append({**row, "accuracy": base})
            rows.append({**report.row(), "accuracy": accuracy})
            runs.append({"model_dir": f"models/{name}", "accuracy": accuracy, **report.to_dict()})
            log(f"{name}: accuracy {accuracy:.4f}, params {report.params[1]}")
    return rows, runs
