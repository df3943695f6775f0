"""Making the encoders memprune scores: SimCLR pretraining (one encoder or the pair f / g)
and supervised baselines, on one training loop (:func:`run_training`) that fine-tuning shares."""

from memprune.train._common import (
    MIXED_PRECISION,
    TrainResult,
    epoch_seed,
    resolve_mixed_precision,
    run_training,
)
from memprune.train.simclr import SimCLRNet, nt_xent, pretrain_pair, pretrain_simclr
from memprune.train.supervised import Classifier, train_supervised

__all__ = [
    "MIXED_PRECISION",
    "Classifier",
    "SimCLRNet",
    "TrainResult",
    "epoch_seed",
    "nt_xent",
    "pretrain_pair",
    "pretrain_simclr",
    "resolve_mixed_precision",
    "run_training",
    "train_supervised",
]
