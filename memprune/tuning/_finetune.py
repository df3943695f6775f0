"""Fine-tune chosen layers (or units) plus a linear head; everything else frozen.

The protocol is docs/method.md §10.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from memprune.data import AugmentSpec, MultiView, augment_spec, dataset_labels, describe_augment
from memprune.encoders import evaluating
from memprune.engine import Normalizer, resolve_normalize
from memprune.errors import ConfigError
from memprune.results import Result
from memprune.train import Classifier, epoch_seed, run_training
from memprune.tuning._select import LayerSelection, layer_modules, layer_parameters, unit_parameters


@dataclass
class FinetuneResult(Result):
    """Test accuracy at the epoch chosen on validation, and how training went.

    ``val_accuracy[e]`` / ``train_loss[e]`` are per epoch (``best_epoch`` is 1-based);
    ``trained`` names the encoder parameters that were trained (the head always is). The head
    is ``BatchNorm1d(affine=False)`` then ``Linear``: linear at test time (a standardization
    of the features by their training statistics, then the classifier).
    """

    kind = "finetune"
    accuracy: float
    best_epoch: int
    val_accuracy: list[float]
    train_loss: list[float]
    encoder: nn.Module
    head: nn.Module
    layers: list[str]
    trained: list[str]
    meta: dict = field(default_factory=dict)
    #: the head's weights, filled by :meth:`load` (a loaded result has no modules)
    head_state: dict = field(default_factory=dict, repr=False)

    def to_rows(self) -> list[dict]:
        """One row per epoch: training loss and validation accuracy (the best one marked)."""
        return [
            {
                "epoch": e + 1,
                "train_loss": loss,
                "val_accuracy": acc,
                "best": e + 1 == self.best_epoch,
            }
            for e, (loss, acc) in enumerate(zip(self.train_loss, self.val_accuracy))
        ]

    def _tensors(self) -> dict[str, torch.Tensor]:
        """The head's weights (the encoder is saved with its own tools, e.g. save_pruned)."""
        return {f"head.{k}": v for k, v in self.head.state_dict().items()}

    def _fields(self) -> dict:
        return {"accuracy": self.accuracy, "best_epoch": self.best_epoch,
                "val_accuracy": self.val_accuracy, "train_loss": self.train_loss,
                "layers": self.layers, "trained": self.trained}  # fmt: skip

    @classmethod
    def _build(cls, t, fields, meta):
        """Scores, curves and the head's weights (as tensors); ``encoder`` and ``head`` are
        None: a saved result does not rebuild models."""
        head = {k.removeprefix("head."): v for k, v in t.items()}
        return cls(encoder=None, head=None, meta=meta, head_state=head, **fields)


