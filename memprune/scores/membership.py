"""Reference-free layer memorization: members against non-members of one encoder.

LayerMem needs a reference encoder g trained without the scored points. People who hold a
single pretrained encoder have no g, but they usually know which data it was trained on
(members) and have data from the same distribution that it never saw (non-members, e.g. a
held-out split). Per layer site l, with the alignment loss L_l(x) of LayerMem (the mean
distance of K normalized view pairs at layer l, docs/method.md §4-§5):

* the member gap ``(mean L_non - mean L_mem) / (mean L_non + mean L_mem)``: LayerMem's
  normalization applied to set means, > 0 when the encoder aligns the views of its training
  points better than those of unseen points; with a bootstrap confidence interval that
  resamples members and non-members independently;
* the membership AUC: the probability that a random member has a lower loss than a random
  non-member (0.5: the layer cannot tell them apart), a membership-inference reading.

Unlike LayerMem, the gap compares different points, so it also contains the set difference
that a reference encoder would cancel; members and non-members must come from the same
distribution for it to mean memorization.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from memprune.data import seeded_subset
from memprune.engine import Compute, score_meta, view_batches
from memprune.errors import ConfigError
from memprune.results import Result
from memprune.scores.sslmem import (
    PairedViews,
    SSLMemResult,
    _check_pairs,
    _layer_sites,
    _subset,
    normalized_gap,
    pair_distance,
)
from memprune.sites import OUTPUT, Site
from memprune.stats import Metric, RowsState


class AlignmentLoss(Metric):
    """Streaming per-point alignment losses ``[B, L]`` of one encoder, merged across
    processes; ``compute()`` gives ``(indices [N], losses [N, L])`` sorted by data index."""

    def _empty(self) -> RowsState:
        return RowsState()

    def update(self, indices: torch.Tensor, loss: torch.Tensor) -> None:
        self.state.update(torch.as_tensor(indices), loss)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.state.compute()


def alignment_losses(encoder, views: PairedViews, sites, representation, normalize, compute):
    """Per-point, per-site alignment loss of ``encoder`` on ``views``: every site from one
    forward pass per chunk (the pair distances are taken inside the hooks)."""
    reduce = {s.name: pair_distance(s, representation) for s in sites}
    k, metric = views.n_pairs, AlignmentLoss()
    for indices, _, (acts,) in view_batches(
        [encoder], views, [sites], compute, reduce=[reduce], normalize=normalize,
        desc="alignment loss",
    ):  # fmt: skip
        metric.update(indices, torch.stack([acts[s.name].view(-1, k).mean(1) for s in sites], 1))
    return metric.sync().compute()


def _auc(members: torch.Tensor, nonmembers: torch.Tensor) -> torch.Tensor:
    """Per column: P(member loss < non-member loss) + P(tie) / 2 (scikit-learn's ROC AUC
    with members as positives scored by their negated loss)."""
    from sklearn.metrics import roc_auc_score

    labels = [1] * len(members) + [0] * len(nonmembers)
    both = torch.cat([members, nonmembers]).neg().numpy()
    return torch.tensor([roc_auc_score(labels, both[:, j]) for j in range(both.shape[1])],
                        dtype=torch.float64)  # fmt: skip


@dataclass
class MemberGapResult(Result):
    """Member gap and membership AUC per layer from one encoder, and the per-point losses.

    Attributes:
        layers: layer site names in forward order, ending with ``output``.
        member_indices, nonmember_indices: data indices of the scored points.
        member_loss, nonmember_loss: alignment losses ``[N, L]`` (float64).
        n_boot, seed, level: the bootstrap behind :meth:`gap_ci`.
    """

    kind = "membergap"
    #: the per-layer values :func:`memprune.select_layers` can rank by (``by=``)
    rankings = ("gap", "auc")
    layers: list[str]
    member_indices: torch.Tensor
    member_loss: torch.Tensor
    nonmember_indices: torch.Tensor
    nonmember_loss: torch.Tensor
    meta: dict = field(default_factory=dict)
    n_boot: int = 1000
    seed: int = 0
    level: float = 0.95

    def gap(self) -> torch.Tensor:
        """Member gap per layer ``[L]`` (module docstring)."""
        return normalized_gap(self.member_loss.mean(0), self.nonmember_loss.mean(0))

    def gap_ci(self) -> torch.Tensor:
        """Percentile bootstrap interval of the gap ``[L, 2]`` at ``level``: members and
        non-members resampled independently, ``n_boot`` times with ``seed``."""
        g = torch.Generator().manual_seed(self.seed)
        draws = []
        for start in range(0, self.n_boot, 100):
            b = min(100, self.n_boot - start)
            means = [_resampled_mean(x, b, g) for x in (self.member_loss, self.nonmember_loss)]
            draws.append(normalized_gap(*means))  # [b, L]
        draws = torch.cat(draws)
        alpha = (1 - self.level) / 2
        q = torch.tensor([alpha, 1 - alpha], dtype=draws.dtype)
        return torch.quantile(draws, q, dim=0).T

    def auc(self) -> torch.Tensor:
        """Membership AUC per layer ``[L]``: 0.5 is chance, 1 every member below every
        non-member."""
        return _auc(self.member_loss, self.nonmember_loss)

    def ranking(self, by: str) -> torch.Tensor:
        """The value of every layer ``[L]`` under ranking ``by`` (``gap`` or ``auc``)."""
        return {"gap": self.gap, "auc": self.auc}[by]()

    def table(self) -> list[dict]:
        """One row per layer: mean losses, gap with its interval, AUC."""
        gap, ci, auc = self.gap(), self.gap_ci(), self.auc()
        lm, ln = self.member_loss.mean(0), self.nonmember_loss.mean(0)
        return [
            {"layer": layer, "loss_members": float(lm[i]), "loss_nonmembers": float(ln[i]),
             "gap": float(gap[i]), "gap_lo": float(ci[i, 0]), "gap_hi": float(ci[i, 1]),
             "auc": float(auc[i])}
            for i, layer in enumerate(self.layers)
        ]  # fmt: skip

    to_rows = table

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"member_indices": self.member_indices, "member_loss": self.member_loss,
                "nonmember_indices": self.nonmember_indices,
                "nonmember_loss": self.nonmember_loss}  # fmt: skip

    def _fields(self) -> dict:
        return {"layers": self.layers, "n_boot": self.n_boot, "seed": self.seed,
                "level": self.level}  # fmt: skip

    @classmethod
    def _build(cls, t, fields, meta):
        return cls(fields["layers"], t["member_indices"], t["member_loss"],
                   t["nonmember_indices"], t["nonmember_loss"], meta, fields["n_boot"],
                   fields["seed"], fields["level"])  # fmt: skip


def _resampled_mean(x: torch.Tensor, b: int, g: torch.Generator) -> torch.Tensor:
    """Means of ``b`` bootstrap resamples of the rows of ``x [N, L]`` -> ``[b, L]``."""
    n = len(x)
    counts = torch.zeros(b, n, dtype=x.dtype)
    counts.scatter_add_(1, torch.randint(n, (b, n), generator=g), torch.ones(b, n, dtype=x.dtype))
    return counts @ x / n


def _points(dataset: Dataset, indices, name: str) -> Dataset:
    data = _subset(dataset, indices)
    if len(data) < 2:
        raise ConfigError(f"{name} must hold at least 2 points, got {len(data)}")
    return data


def _base(data: Dataset) -> tuple[Dataset, set[int] | None]:
    """The data set under a chain of Subsets and the positions in it (None: all)."""
    positions = None
    while isinstance(data, Subset):
        idx = [int(i) for i in data.indices]
        positions = idx if positions is None else [idx[p] for p in positions]
        data = data.dataset
    return data, None if positions is None else set(positions)


def check_disjoint(members: Dataset, nonmembers: Dataset) -> None:
    """Refuse members and non-members that share points of the same data set."""
    base_m, pos_m = _base(members)
    base_n, pos_n = _base(nonmembers)
    if base_m is not base_n:
        return
    shared = (pos_m if pos_m is not None else set(range(len(base_m)))) & (
        pos_n if pos_n is not None else set(range(len(base_n)))
    )
    if shared:
        raise ConfigError(
            f"members and non-members share {len(shared)} points (e.g. positions"
            f" {sorted(shared)[:5]}): non-members must be points the encoder never saw, e.g."
            " the test split or the indices left out of its training"
        )


def member_gap(
    encoder: nn.Module,
    members: Dataset,
    nonmembers: Dataset,
    member_indices: list[int] | None = None,
    nonmember_indices: list[int] | None = None,
    n_pairs: int = 10,
    layers: list[str] | str | None = None,
    representation: str = "flatten",
    pair: str = "views",
    n_points: int | None = None,
    augment="simclr",
    normalize="auto",
    seed: int = 0,
    n_boot: int = 1000,
    level: float = 0.95,
    chunk_size: int = 32,
    device=None,
    num_workers: int | None = None,
    progress: bool | None = None,
    precision: str = "auto",
) -> MemberGapResult:
    """Member gap and membership AUC of every layer site of one encoder (module docstring).

    Args:
        encoder: the encoder; it was trained on ``members`` and never saw ``nonmembers``.
        members, member_indices: the training points scored, ``members[member_indices]``.
        nonmembers, nonmember_indices: unseen points of the same distribution.
        n_points: score a seeded random subset of this many points of each set.
        n_boot, level: bootstrap resamples and level of the gap's interval.
        n_pairs, layers, representation, pair, augment, normalize, seed, chunk_size, device,
            num_workers, progress, precision: as in :func:`memprune.layer_mem`.
    """
    _check_pairs(n_pairs)
    if not 0 < level < 1:
        raise ConfigError(f"level must be in (0, 1), got {level!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 10:
        raise ConfigError(f"n_boot must be an int >= 10 (bootstrap resamples), got {n_boot!r}")
    mem = seeded_subset(_points(members, member_indices, "members"), n_points, seed)
    non = seeded_subset(_points(nonmembers, nonmember_indices, "non-members"), n_points, seed)
    check_disjoint(mem, non)
    sites = _layer_sites(encoder, None, mem, layers)
    compute = Compute(chunk_size, device, num_workers, progress, precision)
    losses = [
        alignment_losses(encoder, PairedViews(d, n_pairs, pair, augment, seed), sites,
                         representation, normalize, compute)
        for d in (mem, non)
    ]  # fmt: skip
    meta = score_meta("membergap", encoder, mem, sites, n_pairs=n_pairs, pair=pair,
                      representation=representation, augment=augment, seed=seed,
                      n_members=len(mem), n_nonmembers=len(non), compute=compute,
                      normalize=normalize)  # fmt: skip
    (im, lm), (inn, ln) = losses
    return MemberGapResult([s.name for s in sites], im, lm, inn, ln, meta, n_boot, seed, level)


def ssl_mem_against(
    g: nn.Module,
    dataset: Dataset,
    indices: list[int] | None = None,
    n_pairs: int = 10,
    pair: str = "views",
    representation: str = "flatten",
    augment="simclr",
    normalize="auto",
    seed: int = 0,
    chunk_size: int = 32,
    device=None,
    num_workers: int | None = None,
    precision: str = "auto",
):
    """``fn(f) -> SSLMemResult``: output-layer SSLMem of many encoders f against one
    reference g, whose alignment losses are computed once (a pruning sweep scores every
    pruned f). Each f sees the views g saw, so ``fn(f)`` equals :func:`ssl_mem` ``(f, g, ...)``.

    Unlike :func:`ssl_mem`, f need not have g's architecture: at the output each loss is a
    distance between one encoder's own L2-normalized vectors, defined whatever their widths,
    so a pruned f is scored against the unpruned g. (The layer sites of a pruned f differ in
    width, and LayerMem compares layers of equal architectures, so only the output is scored.)
    """
    data = _subset(dataset, indices)
    if len(data) == 0:
        raise ConfigError("no points to score")
    _check_pairs(n_pairs)
    views = PairedViews(data, n_pairs, pair, augment, seed)
    compute = Compute(chunk_size, device, num_workers, False, precision)

    def losses(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, list[Site]]:
        sites = _layer_sites(model, None, data, [OUTPUT])
        idx, loss = alignment_losses(model, views, sites, representation, normalize, compute)
        return idx, loss[:, 0].float(), sites

    g_idx, loss_g, _ = losses(g)

    def score(f: nn.Module) -> SSLMemResult:
        idx, loss_f, sites = losses(f)
        assert torch.equal(idx, g_idx), "the same points in the same order for f and g"
        meta = score_meta("sslmem", f, data, sites, site=OUTPUT, n_pairs=n_pairs, pair=pair,
                          representation=representation, augment=augment, seed=seed,
                          compute=compute, normalize=normalize)  # fmt: skip
        return SSLMemResult(idx, normalized_gap(loss_f, loss_g), loss_g - loss_f, loss_f,
                            loss_g, meta)  # fmt: skip

    return score
