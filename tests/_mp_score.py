"""Run by tests under torchrun: score a tiny model and save the result (rank 0)."""

import sys

import torch
from torch.utils.data import Subset

import memprune
from memprune._dist import rank_world, shard
from tests.conftest import tiny_resnet

out = sys.argv[1]
rank, world = rank_world()
assert world == 2 and len(shard(45, rank, world)) == (23 if rank == 0 else 22)
torch.set_num_threads(1)
data = Subset(memprune.load_dataset("digits"), list(range(0, 45)))
results = {
    rest: memprune.unit_mem(tiny_resnet(), data, n_views=3, chunk_size=4, rest=rest, device="cpu")
    for rest in ("mean", "median")
}
classes = memprune.class_mem(tiny_resnet(), data, chunk_size=4, device="cpu")
torch.manual_seed(1)
other = memprune.load_encoder("resnet18", channels=(8, 16, 32, 64))
# minibatches of 8: 5 whole ones, dealt 3 / 2 to the processes, and a dropped rest of 5
similarity = memprune.cka(data, tiny_resnet(), other, minibatch=8, device="cpu")
if torch.distributed.get_rank() == 0:
    similarity.save(f"{out}/cka")
    for rest, result in results.items():
        result.save(f"{out}/unitmem_{rest}")
    classes.save(f"{out}/classmem")
torch.distributed.destroy_process_group()