def split_validation(train: Dataset, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """A seeded stratified ``fraction`` of ``train`` as validation, the rest to train on."""
    from memprune.probe import validation_split

    if not 0 < fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {fraction}")
    fit, val = validation_split(dataset_labels(train), fraction, seed,
                                "fine-tuning keeps its best epoch", "pass a validation split"
                                " (val=...; a data set's own val split)")  # fmt: skip
    return Subset(train, sorted(fit.tolist())), Subset(train, sorted(val.tolist()))


@torch.no_grad()
def accuracy(net: nn.Module, data: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``net`` (encoder + head) on un-augmented, normalized images."""
    device = next(net.parameters()).device
    norm = Normalizer(resolve_normalize(net.encoder, "auto"), device)
    correct = total = 0
    with evaluating(net):
        for images, labels, _ in DataLoader(data, batch_size=batch_size):
            pred = net(norm(images.to(device))).argmax(dim=1).cpu()
            correct += int((pred == labels).sum())
            total += len(labels)
    return correct / max(total, 1)


def _layer_names(encoder: nn.Module, layers) -> list[str]:
    if isinstance(layers, LayerSelection):
        return list(layers.layers)
    if layers == "all":
        return list(layer_modules(encoder))
    if isinstance(layers, str):
        return [layers]
    return list(layers or [])


def _train(encoder, masks, train_modules, train, val, test, *, epochs, lr, batch_size,
           augment, weight_decay, val_fraction, seed, mixed_precision, num_workers, progress,
           layers, desc) -> FinetuneResult:  # fmt: skip
    """Train ``masks``' parameters (a mask limits which entries change) and a linear head."""
    if val is None:
        train, val = split_validation(train, val_fraction, seed)
    if batch_size < 2:
        raise ConfigError(
            f"batch_size {batch_size}: the head standardizes each batch's features (BatchNorm),"
            " which takes at least 2 points: use a batch_size of 2 or more"
        )
    if len(train) < batch_size:
        raise ConfigError(
            f"batch_size {batch_size} exceeds the {len(train)} training points: lower it"
        )
    n_classes = int(max(dataset_labels(train).max(), dataset_labels(val).max())) + 1
    for p in encoder.parameters():
        p.requires_grad_(False)
    params = dict(encoder.named_parameters())
    hooks = []
    for name, mask in masks.items():
        params[name].requires_grad_(True)
        if mask is not None:  # only the chosen units' entries get a gradient
            m = mask.to(params[name].device, params[name].dtype)
            hooks.append(params[name].register_hook(lambda g, m=m: g * m.to(g.device)))
    torch.manual_seed(seed)
    net = Classifier(encoder, n_classes)
    # standardize features before the linear head (MAE's linear-probe practice): the head
    # then learns at one learning rate whatever the encoder's feature scale
    net.head = nn.Sequential(nn.BatchNorm1d(net.head.in_features, affine=False), net.head)
    modules = dict(encoder.named_modules())

    def set_mode(model: nn.Module) -> None:  # frozen norms keep their statistics
        model.eval()
        model.head.train()
        for name in train_modules:  # one by one: a chosen module's own flag only
            modules[name].training = True

    aug = augment_spec(augment, "crop_flip")

    def epoch_data(epoch: int) -> Dataset:
        return MultiView(train, 1, aug, seed=epoch_seed(seed, epoch))

    best = {"acc": -1.0, "epoch": 0, "state": None}
    val_curve: list[float] = []

    def after_epoch(epoch: int, _history) -> None:
        acc = accuracy(net, val)
        val_curve.append(acc)
        if acc > best["acc"]:  # ties keep the earlier epoch
            state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            best.update(acc=acc, epoch=epoch + 1, state=state)

    try:
        history = run_training(
            net=net, encoder=encoder, epochs=epochs, batch_size=batch_size, lr=lr,
            loss_fn=lambda model, x, y: F.cross_entropy(model(x), y), epoch_data=epoch_data,
            weight_decay=weight_decay, seed=seed, out_dir=None, config={},
            mixed_precision=mixed_precision, num_workers=num_workers, progress=progress,
            callback=after_epoch, desc=desc, set_mode=set_mode,
        )  # fmt: skip
    finally:
        for h in hooks:
            h.remove()
    net.load_state_dict(best["state"])
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    test_acc = accuracy(net, test)
    return FinetuneResult(
        accuracy=test_acc, best_epoch=best["epoch"], val_accuracy=val_curve,
        train_loss=history, encoder=encoder, head=net.head, layers=layers,
        trained=sorted(masks),
        meta={"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
              "weight_decay": weight_decay, "n_train": len(train), "n_val": len(val),
              "n_test": len(test), "augment": describe_augment(aug)},
    )  # fmt: skip


def finetune(
    encoder: nn.Module,
    layers,
    train: Dataset,
    val: Dataset | None,
    test: Dataset,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    augment: AugmentSpec = "crop_flip",
    weight_decay: float = 1e-4,
    val_fraction: float = 0.2,
    seed: int = 0,
    mixed_precision: str = "auto",
    num_workers: int | None = None,
    progress: bool | None = None,
    inplace: bool = False,
) -> FinetuneResult:
    """Train the parameters of ``layers`` and a linear head with cross-entropy on ``train``.

    Every other encoder parameter is frozen, and every module outside the chosen layers stays
    in eval mode (its norm statistics do not move; norms inside the chosen layers train).
    accelerate places the model (GPU when present, many processes under ``accelerate launch``,
    ``mixed_precision``). After each epoch the validation accuracy is measured; the best
    epoch's weights are restored and the test set is scored once.

    Args:
        encoder: the pretrained encoder (a copy is trained unless ``inplace``).
        layers: a :class:`LayerSelection`, layer site names, ``"all"``, or ``[]`` (only the
            head: a linear probe trained by SGD with the same budget).
        train, val, test: ``(image, label, index)`` data sets; ``val=None`` carves a seeded
            stratified ``val_fraction`` of ``train``.
        epochs, lr, batch_size, weight_decay: AdamW with a per-epoch cosine schedule.
        augment: ``crop_flip`` (default: crop and flip, no colour jitter), a mapping of its
            parameters, ``"none"``, another preset or a callable.
        seed: head initialization, batches, augmentation and the validation split.
    """
    encoder = encoder if inplace else copy.deepcopy(encoder)
    names = _layer_names(encoder, layers)
    owned = layer_parameters(encoder, names)  # checks the names
    modules = [m for mods in layer_modules(encoder, names).values() for m in mods]
    run = dict(epochs=epochs, lr=lr, batch_size=batch_size, augment=augment,
               val_fraction=val_fraction, seed=seed, mixed_precision=mixed_precision,
               num_workers=num_workers, progress=progress)  # fmt: skip
    return _train(encoder, dict.fromkeys(owned), modules, train, val, test, **run,
                  weight_decay=weight_decay, layers=names, desc="finetune")  # fmt: skip


def finetune_units(
    encoder: nn.Module,
    units: dict[str, list[int]],
    train: Dataset,
    val: Dataset | None,
    test: Dataset,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    augment: AugmentSpec = "crop_flip",
    val_fraction: float = 0.2,
    seed: int = 0,
    mixed_precision: str = "auto",
    num_workers: int | None = None,
    progress: bool | None = None,
    inplace: bool = False,
) -> FinetuneResult:
    """Fine-tune only the chosen units ``{unit site: unit indices}`` plus a linear head.

    A unit's parameters are its row in the module producing the site's units (a norm's weight
    and bias and the conv row before it; an MLP's ``fc1`` row and bias). Gradient masks zero
    every other entry's gradient, weight decay is off and every norm stays in eval mode, so
    every unselected unit's parameters (and all norm statistics) stay bit-identical.
    """
    encoder = encoder if inplace else copy.deepcopy(encoder)
    masks = {name: mask for name, (_, mask) in unit_parameters(encoder, units).items()}
    run = dict(epochs=epochs, lr=lr, batch_size=batch_size, augment=augment,
               val_fraction=val_fraction, seed=seed, mixed_precision=mixed_precision,
               num_workers=num_workers, progress=progress)  # fmt: skip
    return _train(encoder, masks, [], train, val, test, **run, weight_decay=0.0,
                  layers=list(units), desc="finetune units")  # fmt: skip
