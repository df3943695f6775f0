"""SimCLR pretraining of any timm backbone (Chen et al., "A Simple Framework for Contrastive
Learning of Visual Representations", ICML 2020), and the encoder pair f / g of docs/method.md §4."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from memprune._dist import rank_world
from memprune.data import (
    AugmentSpec,
    MultiView,
    Splits,
    augment_spec,
    dataset_name,
    describe_augment,
    make_splits,
)
from memprune.encoders import feature_dim, load_encoder
from memprune.errors import ConfigError
from memprune.train._common import (
    BATCH_SCOPES,
    Callback,
    TrainResult,
    check_batch,
    check_indices,
    epoch_seed,
    finished,
    resolve_mixed_precision,
    run_training,
    write_outputs,
)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5,
            gather: bool = False, ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """NT-Xent loss of two batches of projections ``[B, D]``: view ``i`` of ``z1`` must pick its
    positive ``i`` of ``z2`` (and back) among the other ``2B - 1`` views, by cosine similarity
    over ``temperature``; the mean over the ``2B`` views.

    ``ids [B]``: the data index of each point. Views of another copy of the same point (a
    canary repeated in one batch) are then left out of a view's negatives: as negatives they
    would push a point's views apart, the opposite of training on it more.

    ``gather`` (under many processes): the negatives are the views of every process's batch
    (all-gathered, the gradient flowing back to the process that made each view), and the
    loss the mean over this process's views. With equal batches per process, the mean of the
    processes' losses (which DDP's gradient averaging takes) is the one-process loss of the
    whole batch: SimCLR's large-batch training, as lightly and solo-learn gather."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ConfigError(
            f"nt_xent needs two [B, D] batches, got {tuple(z1.shape)}, {tuple(z2.shape)}"
        )
    b, rank, world = len(z1), 0, 1
    if gather and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if world > 1:
        from torch.distributed.nn.functional import all_gather

        z1, z2 = torch.cat(all_gather(z1.contiguous())), torch.cat(all_gather(z2.contiguous()))
        if ids is not None:
            parts = [torch.empty_like(ids) for _ in range(world)]
            torch.distributed.all_gather(parts, ids.contiguous())
            ids = torch.cat(parts)
    n = len(z1)  # the whole batch's points
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # [2N, D]
    mine = torch.cat([torch.arange(rank * b, (rank + 1) * b),
                      torch.arange(n + rank * b, n + (rank + 1) * b)]).to(z.device)  # fmt: skip
    sim = (z[mine] @ z.T) / temperature  # [2b, 2N]: this process's views against all
    columns = torch.arange(2 * n, device=z.device)[None]
    targets = torch.cat([mine[b:], mine[:b]])  # view i of z1 <-> view i of z2
    left_out = columns == mine[:, None]  # a view is not its own negative
    if ids is not None:
        both = torch.cat([ids, ids]).to(z.device)  # [2N]: the point each view is of
        copies = both[None] == both[mine][:, None]
        left_out |= copies & (columns != targets[:, None])  # other copies' views
    return F.cross_entropy(sim.masked_fill(left_out, float("-inf")), targets)


