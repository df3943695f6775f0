"""Distribution shifts of three families, made from any labelled data set (docs/method.md §10b).

Surgical fine-tuning (Lee et al., ICLR 2023) found that which layers are best to tune depends
on where the shift is: in the input, in the features, or in the labels. Each construction here
turns a data set's train and test splits into a fine-tuning task of one family:

* ``turn`` (input-level): every image colour-inverted, turned a quarter counter-clockwise and
  tinted by ``(1.0, 0.75, 0.45)`` (``digits-shift`` is ``digits`` under this shift);
* ``corrupt:<corruption>:<severity>`` (input-level, in the manner of CIFAR-10-C): one of
  :data:`CORRUPTIONS` at severity 1-5. ``gaussian_noise`` adds noise of standard deviation
  0.08 / 0.12 / 0.18 / 0.26 / 0.38 (seeded per image), ``blur`` a Gaussian blur of standard
  deviation 0.5 / 0.75 / 1 / 1.5 / 2 pixels per 32 pixels of image side, ``contrast`` scales
  each image about its mean by 0.4 / 0.3 / 0.2 / 0.1 / 0.05;
* ``subpopulation`` (feature-level, in the manner of BREEDS): the labels stay, but each class
  is split into two styles by k-means (two clusters of the class's train images, on 8x8
  grey thumbnails, seeded). Fine-tuning trains on the larger style of each class (the train
  split's) and is tested on the other style (the test split's): the classes are the same, the
  subpopulations are not;
* ``relabel`` (output-level, in the manner of CIFAR-Flip): the images stay and a seeded half of
  the classes (``fraction``) pass their labels round in a cycle, so every chosen class gets
  another's label. memprune fine-tunes with a fresh linear head, which can absorb any
  relabelling: on this family the question is whether a layer choice spends its budget where
  nothing needs to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from memprune.data._labels import dataset_labels
from memprune.errors import ConfigError
from memprune.registry import Registry

#: shift kind -> its family.
SHIFT_KINDS = Registry(
    "shift",
    {"turn": "input", "corrupt": "input", "subpopulation": "feature", "relabel": "output"},
)
FAMILIES = ("input", "feature", "output")
#: corruption -> its parameter at severities 1..5.
CORRUPTIONS = Registry(
    "corruption",
    {"gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38), "blur": (0.5, 0.75, 1.0, 1.5, 2.0),
     "contrast": (0.4, 0.3, 0.2, 0.1, 0.05)},
)  # fmt: skip
TURN_TINT = (1.0, 0.75, 0.45)


@dataclass(frozen=True)
class Shift:
    """One shift: ``kind`` (:data:`SHIFT_KINDS`) and its parameters; ``seed`` draws the noise,
    the styles' clustering and the relabelled classes."""

    kind: str
    corruption: str = "gaussian_noise"
    severity: int = 3
    fraction: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        SHIFT_KINDS.check(self.kind)
        CORRUPTIONS.check(self.corruption)
        if isinstance(self.severity, bool) or self.severity not in (1, 2, 3, 4, 5):
            raise ConfigError(f"shift severity must be 1-5, got {self.severity!r}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"relabel fraction must be in (0, 1], got {self.fraction!r}")

    @property
    def family(self) -> str:
        return SHIFT_KINDS[self.kind]

    @property
    def name(self) -> str:
        if self.kind == "corrupt":
            return f"corrupt:{self.corruption}:{self.severity}"
        return self.kind

    @classmethod
    def parse(cls, spec, seed: int = 0) -> Shift:
        """A :class:`Shift` from itself, a name such as ``corrupt:blur:2`` or a mapping of its
        fields."""
        if isinstance(spec, Shift):
            return spec
        if isinstance(spec, dict):
            return cls(**{"seed": seed, **spec})
        parts = str(spec).split(":")
        if parts[0] == "corrupt":
            if len(parts) != 3 or not parts[2].isdigit():
                raise ConfigError(
                    f"shift {spec!r}: write corrupt:CORRUPTION:SEVERITY, e.g."
                    f" corrupt:gaussian_noise:3 (corruptions: {', '.join(CORRUPTIONS)})"
                )
            return cls("corrupt", corruption=parts[1], severity=int(parts[2]), seed=seed)
        if len(parts) != 1:
            raise ConfigError(f"shift {spec!r}: only corrupt takes parameters after ':'")
        return cls(parts[0], seed=seed)


def turn(images: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` in [0, 1] -> inverted, turned a quarter counter-clockwise, tinted RGB."""
    tint = torch.tensor(TURN_TINT, dtype=images.dtype)[None, :, None, None]
    return torch.rot90(1.0 - images, k=1, dims=(2, 3)).expand(-1, 3, -1, -1) * tint


def corrupt(image: torch.Tensor, corruption: str, severity: int, seed: int) -> torch.Tensor:
    """One image ``[C, H, W]`` in [0, 1] under ``corruption`` at ``severity`` (noise drawn by
    ``seed``), clamped to [0, 1]."""
    c = CORRUPTIONS[corruption][severity - 1]
    if corruption == "gaussian_noise":
        g = torch.Generator().manual_seed(seed)
        out = image + c * torch.randn(image.shape, generator=g)
    elif corruption == "blur":
        sigma = c * image.shape[-1] / 32
        radius = max(1, math.ceil(3 * sigma))
        x = torch.arange(-radius, radius + 1, dtype=image.dtype)
        k = torch.exp(-(x**2) / (2 * sigma**2))
        k = k / k.sum()
        ch = image.shape[0]
        out = F.pad(image[None], (radius,) * 4, mode="reflect")
        out = F.conv2d(out, k.view(1, 1, 1, -1).expand(ch, 1, 1, -1), groups=ch)
        out = F.conv2d(out, k.view(1, 1, -1, 1).expand(ch, 1, -1, 1), groups=ch)[0]
    else:
        mean = image.mean()
        out = (image - mean) * c + mean
    return out.clamp(0.0, 1.0)


def _labels(dataset: Dataset) -> torch.Tensor:
    return dataset_labels(dataset).long()


def styles(train: Dataset, seed: int = 0) -> tuple[dict[int, object], dict[int, int]]:
    """Per class of ``train``: a 2-means model of its images' 8x8 grey thumbnails, and which of
    its two clusters is the source style (the larger; the smaller label on a tie)."""
    from sklearn.cluster import KMeans

    labels = _labels(train)
    models, source = {}, {}
    for c in sorted(set(labels.tolist())):
        idx = (labels == c).nonzero().flatten().tolist()
        if len(idx) < 4:
            raise ConfigError(
                f"subpopulation shift: class {c} has {len(idx)} training images; each class"
                " needs at least 4 to split into two styles"
            )
        x = torch.stack([_thumb(train[i][0]) for i in idx]).numpy()
        km = KMeans(n_clusters=2, n_init=4, random_state=seed).fit(x)
        counts = torch.bincount(torch.as_tensor(km.labels_), minlength=2)
        models[c], source[c] = km, int(torch.argmax(counts))
    return models, source


def _thumb(image: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(image).float().mean(0, keepdim=True)[None]
    return F.adaptive_avg_pool2d(x, 8).flatten()


def relabel_map(classes: list[int], fraction: float, seed: int) -> dict[int, int]:
    """A seeded ``fraction`` of ``classes`` (at least 2) each take the next one's label, in a
    cycle; the others keep theirs."""
    n = max(2, round(fraction * len(classes)))
    if len(classes) < 2:
        raise ConfigError("relabel shift: the data set needs at least 2 classes")
    g = torch.Generator().manual_seed(seed)
    chosen = [classes[i] for i in torch.randperm(len(classes), generator=g)[:n].tolist()]
    mapping = {c: c for c in classes}
    for a, b in zip(chosen, chosen[1:] + chosen[:1]):
        mapping[a] = b
    return mapping


class Shifted(Dataset):
    """``dataset`` (one split) under ``shift``: items ``(image, label, index)`` with the index
    the item's position here. ``train`` is the same data set's train split (the styles of a
    ``subpopulation`` shift are fitted on it; pass the train split itself or None there)."""

    def __init__(self, dataset: Dataset, shift: Shift, split: str, train: Dataset | None = None):
        self.base, self.shift, self.split = dataset, shift, split
        base_name = getattr(dataset, "name", type(dataset).__name__)
        self.name = f"{base_name}+{shift.name}"
        self.classes = getattr(dataset, "classes", None)
        labels = _labels(dataset)
        self.positions = list(range(len(dataset)))
        self.mapping = None
        if shift.kind == "subpopulation":
            models, source = styles(dataset if train is None else train, shift.seed)
            keep_source = split == "train"
            self.positions = []
            for i in range(len(dataset)):
                c = int(labels[i])
                if c not in models:
                    continue
                style = int(models[c].predict(_thumb(dataset[i][0])[None].numpy())[0])
                if (style == source[c]) == keep_source:
                    self.positions.append(i)
            if not self.positions:
                raise ConfigError(f"subpopulation shift: the {split} split has no image left")
        elif shift.kind == "relabel":
            classes = sorted(set(labels.tolist()))
            self.mapping = relabel_map(classes, shift.fraction, shift.seed)
        kept = labels[torch.as_tensor(self.positions, dtype=torch.long)]
        if self.mapping is not None:
            kept = torch.tensor([self.mapping[int(c)] for c in kept.tolist()])
        self.labels = kept.long()

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int):
        pos = self.positions[index]
        image = torch.as_tensor(self.base[pos][0]).float()
        s = self.shift
        if s.kind == "turn":
            image = turn(image[None])[0]
        elif s.kind == "corrupt":  # the noise of image pos, split and seed, every time
            seed = (s.seed * 1_000_003 + pos) * 2 + (self.split == "test")
            image = corrupt(image, s.corruption, s.severity, seed)
        return image, int(self.labels[index]), int(index)


def shifted(dataset: Dataset, shift, split: str, train: Dataset | None = None,
            seed: int = 0) -> Shifted:  # fmt: skip
    """``dataset`` under ``shift`` (a :class:`Shift`, its name or its fields; module
    docstring). ``split`` says which side of a ``subpopulation`` shift this is."""
    return Shifted(dataset, Shift.parse(shift, seed), split, train)
