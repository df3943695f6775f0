"""Multi-process helpers: sharding by data index and merging states with accelerate.

Under ``torchrun`` or ``accelerate launch`` every process scores the points at positions
``rank, rank + world, ...`` (no padding, so no duplicates), and the per-process states are
gathered with accelerate and merged in rank order. One process is the same code path with a
world of 1.

Files are written by the main process alone (:func:`memprune._io.atomic_write` asks
:func:`is_main`); a decision read from the file system that every process must share (is this
run finished? is this cache filled?) is taken by the main process and broadcast (:func:`agree`),
so that a file the main process has just written cannot send the processes down different paths.
"""

from __future__ import annotations

import dataclasses
import os

import torch


def process_state():
    """accelerate's ``PartialState`` (initializes the process group under torchrun).

    Without CUDA, accelerate only takes the multi-process CPU (gloo) path when asked with
    ``cpu=True``; otherwise every process would silently see a world of one.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def rank_world() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or torch.distributed.is_initialized():
        state = process_state()
        return state.process_index, state.num_processes
    return 0, 1


def is_main() -> bool:
    """Whether this is the main process (rank 0; always true for one process). Reads the
    launcher's ``RANK`` without starting anything, so file writers can ask it cheaply."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait until every process gets here (nothing for one process)."""
    if rank_world()[1] > 1:
        process_state().wait_for_everyone()


def agree(value):
    """The main process's ``value`` on every process (a picklable object; one process: itself)."""
    if rank_world()[1] == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def shard(n: int, rank: int, world: int) -> list[int]:
    """Positions of this process's points: ``rank, rank + world, ...``."""
    return list(range(rank, n, world))


def _gather_rows(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every process's ``t [n_p, ...]`` (lengths may differ), in rank order."""
    from accelerate.utils import gather, pad_across_processes

    lengths = gather(torch.tensor([len(t)], device=t.device)).tolist()
    padded = gather(pad_across_processes(t, dim=0))
    size = len(padded) // world
    return [padded[p * size : p * size + lengths[p]] for p in range(world)]


def gather_states(state, world: int) -> list:
    """Every process's copy of a dataclass state whose fields are tensors, ints or lists of
    row tensors, in rank order."""
    if world == 1:
        return [state]
    device = process_state().device
    per_rank: list[dict] = [{} for _ in range(world)]
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        if isinstance(value, torch.Tensor):
            parts = _gather_rows(value.to(device)[None], world)
            for p in range(world):
                per_rank[p][f.name] = parts[p][0]
        elif isinstance(value, int):
            parts = _gather_rows(torch.tensor([value], device=device), world)
            for p in range(world):
                per_rank[p][f.name] = int(parts[p][0])
        elif isinstance(value, list):
            rows = torch.cat(value).to(device) if value else torch.empty(0, device=device)
            parts = _gather_rows(rows, world)
            for p in range(world):
                per_rank[p][f.name] = [parts[p].cpu()]
        else:  # pragma: no cover - states hold only these types
            raise TypeError(f"cannot gather field {f.name} of type {type(value).__name__}")
    return [type(state)(**fields) for fields in per_rank]


def merged(state, world: int):
    """The state of all processes merged in rank order (the state itself for one process)."""
    states = gather_states(state, world)
    out = states[0]
    for other in states[1:]:
        out.merge(other)
    return out


def gather_by_index(indices: torch.Tensor, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every process's per-point rows, gathered and ordered by data index.

    ``indices [n_p]`` and each ``rows [n_p, ...]`` hold this process's points; returns
    ``(indices [N], *rows [N, ...])`` on the CPU, sorted by index (one process: just sorted).
    """
    _, world = rank_world()
    tensors = (indices, *rows)
    if world > 1:
        device = process_state().device
        tensors = tuple(torch.cat(_gather_rows(t.to(device), world)).cpu() for t in tensors)
    order = tensors[0].argsort()
    return tuple(t[order] for t in tensors)
