"""What SimCLR and supervised training share: seeds, loaders, checkpoints, the encoder card.

A training run writes into ``out_dir``:

* ``encoder.safetensors``: the backbone's weights (no projection or classification head);
* ``card.json``: model name, image size, timm arguments, data set, training indices,
  hyperparameters, seed, loss history and package versions; :func:`memprune.load_encoder`
  rebuilds the encoder from it (``load_encoder(checkpoint=out_dir)``);
* ``checkpoints/last.pt``: everything needed to resume (weights, heads, optimizer,
  scheduler, epoch), saved at the end of every epoch and read back with
  ``weights_only=True``; with ``keep_checkpoints``, ``checkpoints/epoch_NNN.safetensors``
  keeps every epoch's encoder too.

Every random choice of an epoch (data order and views) comes from ``(seed, epoch)``, so a run
resumed after an interruption gives the same weights as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from memprune._dist import agree
from memprune._io import atomic_write, package_versions, write_json, write_safetensors
from memprune.checkpoints import CARD, CARD_FORMAT, WEIGHTS, read_card
from memprune.data import loop_views
from memprune.encoders import load_encoder
from memprune.engine import Normalizer, loader_options, resolve_normalize, uses_channels_last
from memprune.errors import ConfigError
from memprune.registry import Registry

LAST = "checkpoints/last.pt"
#: ``mixed_precision``: accelerate's modes, and ``auto``: bf16 on a CUDA device that supports
#: it, else none (:func:`resolve_mixed_precision`).
MIXED_PRECISION = Registry(
    "mixed precision", {"auto": "auto", "no": "no", "fp16": "fp16", "bf16": "bf16"}
)


def resolve_mixed_precision(mixed_precision: str) -> str:
    """``auto`` made concrete for this machine (what configs and cards record, so a run
    resumes only with what it really ran in); other modes as they are."""
    if MIXED_PRECISION.check(mixed_precision) != "auto":
        return mixed_precision
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "bf16" if bf16 else "no"


def derived_seed(seed: int, *keys: int) -> int:
    """A seed mixed from ``seed`` and ``keys`` (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for one epoch's views and order."""
    return derived_seed(seed, epoch, 0x5EED)


def epoch_loader(data: Dataset, batch_size: int, seed: int, epoch: int, num_workers: int = 0):
    """A shuffled loader whose order depends only on (seed, epoch); last partial batch dropped."""
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return DataLoader(
        data, batch_size=batch_size, sampler=RandomSampler(data, generator=g),
        num_workers=num_workers, drop_last=True,
    )  # fmt: skip


def check_indices(dataset: Dataset, indices: Sequence[int] | None, batch_size: int,
                  repeats: bool = False) -> list[int]:  # fmt: skip
    """The training indices, checked; ``repeats``: a point may appear more than once."""
    indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    if not indices:
        raise ConfigError("no training points: indices is empty")
    bad = [i for i in indices if not 0 <= i < len(dataset)]
    if bad:
        raise ConfigError(f"indices {bad[:5]} are outside the data set of {len(dataset)} points")
    if not repeats and len(set(indices)) != len(indices):
        raise ConfigError("indices hold duplicates; each training point must appear once")
    if batch_size > len(indices):
        raise ConfigError(f"batch_size={batch_size} exceeds the {len(indices)} training points")
    return indices


@dataclass
class TrainResult:
    """A trained encoder (eval mode), where it was saved, and the per-epoch mean loss."""

    encoder: nn.Module
    path: Path | None
    history: list[float] = field(default_factory=list)


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def write_outputs(out_dir: Path, encoder: nn.Module, card: dict) -> None:
    """The encoder's weights, then its card (the card marks the run finished)."""
    write_safetensors(out_dir / WEIGHTS, encoder.state_dict())
    write_json(out_dir / CARD, {"format": CARD_FORMAT, **card, "versions": package_versions()})


def finished(out_dir: Path, resume: bool) -> TrainResult | None:
    """The finished run in ``out_dir`` (loaded when ``resume``, an error otherwise), or None."""
    if not agree((out_dir / CARD).is_file()):  # the main process, which writes it, decides
        return None
    if not resume:
        raise ConfigError(f"{out_dir} already holds a trained encoder: choose another out_dir")
    card, _ = read_card(out_dir)
    return TrainResult(load_encoder(checkpoint=out_dir), out_dir, card.get("history", []))


Callback = Callable[[int, list[float]], None]


#: ``batch_scope``: what ``batch_size`` counts under many processes.
BATCH_SCOPES = Registry("batch scope", {
    "global": "the batch of all processes together, split evenly among them (one process's"
              " steps, whatever the process count)",
    "process": "each process's own batch (the global batch grows with the process count)",
})  # fmt: skip


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int,
                  scope: str = "global"):  # fmt: skip
    """This process's batches (position lists) of one epoch, from a permutation seeded by
    (seed, epoch) cut into full batches of ``batch_size``. ``global``: each batch split into
    ``world`` equal parts, this process taking part ``rank`` (the one-process batches and
    steps for any ``world``; ``batch_size`` must split evenly); ``process``: whole batches
    dealt round-robin, every process getting as many."""
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    perm = torch.randperm(n, generator=g).tolist()
    batches = [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    if BATCH_SCOPES.check(scope) == "global":
        part = batch_size // world
        return [b[rank * part : (rank + 1) * part] for b in batches]
    batches = batches[: len(batches) - len(batches) % world] if world > 1 else batches
    return batches[rank::world]


def check_batch(batch_size: int, world: int, scope: str) -> int:
    """The per-process batch of ``batch_size`` under ``scope`` (refused where a global batch
    does not split evenly over the processes)."""
    if BATCH_SCOPES.check(scope) == "process":
        return batch_size
    if batch_size % world:
        raise ConfigError(
            f"batch_size {batch_size} is the global batch and does not split evenly over"
            f" {world} processes: use a multiple of {world}, or batch_scope 'process' for"
            f" {batch_size} points per process"
        )
    return batch_size // world


def _resume(last: Path, config: dict, net, opt, sched) -> tuple[int, list[float]]:
    """Load the state of ``last`` into the net, optimizer and schedule (refusing a checkpoint
    written with other settings); the epoch to start at and the loss history so far."""
    ckpt = load_checkpoint(last)
    if ckpt["config"] != config:
        changed = sorted(
            k for k in {*config, *ckpt["config"]} if config.get(k) != ckpt["config"].get(k)
        )
        raise ConfigError(
            f"{last} was written with other settings ({', '.join(changed)}): use a new out_dir,"
            " or resume=False to start over"
        )
    net.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    return ckpt["epoch"] + 1, list(ckpt["history"])


def _epochs_for(max_steps: int, n: int, batch_size: int, seed: int, rank: int, world: int,
                scope: str) -> int:  # fmt: skip
    """The epochs ``max_steps`` optimizer steps take (the last one cut short)."""
    per_epoch = len(epoch_batches(n, batch_size, seed, 0, rank, world, scope))
    if max_steps < 1 or per_epoch < 1:
        raise ConfigError(
            f"need max_steps >= 1 and at least one full batch per process; got max_steps="
            f"{max_steps}, {per_epoch} batches of {batch_size} per epoch"
        )
    return -(-max_steps // per_epoch)


def run_training(
    *,
    net: nn.Module,
    encoder: nn.Module,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    epoch_data: Callable[[int], Dataset],
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    out_dir: Path | None,
    config: dict,
    mixed_precision: str = "auto",
    keep_checkpoints: bool = False,
    resume: bool = True,
    num_workers: int | None = None,
    progress: bool | None = None,
    callback: Callback | None = None,
    desc: str = "train",
    set_mode: Callable[[nn.Module], None] | None = None,
    max_steps: int | None = None,
    views: str = "auto",
    batch_scope: str = "global",
    sync_bn: bool = False,
) -> list[float]:
    """Train ``net`` (encoder + head) with AdamW and a per-epoch cosine schedule.

    ``epoch_data(epoch)`` gives the epoch's data set of ``(views, label, index)`` items;
    ``loss_fn(net, x, labels)`` the loss of a normalized batch. accelerate places the model,
    wraps it for many processes and runs mixed precision. Checkpoints every epoch; with
    ``resume`` a run continues from ``checkpoints/last.pt`` when its config matches.
    ``out_dir=None`` keeps no checkpoints (no resume). Only parameters with ``requires_grad``
    are optimized; ``set_mode(net)`` replaces ``net.train()`` at the start of every epoch (to
    keep frozen norms in eval mode). ``max_steps`` (optimizer steps per process) replaces
    ``epochs`` as the budget: as many epochs as it takes, the last one cut short (the cosine
    schedule spans those epochs). ``views``: where the augmented views are made (``auto``: in
    batches on a CUDA device for the built-in augmentations; :data:`memprune.data.VIEW_PLACES`).
    ``batch_scope`` (:data:`BATCH_SCOPES`): ``batch_size`` is the global batch, split evenly
    over the processes (default), or each process's. ``sync_bn``: BatchNorm statistics over
    the global batch (:func:`memprune.train._syncbn.sync_batchnorm`), as one process computes
    them; otherwise each process normalizes with its own part.
    Returns the per-epoch mean loss.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(mixed_precision),
                              cpu=not torch.cuda.is_available())  # fmt: skip
    rank, world = accelerator.process_index, accelerator.num_processes
    check_batch(batch_size, world, batch_scope)
    if max_steps is not None:
        n = len(epoch_data(0))
        epochs = _epochs_for(max_steps, n, batch_size, seed, rank, world, batch_scope)
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ConfigError(
            f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}"
        )
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    start, history = 0, []
    last = None if out_dir is None else out_dir / LAST
    if last is not None and resume and agree(last.is_file()):
        start, history = _resume(last, config, net, opt, sched)
    nhwc = uses_channels_last(net, accelerator.device)
    if nhwc:  # a CNN on CUDA: cuDNN's NHWC kernels (weights are saved contiguous)
        net.to(memory_format=torch.channels_last)
    restore = None
    if sync_bn and world > 1:  # the synced modules share the parameters the optimizer holds
        from memprune.train._syncbn import sync_batchnorm

        restore = sync_batchnorm(net, accelerator.device)
    model, opt = accelerator.prepare(net, opt)
    norm = Normalizer(resolve_normalize(encoder, "auto"), accelerator.device)
    loading = loader_options(accelerator.device, num_workers)
    for epoch in range(start, epochs):
        data, make_views = loop_views(epoch_data(epoch), accelerator.device, views)
        batches = epoch_batches(len(data), batch_size, seed, epoch, rank, world, batch_scope)
        if max_steps is not None:
            batches = batches[: max_steps - epoch * len(batches)]
        loader = DataLoader(data, batch_sampler=batches, **loading)
        if set_mode is None:
            model.train()
        else:
            set_mode(accelerator.unwrap_model(model))
        losses = []
        disable = True if rank else (None if progress is None else not progress)
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{epochs}", disable=disable, leave=False)
        for batch, labels, _ in bar:
            x = norm(make_views(batch))  # [B*K, 3, H, W] on the device
            x = x.contiguous(memory_format=torch.channels_last) if nhwc else x
            with accelerator.autocast():
                loss = loss_fn(model, x, labels.to(accelerator.device))
            opt.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            opt.step()
            losses.append(loss.detach())
            bar.set_postfix(loss=f"{loss.item():.4f}")
        sched.step()
        history.append(float(accelerator.reduce(torch.stack(losses).mean(), "mean")))
        if accelerator.is_main_process and last is not None:
            state = {"model": accelerator.unwrap_model(model).state_dict(),
                     "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "epoch": epoch, "history": history, "config": config}  # fmt: skip
            save_checkpoint(last, state)
            if keep_checkpoints:
                path = out_dir / f"checkpoints/epoch_{epoch:03d}.safetensors"
                write_safetensors(path, encoder.state_dict())
        accelerator.wait_for_everyone()
        if callback is not None:
            callback(epoch, history)
    if nhwc:
        net.to(memory_format=torch.contiguous_format)
    if restore is not None:
        restore()
    encoder.eval()
    return history
