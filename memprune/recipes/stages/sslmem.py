"""``sslmem``: SSLMem of the candidates (in f's training data, not g's) and of the extras (in
g's, not f's): the per-point memorization score (docs/method.md §5)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from memprune.errors import ConfigError
from memprune.recipes._stages import Stage, StageResult


@dataclass
class PartMean(StageResult):
    mean: float
    n: int
    se: float


@dataclass
class SSLMemResult(StageResult):
    candidate: PartMean
    extra: PartMean
    difference: float
    difference_se: float


def run(ctx, out: Path) -> SSLMemResult:
    from memprune.report.plots import plot_sslmem
    from memprune.scores import ssl_mem

    r, c = ctx.recipe, ctx.recipe.scores.sslmem
    splits = ctx.splits()
    if splits is None:
        raise ConfigError("SSLMem needs the candidate / extra split of a pretrain stage")
    scores, parts = {}, {}
    for part in ("candidate", "extra"):
        res = ssl_mem(
            ctx.encoder("f"), ctx.encoder("g"), ctx.train, getattr(splits, part),
            n_pairs=c.pairs, chunk_size=r.scores.chunk_size, seed=r.seed, device=r.device,
            augment=r.scores.augment, precision=r.precision,
        )  # fmt: skip
        res.meta["part"] = part
        res.save(out / f"sslmem_{part}")
        scores[part] = res.score
        n = len(res.score)
        se = float(res.score.std() / n**0.5) if n > 1 else 0.0
        parts[part] = PartMean(mean=float(res.score.mean()), n=n, se=se)
    plot_sslmem(scores, out / "sslmem.png")
    cand, extra = parts["candidate"], parts["extra"]
    return SSLMemResult(cand, extra, difference=cand.mean - extra.mean,
                        difference_se=(cand.se**2 + extra.se**2) ** 0.5)  # fmt: skip


def headlines(s: SSLMemResult) -> list[str]:
    d, se = s.difference, s.difference_se
    verdict = (
        "f memorizes its candidates" if d > 2 * se
        else "no clear memorization signal in this one run (difference within 2 SE). The"
        " emergence study (benchmarks/emergence.py, docs/method.md §11c) finds where it"
        " appears: weak augmentation, a small training set, 40+ epochs, and more than one"
        " pair seed; `--set 'seeds=[0,1,2]'` runs the loop three times (three times the"
        " cost) and tests the difference against the seed spread"
    )  # fmt: skip
    return [
        f"SSLMem: candidates {s.candidate.mean:.4f} vs extras {s.extra.mean:.4f} (difference"
        f" {d:+.4f} ± {se:.4f} SE{f', {d / se:+.1f} SE' if se > 0 else ''}): {verdict}."
    ]


def values(s: SSLMemResult) -> dict[str, float]:
    return {"SSLMem, candidates": s.candidate.mean, "SSLMem, extras": s.extra.mean}


STAGE = Stage(
    "sslmem",
    SSLMemResult,
    run,
    enabled=lambda recipe: recipe.scores.sslmem.enabled,
    needs=lambda recipe: [("pretrain", None)],
    headlines=headlines,
    values=values,
    plots=(("sslmem.png", "SSLMem of the candidates (in f's data) and the extras (not)"),),
)
