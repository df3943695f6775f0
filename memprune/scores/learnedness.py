"""Learnedness of points and views over SimCLR training (docs/method.md §7).

On a fixed probe set, each point gets ``2 * n_pairs`` fixed views (seeded by (seed, i, k)),
paired (0, 1), (2, 3), ... For every checkpoint and every pair, the views of one fixed group of
B points (``group_size``) are pooled (2B views) and each view must pick its partner among the
2B - 1 others by cosine similarity of the encoder's output features: it is *learned* when the
partner is the most similar. Groups and views are the same at every checkpoint.

* r~(view) = fraction of runs in which the view is learned; r(x) = fraction of the
  runs x 2 n_pairs views of point x that are learned.
* Homogeneity: if every point were equally hard (probability p = mean r), R r(x) would be
  Binomial(R, p) with R = runs x 2 n_pairs draws (not Binomial(runs, p)). The chi-square test
  compares the histogram of R r(x) with that null, pooling bins with an expected count under 5.

The encoder's output features stand in for SimCLR's projection (checkpoints keep the encoder
only). Single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from memprune.checkpoints import read_card
from memprune.data import MultiView, dataset_name, describe_augment
from memprune.encoders import evaluating, load_encoder, resolve_device
from memprune.engine import Normalizer, resolve_normalize
from memprune.errors import ConfigError
from memprune.results import Result


@dataclass
class LearnednessResult(Result):
    """``learned[c, run, p, v]``: whether view v of probe point p is learned at checkpoint c in
    that run. ``indices``: the probe points' data indices; ``checkpoints``: their labels."""

    kind = "learnedness"
    learned: torch.Tensor
    indices: torch.Tensor
    checkpoints: list[str]
    meta: dict = field(default_factory=dict)

    def points(self) -> torch.Tensor:
        """r(x) per checkpoint ``[C, P]``."""
        return self.learned.float().mean(dim=(1, 3))

    def views(self) -> torch.Tensor:
        """r~(view) per checkpoint ``[C, P, V]`` (over runs)."""
        return self.learned.float().mean(dim=1)

    def curve(self) -> torch.Tensor:
        """Mean learnedness per checkpoint ``[C]``."""
        return self.points().mean(dim=1)

    def homogeneity(self, checkpoint: int = -1, min_expected: float = 5.0) -> dict:
        """Chi-square test of "every point equally hard" at one checkpoint (see module doc)."""
        from scipy.stats import binom, chi2

        runs, views = self.learned.shape[1], self.learned.shape[3]
        r_draws = runs * views
        counts = self.learned[checkpoint].sum(dim=(0, 2)).long()  # learned draws per point
        n = len(counts)
        p = float(counts.sum()) / (n * r_draws)
        observed = torch.bincount(counts, minlength=r_draws + 1).double()
        expected = torch.tensor(binom.pmf(range(r_draws + 1), r_draws, p)) * n
        obs, exp = _pool(observed.tolist(), expected.tolist(), min_expected)
        dof = len(obs) - 2  # bins - 1 - the estimated p
        if dof < 1 or p in (0.0, 1.0):
            return {"statistic": 0.0, "dof": max(dof, 0), "p_value": 1.0, "p": p, "R": r_draws,
                    "bins": len(obs)}  # fmt: skip
        stat = float(sum((o - e) ** 2 / e for o, e in zip(obs, exp)))
        return {"statistic": stat, "dof": dof, "p_value": float(chi2.sf(stat, dof)), "p": p,
                "R": r_draws, "bins": len(obs)}  # fmt: skip

    def to_rows(self) -> list[dict]:
        """One row per checkpoint: mean learnedness and the share of never / always learned
        points."""
        r = self.points()
        return [
            {"checkpoint": c, "mean": float(row.mean()), "never": float((row == 0).float().mean()),
             "always": float((row == 1).float().mean())}
            for c, row in zip(self.checkpoints, r)
        ]  # fmt: skip

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"learned": self.learned.to(torch.uint8), "indices": self.indices}

    def _fields(self) -> dict:
        return {"checkpoints": self.checkpoints}

    @classmethod
    def _build(cls, t, fields, meta):
        return cls(t["learned"].bool(), t["indices"], fields["checkpoints"], meta)


def _pool(observed: list[float], expected: list[float], minimum: float):
    """Merge bins into a neighbour until every expected count is >= minimum (tails inward,
    interior bins into the bin on their right)."""
    obs, exp = list(observed), list(expected)

    def merge(i: int, j: int) -> None:  # bin i joins bin j, then i is removed
        o, e = obs.pop(i), exp.pop(i)
        j = j - 1 if j > i else j
        obs[j] += o
        exp[j] += e

    while len(exp) > 1 and exp[0] < minimum:
        merge(0, 1)
    while len(exp) > 1 and exp[-1] < minimum:
        merge(len(exp) - 1, len(exp) - 2)
    i = 1
    while i < len(exp) - 1:
        if exp[i] < minimum:
            merge(i, i + 1)
        else:
            i += 1
    return obs, exp


