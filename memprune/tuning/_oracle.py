"""The oracle layer choice for a task and the regret of every ranking (docs/method.md §10b).

For one encoder and one fine-tuning task (a shift of :mod:`memprune.data._shifts`), at one
budget:

* **the oracle** fine-tunes every single layer and every contiguous block of each k > 1 in
  ``ks``, over the same seeds; the oracle at k is the k-block with the best mean test
  accuracy, the best achievable choice of k contiguous layers, and "the oracle" is the best
  block of any k. It is chosen on the same seeds it is scored on, so it is the optimistic
  bound a layer ranking is measured against (its regret against a re-run of the same block
  would be slightly higher);
* **every rule** (``top`` by each ranking, ``last``, ``first``, ``random``; ``all``; the
  linear probe) is fine-tuned at each k on the same seeds (a rule that picks an oracle block
  reuses its runs: :class:`~memprune.tuning._compare.FinetuneRuns`);
* **its regret** is, seed by seed, the oracle's accuracy at the same k minus the rule's (the
  oracle of any k for ``all`` and the linear probe), with the mean and the standard error of
  those paired differences. A negative regret means the rule beat every block: ``all`` can.

Each row also gives the encoder parameters the rule trains and what choosing costs: the
fine-tuning runs the oracle needs (every block, every seed) against none for a ranking, and
what each ranking needs before the fine-tuning (:data:`CHOICE_COST`).
"""

from __future__ import annotations

import math
import statistics

import torch
from torch import nn
from torch.utils.data import Dataset

from memprune.sites import OUTPUT
from memprune.tuning._compare import FinetuneRuns, compare_finetuning
from memprune.tuning._select import layer_parameters

#: What a rule needs before fine-tuning, besides the encoder.
CHOICE_COST = {
    "delta": "a reference encoder (a second pretraining) and one LayerMem pass",
    "layermem": "a reference encoder (a second pretraining) and one LayerMem pass",
    "gap": "points f never saw and one member-gap pass",
    "auc": "points f never saw and one member-gap pass",
    "unitmem": "one UnitMem pass",
    "unitmem_frac": "one UnitMem pass",
    "rgn": "one gradient pass over the task's training data",
    "last": "nothing",
    "first": "nothing",
    "random": "nothing",
    "all": "nothing",
    "linear probe": "nothing",
}


def layer_blocks(layers: list[str], ks) -> dict[int, list[tuple[str, ...]]]:
    """k -> every contiguous block of k layers (forward order), for k = 1 and each k in ks."""
    sizes = sorted({1, *(int(k) for k in ks)})
    return {k: [tuple(layers[i : i + k]) for i in range(len(layers) - k + 1)]
            for k in sizes if k <= len(layers)}  # fmt: skip


def trainable_parameters(encoder: nn.Module, layers) -> int:
    """Number of encoder parameters the layers own (the head not counted)."""
    named = dict(encoder.named_parameters())
    return sum(named[n].numel() for n in layer_parameters(encoder, list(layers)))


