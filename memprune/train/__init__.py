"""Making the encoders memprune scores: SimCLR pretraining (one encoder or the pair f / g)
and supervised baselines."""

from memprune.train._common import TrainResult
from memprune.train.simclr import nt_xent, pretrain_pair, pretrain_simclr
from memprune.train.supervised import train_supervised

__all__ = ["TrainResult", "nt_xent", "pretrain_pair", "pretrain_simclr", "train_supervised"]
