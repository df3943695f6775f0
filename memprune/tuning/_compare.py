"""Fine-tuning strategies side by side at the same k, epochs and learning rate."""

from __future__ import annotations

import statistics
from collections.abc import Callable

from torch import nn
from torch.utils.data import Dataset

from memprune.sites import OUTPUT
from memprune.tuning._finetune import finetune
from memprune.tuning._select import BY, STRATEGIES, select_layers


def _row(strategy: str, k: int, accs: list[float], layers: list[str]) -> dict:
    return {
        "strategy": strategy,
        "k": k,
        "layers": " ".join(layers),
        "mean": statistics.fmean(accs),
        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "seeds": len(accs),
        "accuracies": " ".join(f"{a:.4f}" for a in accs),
    }


def compare_finetuning(
    encoder: nn.Module,
    layer_scores,
    train: Dataset,
    test: Dataset,
    ks,
    strategies,
    seeds=(0, 1, 2),
    by: str = "delta",
    baseline: Callable[[nn.Module, int], float] | None = None,
    log=print,
    **budget,
) -> tuple[list[dict], list[dict]]:
    """Fine-tune ``encoder`` with the layers each strategy picks for each k, once per seed,
    all with the same ``budget`` (arguments of :func:`finetune`: epochs, lr, batch_size,
    augment, ...); ``all`` runs once per seed with every layer. ``baseline(encoder, seed)``,
    when given, is the frozen encoder's accuracy without fine-tuning (e.g. a linear probe on
    the same data): the first row, labelled ``linear probe``.

    Returns table rows (mean, standard deviation and per-seed test accuracy) and one record
    per run (layers, accuracy, best epoch, curves).
    """
    for strategy in strategies:  # every name is checked before any training
        STRATEGIES.check(strategy)
    BY.check(by)
    rows, runs = [], []
    if baseline is not None:
        rows.append(_row("linear probe", 0, [baseline(encoder, s) for s in seeds], []))
    n_layers = sum(1 for name in layer_scores.layers if name != OUTPUT)
    for strategy in strategies:
        for k in [n_layers] if strategy == "all" else ks:
            accs, layers = [], []
            for seed in seeds:
                sel = select_layers(layer_scores, k, by=by, strategy=strategy, seed=seed)
                r = finetune(encoder, sel, train, None, test, seed=seed, **budget)
                accs.append(r.accuracy)
                layers = layers or sel.layers
                runs.append({
                    "strategy": strategy, "k": k, "seed": seed, "layers": sel.layers,
                    "accuracy": r.accuracy, "best_epoch": r.best_epoch,
                    "val_accuracy": r.val_accuracy, "train_loss": r.train_loss,
                })  # fmt: skip
            rows.append(_row(strategy, k, accs, ["(per seed)"] if strategy == "random" else layers))
            log(f"{strategy} k={k}: {rows[-1]['mean']:.4f} ± {rows[-1]['std']:.4f}")
    return rows, runs
