"""The built-in stages, registered in run order: encoders (pretrain, supervised), scores
(unitmem, classmem, sslmem, layermem, membergap, cka), evaluate, then actions (prune,
finetune). Each module is one stage; see :mod:`memprune.recipes._stages`."""

from memprune.recipes.stages import (  # noqa: F401  (importing a stage registers it)
    pretrain,
    supervised,
    unitmem,
    classmem,
    sslmem,
    layermem,
    membergap,
    cka,
    evaluate,
    prune,
    finetune,
)
