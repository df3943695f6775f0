"""``supervised``: a supervised encoder on f's points (the baseline ClassMem and CKA compare
with), or on the whole train split (``points: all``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from memprune.recipes._stages import Stage, StageResult


@dataclass
class SupervisedResult(StageResult):
    final_loss: float


def run(ctx, out: Path) -> SupervisedResult:
    from memprune.train import train_supervised

    r, s = ctx.recipe, ctx.recipe.encoder.supervised
    indices = ctx.splits().f_indices if s.points == "f" else None
    res = train_supervised(
        r.encoder.model, ctx.train, indices, epochs=s.epochs, batch_size=s.batch_size, lr=s.lr,
        seed=r.seed, out_dir=out, img_size=r.encoder.img_size, random_labels=s.random_labels,
        augment=s.augment, mixed_precision=s.mixed_precision,
        keep_checkpoints=s.keep_checkpoints, resume=True, num_workers=r.workers,
        **r.encoder.timm,
    )  # fmt: skip
    ctx.log(f"supervised: {res.path} (loss per epoch: "
            + ", ".join(f"{h:.3f}" for h in res.history) + ")")  # fmt: skip
    return SupervisedResult(final_loss=res.history[-1])


STAGE = Stage(
    "supervised",
    SupervisedResult,
    run,
    enabled=lambda recipe: recipe.encoder.supervised.enabled,
    needs=lambda recipe: [("pretrain", None)] if recipe.encoder.supervised.points == "f" else [],
    resumable=True,
)
