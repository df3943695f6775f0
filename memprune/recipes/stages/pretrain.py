"""``pretrain``: SimCLR training of the pair f (shared + candidates) and g (shared + extras)
on the split of ``data``, or of one encoder on the whole train split (``pair: false``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from memprune.recipes._stages import Stage, StageResult


@dataclass
class PretrainResult(StageResult):
    final_loss_f: float | None = None
    final_loss_g: float | None = None
    n_shared: int | None = None
    n_candidate: int | None = None
    n_extra: int | None = None
    final_loss: float | None = None  # pair: false

    def to_dict(self) -> dict:  # a pair has no single loss, one encoder no split
        return {k: v for k, v in super().to_dict().items() if v is not None}


def run(ctx, out: Path) -> PretrainResult:
    from memprune.train import pretrain_pair, pretrain_simclr

    r, p = ctx.recipe, ctx.recipe.encoder.pretrain
    common = dict(
        epochs=p.epochs, lr=p.lr, batch_size=p.batch_size, temperature=p.temperature,
        proj_dim=p.proj_dim, seed=r.seed, img_size=r.encoder.img_size, augment=p.augment,
        mixed_precision=p.mixed_precision, keep_checkpoints=p.keep_checkpoints, resume=True,
        num_workers=r.workers, batch_scope=p.batch_scope, sync_bn=p.sync_bn, **r.encoder.timm,
    )  # fmt: skip
    if not p.pair:
        run = pretrain_simclr(r.encoder.model, ctx.train, out_dir=out, **common)
        ctx.log(f"encoder: {run.path} (loss per epoch: {_losses(run)})")
        return PretrainResult(final_loss=run.history[-1])
    from memprune.data import make_splits

    d, train = r.data, ctx.train
    canaries = 0 if d.canaries is None else d.canaries.n
    p_in = 0.5 if d.canaries is None else d.canaries.p
    repeat = 1 if d.canaries is None else d.canaries.repeat
    splits = make_splits(len(train), d.shared, d.candidate, d.extra, d.test, seed=d.split_seed,
                         canaries=canaries, p=p_in, repeat=repeat)  # fmt: skip
    splits = dataclasses.replace(splits, canary_spec=ctx.canary_spec())
    f, g, splits = pretrain_pair(r.encoder.model, train, out, splits=splits, **common)
    ctx.log(f"splits: shared {len(splits.shared)}, candidate {len(splits.candidate)}, extra"
            f" {len(splits.extra)}, test {len(splits.test)}, canaries {len(splits.canaries)}"
            f" ({len(splits.included)} in f's training, {splits.repeat}x each)"
            f" -> {out / 'splits.json'}")  # fmt: skip
    for name, run in (("f", f), ("g", g)):
        ctx.log(f"{name}: {run.path} (loss per epoch: {_losses(run)})")
    return PretrainResult(
        n_shared=len(splits.shared), n_candidate=len(splits.candidate),
        n_extra=len(splits.extra), final_loss_f=f.history[-1], final_loss_g=g.history[-1],
    )  # fmt: skip


def _losses(run) -> str:
    return ", ".join(f"{h:.3f}" for h in run.history)


STAGE = Stage(
    "pretrain",
    PretrainResult,
    run,
    enabled=lambda recipe: recipe.encoder.pretrain is not None,
    resumable=True,
)
