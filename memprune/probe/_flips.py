"""What a changed encoder forgets, example by example (Hooker et al. 2019, "What do compressed
deep neural networks forget?"): the test points whose probe prediction flips between two
encoders, how well a per-point score predicts the flips, and McNemar's exact test of two
encoders' paired outcomes, the test set's own noise in a verdict between them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from memprune.errors import ConfigError


@dataclass(frozen=True)
class Flips:
    """Per test point (``indices``, sorted): ``forgotten`` (right before, wrong after) and
    ``learned`` (wrong before, right after)."""

    indices: torch.Tensor
    forgotten: torch.Tensor
    learned: torch.Tensor

    def counts(self) -> dict:
        n = len(self.indices)
        f, le = int(self.forgotten.sum()), int(self.learned.sum())
        return {"n_test": n, "forgotten": f, "learned": le, "net_forgotten": f - le,
                "flip_rate": (f + le) / n if n else math.nan}  # fmt: skip


def _paired(before, after) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    for name, r in (("before", before), ("after", after)):
        if getattr(r, "predictions", None) is None:
            raise ConfigError(f"{name}: the probe result holds no per-example predictions")
    if not torch.equal(before.indices, after.indices):
        raise ConfigError(
            f"the two probes were tested on different points ({len(before.indices)} and"
            f" {len(after.indices)}): probe both encoders on the same test split"
        )
    return before.indices, before.correct(), after.correct()


def flips(before, after) -> Flips:
    """The test points whose outcome changes from probe result ``before`` to ``after`` (both
    on the same test points)."""
    idx, a, b = _paired(before, after)
    return Flips(idx, a & ~b, ~a & b)


def mcnemar(a, b) -> dict:
    """McNemar's exact test of two probe results on the same test points: ``a_only`` points
    only ``a`` gets right, ``b_only`` only ``b``, and the two-sided binomial p-value of that
    split under "equally good" (1.0 when they never disagree)."""
    from scipy.stats import binomtest

    _, ca, cb = _paired(a, b)
    a_only, b_only = int((ca & ~cb).sum()), int((~ca & cb).sum())
    n = a_only + b_only
    p = 1.0 if n == 0 else float(binomtest(a_only, n, 0.5).pvalue)
    return {"a_only": a_only, "b_only": b_only, "p": p}


def flip_auc(event: torch.Tensor, score: torch.Tensor) -> float | None:
    """AUC with which ``score`` (higher = more memorized or atypical) ranks the points where
    ``event`` holds (e.g. ``Flips.forgotten``) above the others; None when every point or no
    point has the event (the AUC is then undefined)."""
    event, score = event.bool().flatten(), score.double().flatten()
    if len(event) != len(score):
        raise ConfigError(f"{len(event)} events but {len(score)} scores")
    if event.all() or not event.any():
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(event.numpy(), score.numpy()))


def top_share(event: torch.Tensor, score: torch.Tensor, top: float = 0.1) -> float | None:
    """The share of the ``event`` points that fall in the ``top`` fraction of ``score``
    (chance: ``top``); None without events."""
    event = event.bool().flatten()
    if not event.any():
        return None
    k = max(1, math.ceil(top * len(score)))
    top_idx = torch.topk(score.double().flatten(), k).indices
    return float(event[top_idx].sum() / event.sum())