def _encoders(checkpoints) -> list[tuple[str, object]]:
    """(label, encoder or path) for a list of modules / weight paths, or a run directory whose
    ``checkpoints/epoch_NNN.safetensors`` were kept during pretraining."""
    if isinstance(checkpoints, (str, os.PathLike)):
        run = Path(checkpoints)
        files = sorted((run / "checkpoints").glob("epoch_*.safetensors"))
        if not files:
            raise ConfigError(
                f"no epoch checkpoints in {run}/checkpoints: pretrain with"
                " keep_checkpoints=True (memprune pretrain --keep-checkpoints)"
            )
        return [(f.stem, (run, f)) for f in files]
    items = list(checkpoints)
    if not items:
        raise ConfigError("learnedness needs at least one checkpoint")
    return [(str(i), c) for i, c in enumerate(items)]


def _load(item) -> nn.Module:
    if isinstance(item, nn.Module):
        return item
    run, weights = item
    card, _ = read_card(run)
    return load_encoder(card["model"], checkpoint=weights, img_size=card.get("img_size"),
                        **card.get("timm_kwargs", {}))  # fmt: skip


@torch.no_grad()
def _learned(encoder, loader, n_pairs, normalize, device) -> torch.Tensor:
    """``[P, 2 * n_pairs]`` in probe order: is each view's partner its nearest view."""
    norm = Normalizer(resolve_normalize(encoder, normalize), device)
    rows = []
    with evaluating(encoder):
        encoder.to(device)
        for views, _, _ in loader:
            b = views.shape[0]
            z = encoder(norm(views.to(device).flatten(0, 1))).flatten(1)
            z = F.normalize(z.float(), dim=1).view(b, 2 * n_pairs, -1)
            out = torch.zeros(b, 2 * n_pairs, dtype=torch.bool)
            for j in range(n_pairs):
                pool = torch.cat([z[:, 2 * j], z[:, 2 * j + 1]])  # [2B, D]
                sim = pool @ pool.T
                sim.fill_diagonal_(float("-inf"))
                partner = torch.arange(2 * b, device=sim.device).roll(b)
                hit = (sim.argmax(dim=1) == partner).cpu()
                out[:, 2 * j], out[:, 2 * j + 1] = hit[:b], hit[b:]
            rows.append(out)
    return torch.cat(rows)


def learnedness(
    checkpoints,
    dataset: Dataset,
    probe_size: int = 256,
    n_pairs: int = 2,
    group_size: int = 64,
    runs=None,
    seed: int = 0,
    augment="simclr",
    normalize="auto",
    device=None,
) -> LearnednessResult:
    """Per-point and per-view learnedness at every checkpoint (see the module docstring).

    Args:
        checkpoints: encoders of one training run in order: ``nn.Module`` objects, or the run
            directory of a pretraining that kept its epoch checkpoints.
        runs: further runs (each like ``checkpoints``, same number of checkpoints).
        probe_size: points drawn (seeded) from ``dataset``; rounded down to full groups.
        n_pairs: view pairs per point (2 * n_pairs fixed views).
        group_size: B, points whose views compete: each view competes with the 2B - 1 other
            views of its pair index in the group (an estimator parameter: it changes r).
        augment: a preset name, a mapping of its parameters, or a callable.
    """
    if group_size < 2 or n_pairs < 1:
        raise ConfigError(f"need group_size >= 2 and n_pairs >= 1, got {group_size}, {n_pairs}")
    size = min(probe_size, len(dataset)) // group_size * group_size
    if size == 0:
        raise ConfigError(f"probe_size {probe_size} gives no full group of {group_size} points")
    g = torch.Generator().manual_seed(seed)
    probe = sorted(torch.randperm(len(dataset), generator=g)[:size].tolist())
    views = MultiView(Subset(dataset, probe), 2 * n_pairs, augment, seed)
    loader = DataLoader(views, batch_size=group_size, shuffle=False)  # fixed groups
    all_runs = [_encoders(checkpoints)] + [_encoders(r) for r in (runs or [])]
    if len({len(r) for r in all_runs}) != 1:
        raise ConfigError("every run needs the same number of checkpoints")
    dev = resolve_device(device)
    learned = torch.stack([
        torch.stack([_learned(_load(item), loader, n_pairs, normalize, dev) for _, item in run])
        for run in all_runs
    ], dim=1)  # fmt: skip  # [C, runs, P, V]
    indices = torch.tensor([int(dataset[i][2]) for i in probe])
    name = dataset_name(dataset)
    meta = {"probe_size": size, "n_pairs": n_pairs, "group_size": group_size, "seed": seed,
            "runs": len(all_runs), "data": name, "augment": describe_augment(augment)}  # fmt: skip
    return LearnednessResult(learned, indices, [label for label, _ in all_runs[0]], meta)
