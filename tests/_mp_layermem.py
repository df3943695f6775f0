"""Run by tests under torchrun: LayerMem of a saved pair on 25 points, saved by rank 0."""

import sys

import torch
from torch.utils.data import Subset

import memprune
from memprune._dist import rank_world
from tests.conftest import TINY_RESNET

out = sys.argv[1]
torch.set_num_threads(1)
assert rank_world()[1] == 2
f = memprune.load_encoder("resnet18", checkpoint=f"{out}/f.safetensors", **TINY_RESNET)
g = memprune.load_encoder("resnet18", checkpoint=f"{out}/g.safetensors", **TINY_RESNET)
data = Subset(memprune.load_dataset("digits"), range(128))
result = memprune.layer_mem(f, g, data, list(range(25)), n_pairs=2, chunk_size=4, device="cpu")
if torch.distributed.get_rank() == 0:
    result.save(f"{out}/layermem")
torch.distributed.destroy_process_group()
