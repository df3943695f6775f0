"""Recovery after pruning: a short training of the pruned encoder, the same for every
strategy (docs/method.md §9b).

* ``distill`` (no labels): the pruned encoder (student) learns to reproduce the unpruned
  encoder's (teacher's) pooled output features, and optionally the pooled outputs of chosen
  intermediate modules, through a learned linear map wherever the widths differ;
* ``supervised``: cross-entropy with a linear head on labelled data;
* ``simclr``: the SSL objective again (NT-Xent of two views on a projection head). An encoder
  checkpoint holds no projection head, so a fresh one is trained alongside.

Training runs on :func:`memprune.train.run_training` (accelerate, mixed precision, resume from
``out_dir``); the maps and heads are dropped afterwards, so the result has the pruned
encoder's structure and saves with :func:`save_pruned`.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from memprune._io import write_json
from memprune.data import AugmentSpec, MultiView, augment_spec, dataset_labels, describe_augment
from memprune.encoders import evaluating, input_size
from memprune.errors import ConfigError, SiteError
from memprune.pruning._save import save_pruned
from memprune.registry import Registry
from memprune.train import (
    Classifier,
    SimCLRNet,
    TrainResult,
    epoch_seed,
    nt_xent,
    resolve_mixed_precision,
    run_training,
)

#: ``loss`` of ``distill``: how a student feature is compared with the teacher's.
DISTILL_LOSSES = Registry(
    "distillation loss",
    {
        "cosine": lambda s, t: 1 - F.cosine_similarity(s, t, dim=1).mean(),
        "mse": lambda s, t: F.mse_loss(s, t),
    },
)
RECOVERY_FILE = "recovery.json"


def _pool(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> spatial mean, ``[B, T, D]`` -> token mean, ``[B, D]`` as it is."""
    if x.ndim == 4:
        return x.mean(dim=(2, 3))
    if x.ndim == 3:
        return x.mean(dim=1)
    return x.flatten(1)


class _Taps:
    """Forward hooks keeping the pooled outputs (with their gradient) of named modules."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise SiteError(
                f"distill sites {missing} are not modules of this encoder; name modules of it"
                f" (e.g. {', '.join(list(n for n, _ in model.named_children())[:4])})"
            )
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [
            modules[n].register_forward_hook(
                lambda _m, _a, y, n=n: self.out.__setitem__(n, _pool(y))
            )
            for n in names
        ]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class _DistillNet(nn.Module):
    """Student + frozen teacher copy + one linear map per compared feature whose widths
    differ (identity where they match)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, sites: Sequence[str]):
        super().__init__()
        self.encoder, self.teacher = student, copy.deepcopy(teacher).eval()
        self.teacher.requires_grad_(False)
        self.sites = list(sites)
        self.taps = (_Taps(student, sites), _Taps(self.teacher, sites))
        param = next(student.parameters())
        x = torch.zeros(2, *input_size(student), device=param.device)
        with evaluating(student), torch.no_grad():
            widths = [(s.shape[1], t.shape[1]) for s, t in zip(*self._features(x), strict=True)]
        self.maps = nn.ModuleList(
            nn.Identity() if a == b else nn.Linear(a, b) for a, b in widths
        )  # fmt: skip

    def _features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        student = [self.encoder(x)]
        student += [self.taps[0].out[n] for n in self.sites]
        with torch.no_grad():
            teacher = [self.teacher(x)]
            teacher += [self.taps[1].out[n] for n in self.sites]
        return student, teacher

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        student, teacher = self._features(x)
        return [
            (m(s.float()), t.float()) for m, s, t in zip(self.maps, student, teacher, strict=True)
        ]


def _check(teacher, data, method, epochs, steps, sites, loss, batch_size) -> None:
    RECOVERY.check(method)
    DISTILL_LOSSES.check(loss)
    if method == "distill" and teacher is None:
        raise ConfigError(
            "method='distill' learns the unpruned encoder's features: pass teacher=<the encoder"
            " before pruning>, or use method='supervised' / 'simclr'"
        )
    if sites and method != "distill":
        raise ConfigError(f"sites= are distillation targets; method {method!r} uses none")
    if data is None or len(data) == 0:
        raise ConfigError("recover needs training data: data=<a data set of (image, label, index)>")
    if steps is None and (not isinstance(epochs, int) or epochs < 1):
        raise ConfigError(f"epochs must be an int >= 1 (or give steps=), got {epochs!r}")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"steps must be an int >= 1, got {steps!r}")
    if len(data) < batch_size:
        raise ConfigError(f"batch_size {batch_size} exceeds the {len(data)} training points")


