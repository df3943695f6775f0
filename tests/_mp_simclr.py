"""Run by tests, under torchrun or alone: SimCLR on 32 digits in one global batch of 32 for
3 epochs (3 steps: the first epoch's loss is the first step's), saved to argv[1]; argv[2] ==
"sync": BatchNorm over the global batch."""

import sys

import torch

import memprune
from memprune.train import pretrain_simclr

torch.set_num_threads(1)
out, sync = sys.argv[1], sys.argv[2] == "sync"
data = memprune.load_dataset("digits")
pretrain_simclr("resnet18", data, list(range(32)), epochs=3, batch_size=32, lr=1e-3,
                proj_dim=16, seed=0, out_dir=out, progress=False, augment="crop_flip",
                mixed_precision="no", sync_bn=sync, channels=(8, 16, 32, 64))  # fmt: skip
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
