"""Supervised baselines: the same backbone trained with cross-entropy and a linear head.

Used for the SSL vs supervised comparisons (UnitMem vs ClassMem, CKA). ``random_labels``
replaces every training label with a fixed random one (seeded), the classic memorization
control (Zhang et al., "Understanding deep learning requires rethinking generalization").
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from memprune.data import (
    AugmentSpec,
    MultiView,
    augment_spec,
    dataset_labels,
    dataset_name,
    describe_augment,
)
from memprune.encoders import feature_dim, load_encoder
from memprune.train._common import (
    Callback,
    TrainResult,
    check_indices,
    derived_seed,
    epoch_seed,
    finished,
    resolve_mixed_precision,
    run_training,
    write_outputs,
)


class _Relabeled(Dataset):
    """Items of ``dataset`` with labels looked up in ``labels`` by data index."""

    def __init__(self, dataset: Dataset, labels: dict[int, int]):
        self.dataset, self.labels = dataset, labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int):
        image, _, index = self.dataset[position]
        return image, self.labels[int(index)], index


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feature_dim(encoder), n_classes)  # not num_features: see feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def train_supervised(
    model_name: str,
    dataset: Dataset,
    indices: list[int] | None = None,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    out_dir: str | os.PathLike = "runs/supervised",
    img_size: int | None = None,
    *,
    random_labels: bool = False,
    weight_decay: float = 5e-4,
    augment: AugmentSpec = "crop_flip",
    mixed_precision: str = "auto",
    keep_checkpoints: bool = False,
    resume: bool = True,
    num_workers: int | None = None,
    progress: bool | None = None,
    callback: Callback | None = None,
    **timm_kwargs,
) -> TrainResult:
    """Cross-entropy training of ``model_name`` + a linear head on ``dataset[indices]``.

    Saved like :func:`memprune.train.pretrain_simclr` (encoder weights without the head, a
    card, per-epoch checkpoints, exact resume). One view per point per epoch, by default
    ``crop_flip`` (crop and flip, no colour jitter).
    """
    out_dir = Path(out_dir)
    if (done := finished(out_dir, resume)) is not None:
        return done
    indices = check_indices(dataset, indices, batch_size)
    labels = dataset_labels(dataset)
    n_classes = int(labels.max()) + 1
    train = Subset(dataset, indices)
    if random_labels:
        g = torch.Generator().manual_seed(derived_seed(seed, 0x1ABE1))
        fake = torch.randint(0, n_classes, (len(indices),), generator=g).tolist()
        index_of = [int(train[p][2]) for p in range(len(train))]
        train = _Relabeled(train, dict(zip(index_of, fake)))
    config = {
        "method": "supervised", "model": model_name, "img_size": img_size,
        "timm_kwargs": timm_kwargs, "data": dataset_name(dataset), "n_train": len(indices),
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "random_labels": random_labels,
        "augment": describe_augment(augment, "crop_flip"), "seed": seed,
        "mixed_precision": resolve_mixed_precision(mixed_precision), "n_classes": n_classes,
    }  # fmt: skip
    torch.manual_seed(seed)
    encoder = load_encoder(model_name, img_size=img_size, **timm_kwargs)
    net = Classifier(encoder, n_classes)

    def epoch_data(epoch: int) -> Dataset:
        return MultiView(train, 1, augment_spec(augment, "crop_flip"), seed=epoch_seed(seed, epoch))

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    history = run_training(
        net=net, encoder=encoder, loss_fn=loss_fn, epoch_data=epoch_data, epochs=epochs,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed, out_dir=out_dir,
        config=config, mixed_precision=mixed_precision, keep_checkpoints=keep_checkpoints,
        resume=resume, num_workers=num_workers, progress=progress, callback=callback,
        desc="supervised",
    )  # fmt: skip
    write_outputs(out_dir, encoder, {**config, "indices": indices, "history": history})
    return TrainResult(encoder, out_dir, history)
