"""The built-in stages, one module each, registered in run order: encoders (pretrain,
supervised), scores (unitmem, classmem, sslmem, layermem, membergap, canaries, cka), evaluate,
then actions (prune, finetune, shifts). See :mod:`memprune.recipes._stages`."""

from memprune.recipes._stages import register
from memprune.recipes.stages import (
    canaries,
    cka,
    classmem,
    evaluate,
    finetune,
    layermem,
    membergap,
    pretrain,
    prune,
    shifts,
    sslmem,
    supervised,
    unitmem,
)

#: The built-in stages in the order a run runs them.
BUILTIN = (pretrain.STAGE, supervised.STAGE, unitmem.STAGE, classmem.STAGE, sslmem.STAGE,
           layermem.STAGE, membergap.STAGE, canaries.STAGE, cka.STAGE, evaluate.STAGE,
           prune.STAGE, finetune.STAGE, shifts.STAGE)  # fmt: skip
for _stage in BUILTIN:
    register(_stage)