class _Copies(Dataset):
    """The training points ``dataset[indices]`` as items ``(image, index, view key)``.
    SimCLR needs no labels, so the label's place carries the point's data index (the ``ids``
    of :func:`nt_xent`). The ``c``-th copy of a point named more than once (a repeated canary)
    draws its views as data index ``index + c * len(dataset)`` would, so that its copies in
    one epoch are different views, not the same pair again; a point named once keeps its
    own index and its views."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, list(indices)
        seen: dict[int, int] = {}
        self.copy = []
        for i in self.indices:
            self.copy.append(seen.get(i, 0))
            seen[i] = self.copy[-1] + 1

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        item = self.dataset[self.indices[position]]
        if not (isinstance(item, (tuple, list)) and len(item) == 3):
            return item  # MultiView says what items must be
        image, _, index = item
        return image, int(index), int(index) + self.copy[position] * len(self.dataset)


class SimCLRNet(nn.Module):
    """Backbone + projection head (Linear-BN-ReLU-Linear); ``forward`` gives projections."""

    def __init__(self, encoder: nn.Module, proj_dim: int, hidden_dim: int | None = None):
        super().__init__()
        width = feature_dim(encoder)  # not num_features: see feature_dim
        hidden = hidden_dim or width
        self.encoder = encoder
        self.head = nn.Sequential(
            nn.Linear(width, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, proj_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def view_size(augment, img_size: int | None):
    """``augment`` with its views at the encoder's input size ``img_size``: a preset or
    mapping that names no ``size`` gets it, so images loaded larger (for random crops) give
    views the encoder takes. Without ``img_size`` (the model's default), a callable, ``none``
    or an explicit size, ``augment`` is kept: views then come at the images' own size."""
    spec = augment_spec(augment)
    if img_size is None or callable(spec) or spec["preset"] == "none" or spec.get("size"):
        return augment
    return {**spec, "size": img_size}


def pretrain_simclr(
    model_name: str,
    dataset: Dataset,
    indices: list[int] | None = None,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 1e-3,
    temperature: float = 0.5,
    proj_dim: int = 128,
    seed: int = 0,
    out_dir: str | os.PathLike = "runs/simclr",
    img_size: int | None = None,
    *,
    hidden_dim: int | None = None,
    weight_decay: float = 1e-6,
    augment: AugmentSpec = "simclr",
    mixed_precision: str = "auto",
    keep_checkpoints: bool = False,
    resume: bool = True,
    num_workers: int | None = None,
    progress: bool | None = None,
    callback: Callback | None = None,
    repeats: bool = False,
    batch_scope: str = "global",
    sync_bn: bool = False,
    **timm_kwargs,
) -> TrainResult:
    """Train ``model_name`` with SimCLR on ``dataset[indices]`` and save it to ``out_dir``.

    Two views per point from :class:`MultiView` (the epoch's views seeded by (seed, epoch)),
    NT-Xent with ``temperature`` on a ``proj_dim`` projection head, AdamW with a cosine
    schedule over epochs. Uses accelerate: the device, many processes under ``accelerate
    launch`` / ``torchrun``, ``mixed_precision`` ("no", "fp16", "bf16").

    Many processes: ``batch_size`` is the global batch, split evenly over them
    (``batch_scope="process"``: each process's), and NT-Xent takes its negatives from every
    process's views (gathered with their gradients), so that N processes take one process's
    steps on one process's batches and loss; ``sync_bn`` computes BatchNorm statistics over
    the global batch too (SimCLR's global BN). The card records the process count and the
    per-process batch.

    Writes ``encoder.safetensors`` (no projection head) and ``card.json``, which
    :func:`memprune.load_encoder` reads (``load_encoder(checkpoint=out_dir)``); checkpoints
    every epoch. With ``resume`` (default) an interrupted run continues where it stopped and
    ends with the same weights as an uninterrupted one; a finished run is loaded, not redone.
    ``callback(epoch, history)`` runs after each epoch's checkpoint. ``repeats``: ``indices``
    may name a point more than once (it is then trained on that many times per epoch: the
    repeated canaries of :func:`pretrain_pair`); otherwise a duplicate is an error.
    """
    out_dir = Path(out_dir)
    if (done := finished(out_dir, resume)) is not None:
        return done
    indices = check_indices(dataset, indices, batch_size, repeats)
    if batch_size < 2:
        raise ConfigError(
            f"batch_size={batch_size}: SimCLR needs at least 2 points per batch (the other points"
            " are each view's negatives; with one the loss is 0 and nothing is learned)"
        )
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    torch.manual_seed(seed)
    encoder = load_encoder(model_name, img_size=img_size, **timm_kwargs)
    augment = view_size(augment, img_size)
    config = {
        "method": "simclr", "model": model_name, "img_size": img_size, "timm_kwargs": timm_kwargs,
        "data": dataset_name(dataset), "n_train": len(indices), "epochs": epochs,
        "batch_size": batch_size, "lr": lr, "temperature": temperature, "proj_dim": proj_dim,
        "hidden_dim": hidden_dim, "weight_decay": weight_decay,
        "augment": describe_augment(augment), "seed": seed,
        "mixed_precision": resolve_mixed_precision(mixed_precision),
        "batch_scope": BATCH_SCOPES.check(batch_scope), "sync_bn": bool(sync_bn),
    }  # fmt: skip
    world = rank_world()[1]
    per_process = check_batch(batch_size, world, batch_scope)
    net = SimCLRNet(encoder, proj_dim, hidden_dim)
    train = _Copies(dataset, indices)

    def epoch_data(epoch: int) -> Dataset:
        return MultiView(train, 2, augment, seed=epoch_seed(seed, epoch))

    def loss_fn(model: nn.Module, x: torch.Tensor, ids) -> torch.Tensor:
        z = model(x).view(len(x) // 2, 2, -1)  # [B, 2, proj_dim]: the two views of each point
        return nt_xent(z[:, 0], z[:, 1], temperature, gather=True, ids=ids)

    history = run_training(
        net=net, encoder=encoder, loss_fn=loss_fn, epoch_data=epoch_data, epochs=epochs,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed, out_dir=out_dir,
        config=config, mixed_precision=mixed_precision, keep_checkpoints=keep_checkpoints,
        resume=resume, num_workers=num_workers, progress=progress, callback=callback,
        desc="SimCLR", batch_scope=batch_scope, sync_bn=sync_bn,
    )  # fmt: skip
    card = {**config, "processes": world, "batch_per_process": per_process}
    write_outputs(out_dir, encoder, {**card, "indices": indices, "history": history})
    return TrainResult(encoder, out_dir, history)


def pretrain_pair(
    model_name: str,
    dataset: Dataset,
    out_dir: str | os.PathLike,
    splits: Splits | None = None,
    shared: int | float = 0.5,
    candidate: int | float = 0.1,
    extra: int | float = 0.1,
    test: int | float = 0,
    split_seed: int = 0,
    **recipe,
) -> tuple[TrainResult, TrainResult, Splits]:
    """Train f on shared ∪ candidate and g on shared ∪ extra with the same recipe and seed.

    ``splits`` (or ``make_splits(len(dataset), shared, candidate, extra, test, split_seed)``)
    is saved as ``out_dir/splits.json``; f goes to ``out_dir/f``, g to ``out_dir/g``.
    ``recipe``: arguments of :func:`pretrain_simclr`.
    """
    out_dir = Path(out_dir)
    if splits is None:
        splits = make_splits(len(dataset), shared, candidate, extra, test, seed=split_seed)
    elif splits.n != len(dataset):
        raise ConfigError(f"splits are for {splits.n} points but the data set has {len(dataset)}")
    if not splits.candidate or not splits.extra:
        raise ConfigError("the pair needs non-empty candidate and extra sets")
    out_dir.mkdir(parents=True, exist_ok=True)
    splits.save(out_dir / "splits.json")
    f = pretrain_simclr(
        model_name,
        dataset,
        splits.f_training,
        out_dir=out_dir / "f",
        repeats=splits.repeat > 1,
        **recipe,
    )
    g = pretrain_simclr(model_name, dataset, splits.g_indices, out_dir=out_dir / "g", **recipe)
    return f, g, splits
