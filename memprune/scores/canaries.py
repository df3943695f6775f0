"""The canary audit: memorization with a known answer (docs/method.md §8b).

Each canary was included in f's training set by its own coin, and g never saw one, so the
included and the excluded canaries differ only in membership. For them:

* SSLMem (f against g) per canary, and the difference of the two means with its (Welch)
  standard error: memorization of the included canaries beyond what atypicality gives;
* per layer site, f's alignment loss (the member gap's), the membership AUC (a member has the
  lower loss) with its Hanley-McNeil standard error, and the TPR at 1% and 10% FPR. The first
  layer whose AUC is more than two standard errors above 0.5 is where the canaries become
  separable: a localization with a known answer;
* per unit site (:func:`canary_units`), the share of units whose UnitMem argmax is an
  included canary, against chance (the included canaries' share of the scored points) and
  against the excluded canaries (the control), for all units and the top-UnitMem decile.

With few canaries the low-FPR TPRs are coarse: with E excluded canaries the smallest FPR
above zero is 1/E, so "TPR at 1% FPR" is the TPR at FPR 0 when E < 100.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from memprune.errors import ConfigError
from memprune.scores.membership import MemberGapResult, member_gap
from memprune.scores.sslmem import ssl_mem

#: The FPRs the audit reports the TPR at.
FPRS = (0.01, 0.1)


def tpr_at(members: torch.Tensor, nonmembers: torch.Tensor, fpr: float) -> float:
    """TPR of the rule "loss below a threshold" at the largest threshold whose FPR on the
    non-members is at most ``fpr`` (members and non-members: losses ``[N]``)."""
    neg = torch.sort(nonmembers.double()).values
    allowed = math.floor(fpr * len(neg) + 1e-9)  # non-members allowed below the threshold
    threshold = neg[allowed] if allowed < len(neg) else torch.tensor(math.inf)
    return float((members.double() < threshold).double().mean())


def auc_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley and McNeil's (1982) standard error of an AUC."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)
    return math.sqrt(max(var, 0.0) / (n_pos * n_neg))


def difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """``mean(a) - mean(b)`` and its Welch standard error."""
    a, b = a.double(), b.double()
    se = math.sqrt(float(a.var(unbiased=True)) / len(a) + float(b.var(unbiased=True)) / len(b))
    return float(a.mean() - b.mean()), se


@dataclass
class CanaryAuditResult(MemberGapResult):
    """:class:`MemberGapResult` of f with the included canaries as members and the excluded
    ones as non-members, plus SSLMem (f against g) of both sets."""

    kind = "canaries"
    sslmem_included: torch.Tensor | None = None
    sslmem_excluded: torch.Tensor | None = None

    def sslmem_difference(self) -> tuple[float, float]:
        """Included minus excluded mean SSLMem, and its standard error."""
        return difference(self.sslmem_included, self.sslmem_excluded)

    def table(self) -> list[dict]:
        """One row per layer: the member gap's columns, the AUC's standard error and the TPR at
        1% and 10% FPR."""
        rows = super().table()
        n_in, n_out = len(self.member_indices), len(self.nonmember_indices)
        for j, row in enumerate(rows):
            row["auc_se"] = auc_se(row["auc"], n_in, n_out)
            for fpr in FPRS:
                key = f"tpr_at_{round(100 * fpr)}pct_fpr"
                row[key] = tpr_at(self.member_loss[:, j], self.nonmember_loss[:, j], fpr)
        return rows

    to_rows = table

    def separable_layer(self, rows: list[dict] | None = None) -> str | None:
        """The first layer whose AUC exceeds 0.5 by more than two standard errors (``rows``:
        :meth:`table`, when already computed)."""
        rows = self.table() if rows is None else rows
        return next((r["layer"] for r in rows if r["auc"] - 2 * r["auc_se"] > 0.5), None)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {**super()._tensors(), "sslmem_included": self.sslmem_included,
                "sslmem_excluded": self.sslmem_excluded}  # fmt: skip

    @classmethod
    def of(cls, gap: MemberGapResult, included: torch.Tensor, excluded: torch.Tensor):
        """A member-gap result of the canaries and their SSLMem scores, as one result."""
        fields = {k: getattr(gap, k) for k in gap.__dataclass_fields__}
        return cls(**fields, sslmem_included=included, sslmem_excluded=excluded)

    @classmethod
    def _build(cls, t, fields, meta):
        gap = MemberGapResult._build(t, fields, meta)
        return cls.of(gap, t["sslmem_included"], t["sslmem_excluded"])


def canary_audit(
    f: nn.Module,
    g: nn.Module,
    dataset: Dataset,
    included: list[int],
    excluded: list[int],
    n_pairs: int = 10,
    layers: list[str] | str | None = None,
    representation: str = "flatten",
    pair: str = "views",
    augment="simclr",
    normalize="auto",
    seed: int = 0,
    chunk_size: int = 32,
    device=None,
    num_workers: int | None = None,
    progress: bool | None = None,
    precision: str = "auto",
) -> CanaryAuditResult:
    """Audit f on its canaries (module docstring): ``included`` were in f's training set,
    ``excluded`` were not, and g saw neither. Arguments as in :func:`memprune.layer_mem`."""
    if len(included) < 2 or len(excluded) < 2:
        raise ConfigError(
            f"a canary audit needs at least 2 included and 2 excluded canaries, got"
            f" {len(included)} and {len(excluded)}: make more canaries"
        )
    run = dict(n_pairs=n_pairs, representation=representation, pair=pair, augment=augment,
               normalize=normalize, seed=seed, chunk_size=chunk_size, device=device,
               num_workers=num_workers, progress=progress, precision=precision)  # fmt: skip
    gap = member_gap(f, dataset, dataset, list(included), list(excluded), layers=layers, **run)
    scores = [ssl_mem(f, g, dataset, list(idx), **run).score for idx in (included, excluded)]
    gap.meta["kind"] = "canaries"
    return CanaryAuditResult.of(gap, *scores)


def _share(hits: int, n: int) -> tuple[float, float, float]:
    """A share and its 95% Wilson interval."""
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    p, z = hits / n, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, centre - half, centre + half


def canary_units(unitmem, scored: list[int], included: list[int], excluded: list[int],
                 top: float = 0.1) -> list[dict]:  # fmt: skip
    """Per unit site of a UnitMem result computed over the points ``scored`` (which hold the
    canaries): the share of units whose argmax is an included canary (with a Wilson interval
    over units, which are not independent: read it as a guide) and an excluded one, against
    each set's share of the scored points; the same for the ``top`` fraction of units by
    UnitMem."""
    scored_set = set(int(i) for i in scored)
    inc, exc = set(included) & scored_set, set(excluded) & scored_set
    if not inc or not exc:
        raise ConfigError("the scored points must hold included and excluded canaries")
    rows = []
    for site, fields in unitmem.sites.items():
        argmax, score = fields["argmax"].long(), fields["score"].float()
        k = max(1, math.ceil(top * len(score)))
        top_units = torch.topk(score, k).indices
        row = {"site": site, "units": len(score), "top_units": k,
               "chance_included": len(inc) / len(scored_set),
               "chance_excluded": len(exc) / len(scored_set)}  # fmt: skip
        for name, units in (("all", torch.arange(len(score))), ("top", top_units)):
            hits = argmax[units].tolist()
            for which, pool in (("included", inc), ("excluded", exc)):
                p, lo, hi = _share(sum(h in pool for h in hits), len(hits))
                row[f"{name}_{which}"], row[f"{name}_{which}_lo"] = p, lo
                row[f"{name}_{which}_hi"] = hi
        rows.append(row)
    return rows


def canary_unit_map(unitmem, included: list[int]) -> dict[str, list[int]]:
    """Site -> the units whose UnitMem argmax is an included canary."""
    inc = set(int(i) for i in included)
    return {site: [u for u, a in enumerate(fields["argmax"].tolist()) if int(a) in inc]
            for site, fields in unitmem.sites.items()}  # fmt: skip
