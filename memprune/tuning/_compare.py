"""Fine-tuning rules side by side at the same k, epochs and learning rate."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping

from torch import nn
from torch.utils.data import Dataset

from memprune.errors import ConfigError
from memprune.sites import OUTPUT
from memprune.tuning._finetune import finetune
from memprune.tuning._select import (
    LAYER_STRATEGIES,
    check_same_encoder,
    ranking_values,
    select_layers,
)


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


def _rankings(rankings, by: str | None) -> dict[str, object]:
    """``{by: result}`` from one ranking result (ranked ``by``) or a mapping; every result must
    rank the same layers."""
    if not isinstance(rankings, Mapping):
        rankings = {ranking_values(rankings, by)[0]: rankings}
    elif by is not None:
        raise ConfigError("pass by= only with a single ranking; a mapping names its rankings")
    if not rankings:
        raise ConfigError("compare_finetuning needs at least one layer ranking")
    layers = {}
    for name, result in rankings.items():
        ranking_values(result, name)  # the result offers this ranking
        layers[name] = [n for n in result.layers if n != OUTPUT]
    first = next(iter(layers.values()))
    odd = [n for n, ls in layers.items() if ls != first]
    if odd:
        raise ConfigError(
            f"rankings {odd} rank other layers than {next(iter(layers))!r}: compute every"
            " ranking on the same encoder"
        )
    return dict(rankings)


class FinetuneRuns:
    """Fine-tuning runs of one encoder on one task at one budget, each run once: calling it
    with ``(layers, seed)`` fine-tunes (``finetune(encoder, layers, train, None, test, seed=seed,
    **budget)``) or returns the record of the same run made before. Rules that pick the same
    layers with the same seed share a run, whose result is the same on one device."""

    def __init__(self, encoder: nn.Module, train: Dataset, test: Dataset, **budget) -> None:
        self.encoder, self.train, self.test, self.budget = encoder, train, test, budget
        self.records: dict[tuple[tuple[str, ...], int], dict] = {}

    def __call__(self, layers, seed: int) -> dict:
        key = (tuple(layers), int(seed))
        if key not in self.records:
            r = finetune(self.encoder, list(layers), self.train, None, self.test, seed=seed,
                         **self.budget)  # fmt: skip
            self.records[key] = {"layers": list(layers), "seed": int(seed),
                                 "accuracy": r.accuracy, "best_epoch": r.best_epoch,
                                 "val_accuracy": r.val_accuracy,
                                 "train_loss": r.train_loss}  # fmt: skip
        return self.records[key]

    def __len__(self) -> int:
        return len(self.records)


def compare_finetuning(
    encoder: nn.Module,
    rankings,
    train: Dataset,
    test: Dataset,
    ks,
    strategies,
    seeds=(0, 1, 2),
    by: str | None = None,
    baseline: Callable[[nn.Module, int], float] | None = None,
    log=print,
    runs: FinetuneRuns | None = None,
    **budget,
) -> tuple[list[dict], list[dict]]:
    """Fine-tune ``encoder`` with the layers each rule picks for each k, once per seed, all
    with the same ``budget`` (arguments of :func:`finetune`: epochs, lr, batch_size, augment,
    ...).

    ``rankings``: one layer ranking (ranked ``by``, default its first) or a mapping from a
    ranking name to the result providing it, e.g. ``{"delta": layer_mem(...), "gap":
    member_gap(...), "unitmem": unitmem_profile(...), "rgn": auto_rgn(...)}``. Strategy
    ``top`` runs once per ranking (rows ``top delta``, ``top gap``, ...); ``last``,
    ``first``, ``random`` need no ranking and run once; ``all`` runs once per seed with every
    layer. ``baseline(encoder, seed)``, when given, is the frozen encoder's accuracy without
    fine-tuning (e.g. a linear probe on the same data): the first row, ``linear probe``.

    ``runs``: a :class:`FinetuneRuns` of this encoder, task and budget to share runs with
    (``budget`` is then its own).

    Returns table rows (mean, standard deviation and per-seed test accuracy) and one record
    per run (layers, accuracy, best epoch, curves).
    """
    if runs is None:
        runs = FinetuneRuns(encoder, train, test, **budget)
    elif budget or runs.encoder is not encoder:
        raise ConfigError("pass the budget to FinetuneRuns, and runs of this encoder")
    for strategy in strategies:  # every name is checked before any training
        LAYER_STRATEGIES.check(strategy)
    rankings = _rankings(rankings, by)
    for result in rankings.values():
        check_same_encoder(result, encoder)
    rows, records = [], []
    if baseline is not None:
        rows.append(_row("linear probe", 0, [baseline(encoder, s) for s in seeds], []))
    first = next(iter(rankings))
    n_layers = sum(1 for name in rankings[first].layers if name != OUTPUT)
    rules = [(f"top {b}" if s == "top" else s, s, b)
             for s in strategies for b in (rankings if s == "top" else [first])]  # fmt: skip
    for rule, strategy, by_name in rules:
        for k in [n_layers] if strategy == "all" else ks:
            accs, layers = [], []
            for seed in seeds:
                sel = select_layers(rankings[by_name], k, by=by_name, strategy=strategy,
                                    seed=seed)  # fmt: skip
                r = runs(sel.layers, seed)
                accs.append(r["accuracy"])
                layers = layers or sel.layers
                records.append({"strategy": rule, "k": k, **r})
            rows.append(_row(rule, k, accs, ["(per seed)"] if strategy == "random" else layers))
            log(f"{rule} k={k}: {rows[-1]['mean']:.4f} ± {rows[-1]['std']:.4f}")
    return rows, records