def _paired(oracle: list[float], accs: list[float]) -> tuple[float, float | None]:
    diffs = [o - a for o, a in zip(oracle, accs)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return statistics.fmean(diffs), se


def oracle_finetuning(runs: FinetuneRuns, layers: list[str], ks, seeds, log=print) -> list[dict]:
    """One row per block (:func:`layer_blocks`): k, layers, mean and per-seed accuracy, and
    ``best`` (the oracle at its k)."""
    rows = []
    for k, blocks in layer_blocks(layers, ks).items():
        at_k = []
        for block in blocks:
            accs = [runs(block, s)["accuracy"] for s in seeds]
            at_k.append({"k": k, "layers": " ".join(block), "mean": statistics.fmean(accs),
                         "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                         "accuracies": accs, "best": False})  # fmt: skip
        best = max(at_k, key=lambda r: r["mean"])  # the first on a tie
        best["best"] = True
        log(f"oracle k={k}: {best['layers']} {best['mean']:.4f}")
        rows.extend(at_k)
    return rows


def shift_regret(
    encoder: nn.Module,
    rankings,
    train: Dataset,
    test: Dataset,
    ks=(1, 2),
    strategies=("top", "last", "first", "random", "all"),
    seeds=(0, 1, 2),
    baseline=None,
    log=print,
    **budget,
) -> tuple[list[dict], list[dict], list[dict]]:
    """The oracle and every rule on one task (module docstring).

    ``rankings``: ``{by: result}`` as for :func:`~memprune.compare_finetuning`; ``baseline(
    encoder, seed)``: the linear probe's accuracy (its row is left out without it); ``budget``:
    the arguments of :func:`~memprune.tuning.finetune` (epochs, lr, batch_size, augment).

    Returns ``(oracle rows, rule rows, run records)``. A rule row holds the rule, k, its mean
    accuracy, the regret's mean and standard error over the seeds, the parameters it trains
    (mean over seeds for ``random``), the fine-tuning runs choosing takes and what else it
    needs.
    """
    runs = FinetuneRuns(encoder, train, test, **budget)
    first = next(iter(rankings.values()))
    layers = [n for n in first.layers if n != OUTPUT]
    oracle = oracle_finetuning(runs, layers, ks, seeds, log)
    best_at = {r["k"]: r for r in oracle if r["best"]}
    overall = max(best_at.values(), key=lambda r: r["mean"])
    n_blocks = {k: sum(1 for r in oracle if r["k"] == k) for k in best_at}
    ks = [k for k in ks if k in best_at]
    _, records = compare_finetuning(encoder, rankings, train, test, ks, strategies, seeds,
                                    log=log, runs=runs)  # fmt: skip
    per_rule: dict[tuple[str, int], list[dict]] = {}
    for rec in records:
        per_rule.setdefault((rec["strategy"], rec["k"]), []).append(rec)
    if baseline is not None:
        per_rule[("linear probe", 0)] = [
            {"seed": s, "layers": [], "accuracy": baseline(encoder, s)} for s in seeds
        ]
    rows = []
    for k, block in sorted(best_at.items()):
        recs = [{"seed": s, "layers": block["layers"].split(), "accuracy": a}
                for s, a in zip(seeds, block["accuracies"])]  # fmt: skip
        rows.append(_rule_row(encoder, f"oracle k={k}", k, recs, block["accuracies"],
                              runs=n_blocks[k] * len(seeds),
                              cost="every block fine-tuned on every seed"))  # fmt: skip
    for (rule, k), recs in per_rule.items():
        recs = sorted(recs, key=lambda r: list(seeds).index(r["seed"]))
        target = overall if rule in ("all", "linear probe") else best_at[k]
        by = rule.split(" ", 1)[1] if rule.startswith("top ") else rule
        rows.append(_rule_row(encoder, rule, k, recs, target["accuracies"], runs=0,
                              cost=CHOICE_COST.get(by, "")))  # fmt: skip
    return oracle, rows, list(runs.records.values())


def _rule_row(encoder, rule, k, recs, oracle_accs, runs: int, cost: str) -> dict:
    accs = [r["accuracy"] for r in recs]
    regret, se = _paired(oracle_accs, accs)
    params = [trainable_parameters(encoder, r["layers"]) for r in recs]
    chosen = {" ".join(r["layers"]) for r in recs}
    return {
        "rule": rule, "k": k, "layers": chosen.pop() if len(chosen) == 1 else "(per seed)",
        "mean": statistics.fmean(accs), "regret": regret, "regret_se": se,
        "parameters": round(statistics.fmean(params)), "choice_runs": runs, "needs": cost,
        "seeds": len(accs),
    }  # fmt: skip


def _layer_features(encoder: nn.Module, data: Dataset, n_points: int, seed: int,
                    normalize="auto", device=None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Site name -> the features ``[n, D]`` (:func:`_grid_reducer`) of ``n_points`` of
    ``data`` drawn by ``seed``, at every layer site and the output."""
    from memprune.data import seeded_subset
    from memprune.encoders import feature_dim, input_size
    from memprune.engine import Normalizer, encoder_device, resolve_normalize
    from memprune.hooks import capture, layer_reducer
    from memprune.sites import find_sites, output_site

    dev = encoder_device(encoder, device)
    size = input_size(encoder)
    sites = find_sites(encoder, "layers", input_size=size)
    sites.append(output_site(feature_dim(encoder, size)))
    norm = Normalizer(resolve_normalize(encoder, normalize), dev)
    reduce = {s.name: _grid_reducer(s, layer_reducer(s, "pool")) for s in sites}
    feats: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    loader = torch.utils.data.DataLoader(seeded_subset(data, n_points, seed), batch_size=64)
    was = encoder.training
    encoder.eval()
    try:
        with torch.no_grad(), capture(encoder, sites, reduce=reduce) as acts:
            for x, *_ in loader:
                encoder(norm(x.to(dev)))
                for name in feats:
                    feats[name].append(acts[name].double().cpu())
    finally:
        encoder.train(was)
    return {name: torch.cat(v) for name, v in feats.items()}


def _grid_reducer(site, pool):
    """A CNN site's output averaged over a 4x4 grid of its feature map (``[B, C * 16]``: the
    coarse layout stays, which a subpopulation shift can change); any other output pooled."""
    import torch.nn.functional as F

    def reduce(x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4 and site.windows == 1 and site.channel_axis == 1:
            return F.adaptive_avg_pool2d(x.float(), 4).flatten(1)
        return pool(x)

    return reduce


def _distances(x: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """For pooled features ``x [N, D]`` and masks ``first [R, N]`` (1: the point is in the
    first sample), the squared distance of the two samples' means over their mean total
    (unbiased) variance ``[R]``, every split at once through sums."""
    n_a = first.sum(1, keepdim=True)
    n_b = len(x) - n_a
    s_a, q_a = first @ x, first @ (x * x)
    s_b, q_b = x.sum(0) - s_a, (x * x).sum(0) - q_a
    mean_a, mean_b = s_a / n_a, s_b / n_b
    var_a = ((q_a - n_a * mean_a**2) / (n_a - 1)).sum(1)
    var_b = ((q_b - n_b * mean_b**2) / (n_b - 1)).sum(1)
    spread = (0.5 * (var_a + var_b)).clamp_min(1e-12)
    return (mean_a - mean_b).pow(2).sum(1) / spread


def feature_shift(encoder: nn.Module, a: Dataset, b: Dataset, n_points: int = 256,
                  seed: int = 0, permutations: int = 200, **kw) -> dict:  # fmt: skip
    """How far the encoder's features of ``b`` moved from those of ``a``, per layer site.

    ``moved``: the squared distance of the two samples' mean features (a CNN's feature map
    averaged over a 4x4 grid, other outputs pooled) over their mean total variance; ``null``:
    its mean when the pooled points are dealt to the two samples at random (``permutations``
    times: what sampling alone gives); ``ratio`` = moved / null. ``p`` is the permutation
    p-value of the largest ratio over the layers (one test for all layers).
    ``n_points`` of each data set are drawn by ``seed``; ``kw``: ``normalize``, ``device``.
    """
    fa, fb = _layer_features(encoder, a, n_points, seed, **kw), _layer_features(
        encoder, b, n_points, seed, **kw)  # fmt: skip
    names = list(fa)
    n_a, n = len(fa[names[0]]), len(fa[names[0]]) + len(fb[names[0]])
    g = torch.Generator().manual_seed(seed)
    dealt = torch.stack([torch.randperm(n, generator=g) < n_a for _ in range(permutations)])
    masks = torch.cat([(torch.arange(n) < n_a)[None], dealt]).double()  # row 0: as drawn
    d = torch.stack([_distances(torch.cat([fa[k], fb[k]]), masks) for k in names], 1)
    moved, null = d[0], d[1:]  # [L], [R, L]
    mean = null.mean(0).clamp_min(1e-12)
    ratio, null_max = moved / mean, (null / mean).amax(1)
    p = float((1 + (null_max >= ratio.max()).sum()) / (1 + permutations))
    rows = [{"layer": n, "moved": float(moved[i]), "null": float(mean[i]),
             "ratio": float(ratio[i])} for i, n in enumerate(names)]  # fmt: skip
    return {"rows": rows, "p": p}


def estimate_shift(encoder: nn.Module, source: Dataset, train: Dataset, test: Dataset,
                   n_points: int = 256, seed: int = 0, alpha: float = 0.01) -> dict:  # fmt: skip
    """Which family a task's shift belongs to, from where the encoder's features move
    (:func:`feature_shift`).

    From the task's ``train`` to its ``test`` split (a subpopulation shift moves it; an input
    shift applies to both sides alike) and from the pretraining data ``source`` to ``train``
    (an input-level shift moves it): ``feature`` when train-to-test moved beyond sampling
    (permutation p below ``alpha``), else ``input`` when source-to-train did, else ``output``
    (the images look alike, so only the labels can have changed). ``layer``: where the
    deciding comparison moved most. A heuristic: docs/method.md §10b says how often it is
    right on the built-in shifts.
    """
    kw = dict(n_points=n_points, seed=seed)
    moves = {"feature": feature_shift(encoder, train, test, **kw),
             "input": feature_shift(encoder, source, train, **kw)}  # fmt: skip
    family, layer = "output", None
    for kind, found in moves.items():
        if found["p"] < alpha:
            top = max(found["rows"], key=lambda r: r["ratio"])
            family, layer = kind, top["layer"]
            break
    rows = [{"layer": f["layer"], "input_ratio": i["ratio"], "feature_ratio": f["ratio"]}
            for f, i in zip(moves["feature"]["rows"], moves["input"]["rows"])]  # fmt: skip
    return {
        "family": family,
        "layer": layer,
        "alpha": alpha,
        "rows": rows,
        "p_input": moves["input"]["p"],
        "p_feature": moves["feature"]["p"],
    }