def _setup(method, student, teacher, data, *, sites, loss, temperature, proj_dim):
    """The network to train, its loss, and each epoch's data set of views."""
    if method == "distill":
        net = _DistillNet(student, teacher, sites)
        compare = DISTILL_LOSSES[loss]

        def loss_fn(model, x, _y):
            return sum(compare(s, t) for s, t in model(x)) / len(net.maps)

        return net, loss_fn, 1
    if method == "supervised":
        net = Classifier(student, int(dataset_labels(data).max()) + 1)
        # standardized features before the head, as in fine-tuning (one lr for any scale)
        net.head = nn.Sequential(nn.BatchNorm1d(net.head.in_features, affine=False), net.head)
        return net, lambda model, x, y: F.cross_entropy(model(x), y), 1
    net = SimCLRNet(student, proj_dim)

    def simclr_loss(model, x, _y):
        z = model(x).view(len(x) // 2, 2, -1)
        return nt_xent(z[:, 0], z[:, 1], temperature)

    return net, simclr_loss, 2


#: ``method`` -> what the pruned encoder learns from.
RECOVERY = Registry(
    "recovery method",
    {"distill": "the unpruned encoder's features", "supervised": "labels, through a linear head",
     "simclr": "the SimCLR objective, on a fresh projection head"},
)  # fmt: skip


def recover(
    pruned: nn.Module,
    teacher: nn.Module | None = None,
    *,
    data: Dataset,
    method: str = "distill",
    epochs: int = 5,
    steps: int | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    augment: AugmentSpec | None = None,
    loss: str = "cosine",
    sites: Sequence[str] = (),
    temperature: float = 0.5,
    proj_dim: int = 128,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    mixed_precision: str = "auto",
    resume: bool = True,
    num_workers: int | None = None,
    progress: bool | None = None,
    inplace: bool = False,
) -> TrainResult:
    """Train a pruned encoder back towards its accuracy (every layer trains).

    Args:
        pruned: the encoder :func:`prune` returned (not modified unless ``inplace``).
        teacher: the encoder before pruning (``distill`` only; a frozen copy is used).
        data: training items ``(image, label, index)``; labels are read by ``supervised``
            only.
        method: ``distill`` (default), ``supervised`` or ``simclr``.
        epochs / steps: the budget: epochs over ``data``, or optimizer steps (per process).
        augment: views (default: ``crop_flip`` for distill and supervised, the ``simclr``
            preset for simclr).
        loss: ``cosine`` or ``mse`` between student and teacher features (``distill``).
        sites: module names (``["layer2", "layer3"]``) whose pooled outputs are also
            distilled, through a learned linear map where the pruned width differs.
        out_dir: where checkpoints go (an interrupted recovery resumes with ``resume``); the
            recovered encoder is saved there with :func:`save_pruned`, beside
            ``recovery.json`` (method, settings, loss history).

    Returns:
        A :class:`~memprune.train.TrainResult`: the recovered encoder (eval mode), its path
        (None without ``out_dir``) and the per-epoch mean loss.
    """
    _check(teacher, data, method, epochs, steps, sites, loss, batch_size)
    mixed_precision = resolve_mixed_precision(mixed_precision)
    student = pruned if inplace else copy.deepcopy(pruned)
    student.requires_grad_(True)
    preset = "simclr" if method == "simclr" else "crop_flip"  # a mapping's preset, too
    aug = augment_spec(preset if augment is None else augment, preset)
    torch.manual_seed(seed)
    net, loss_fn, n_views = _setup(method, student, teacher, data, sites=sites, loss=loss,
                                   temperature=temperature, proj_dim=proj_dim)  # fmt: skip
    config = {"method": method, "epochs": epochs, "steps": steps, "batch_size": batch_size,
              "lr": lr, "weight_decay": weight_decay, "augment": describe_augment(aug),
              "loss": loss if method == "distill" else None, "sites": list(sites),
              "seed": seed, "n_train": len(data), "mixed_precision": mixed_precision}  # fmt: skip

    def epoch_data(epoch: int) -> Dataset:
        return MultiView(data, n_views, aug, seed=epoch_seed(seed, epoch))

    def set_mode(model: nn.Module) -> None:
        model.train()
        if method == "distill":
            model.teacher.eval()  # the teacher's norms keep their statistics

    out = None if out_dir is None else Path(out_dir)
    try:
        history = run_training(
            net=net, encoder=student, loss_fn=loss_fn, epoch_data=epoch_data,
            epochs=epochs, max_steps=steps, batch_size=batch_size, lr=lr,
            weight_decay=weight_decay, seed=seed, out_dir=out, config=config,
            mixed_precision=mixed_precision, resume=resume, num_workers=num_workers,
            progress=progress, desc=f"recover ({method})", set_mode=set_mode,
        )  # fmt: skip
    finally:
        for taps in getattr(net, "taps", ()):
            taps.close()
    student.eval()
    if out is not None:
        save_pruned(student, out, overwrite=True)
        write_json(out / RECOVERY_FILE, {**config, "history": history})
    return TrainResult(student, out, history)


def recovery_fn(
    data: Dataset, teacher: nn.Module | None = None, method: str = "distill", **options
):
    """``fn(pruned, seed) -> recovered encoder``: :func:`recover` with these settings, for
    :func:`compare_pruning` (``fn.method`` names the method in its table)."""
    bad = sorted(set(options) & {"seed", "inplace", "out_dir", "resume"})
    if bad:
        raise ConfigError(f"recovery_fn() sets {bad} itself per run; leave them out")
    given = inspect.signature(recover).bind_partial(data=data, method=method, **options)
    given.apply_defaults()  # checked now, before a sweep prunes anything
    a = given.arguments
    _check(teacher, data, method, a["epochs"], a["steps"], a["sites"], a["loss"], a["batch_size"])

    def fn(pruned: nn.Module, seed: int) -> nn.Module:
        return recover(pruned, teacher, data=data, method=method, seed=seed, **options).encoder

    fn.method = method
    return fn
