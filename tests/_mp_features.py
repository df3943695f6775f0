"""Run by tests under torchrun: extract features of 37 digits (odd: uneven shards)."""

import sys

import torch
from safetensors.torch import save_file
from torch.utils.data import Subset

import memprune
from memprune._dist import rank_world
from memprune.probe import extract_features
from tests.conftest import tiny_resnet

torch.set_num_threads(1)
assert rank_world()[1] == 2
data = Subset(memprune.load_dataset("digits"), range(37))
out = extract_features(tiny_resnet(), data, chunk_size=5, device="cpu")
assert len(out.indices) == 37  # every process holds all rows after the gather
# and on disk: both processes write their rows into one memory-mapped file
disk = extract_features(tiny_resnet(), data, chunk_size=5, device="cpu", store=sys.argv[2])
assert torch.equal(disk.features, out.features) and torch.equal(disk.indices, out.indices)
if torch.distributed.get_rank() == 0:
    save_file({"features": out.features, "labels": out.labels, "indices": out.indices},
              f"{sys.argv[1]}/features.safetensors")  # fmt: skip
torch.distributed.destroy_process_group()
