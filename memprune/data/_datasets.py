"""Data sets whose items are ``(image, label, index)``.

``image`` is a float tensor ``[3, H, W]`` in ``[0, 1]`` (never normalized: normalization with the
encoder's mean/std happens inside scoring, after augmentation), ``label`` an int and ``index``
the item's position in the data set, so every score can be tied back to a data point.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from memprune.errors import ConfigError, DataError, DatasetNotFoundError, DataWarning

SPLITS = ("train", "test")

#: Seed and test fraction of the built-in digits split (fixed: results must be comparable).
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
DIGITS_SIZE = 32


class ImageDataset(Dataset):
    """Images held in memory as a float tensor ``[N, C, H, W]`` in ``[0, 1]`` with int labels.

    ``C`` may be 1 (gray images are expanded to 3 channels on access, without a copy).
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, name: str, classes: list[str]
    ) -> None:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise DataError(f"images must be [N, 1|3, H, W], got {tuple(images.shape)}")
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.name = name
        self.classes = classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self.images[index].expand(3, -1, -1), int(self.labels[index]), int(index)


class IndexedDataset(Dataset):
    """Items ``(image, label, index)`` from a data set whose items are ``(image, label)``, such
    as a ``TensorDataset`` or a torchvision data set with ``ToTensor`` (images in [0, 1])."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image, label = self.dataset[index]
        return image, int(label), index


class _TorchvisionDataset(Dataset):
    """Wraps a torchvision data set of PIL images into ``(image, label, index)`` items."""

    def __init__(self, base: Dataset, labels: torch.Tensor, name: str, img_size: int | None,
                 transform: Callable | None = None):  # fmt: skip
        from torchvision.transforms import v2

        self.base = base
        self.labels = labels.long()
        self.name = name
        self.classes = [str(c) for c in getattr(base, "classes", sorted(set(labels.tolist())))]
        if transform is not None:
            self.to_tensor = transform
            return
        steps = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        if img_size is not None:
            steps += [v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size)]
        self.to_tensor = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.base)

    #: (H, W) every image must have (a folder read at the images' own size), or None
    size: tuple[int, int] | None = None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image, label = self.base[index]
        image = self.to_tensor(image)
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        if self.size is not None and tuple(image.shape[-2:]) != self.size:
            where = getattr(self.base, "samples", None)
            name = where[index][0] if where else f"image {index}"
            raise DataError(
                f"{name} is {tuple(image.shape[-2:])} but the folder's first image is"
                f" {self.size}: pass img_size (CLI --img-size, data.img_size) to resize them"
                " all to one size"
            )
        return image, int(label), int(index)


def _load_digits(split: str, img_size: int | None, shift: bool = False) -> ImageDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8]
    size = img_size or DIGITS_SIZE
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.clamp_(0.0, 1.0)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=bunch.target,
    )
    idx = torch.from_numpy(np.sort(train_idx if split == "train" else test_idx))
    images = images[idx]
    if shift:
        from memprune.data._shifts import turn

        images = turn(images)
    name = "digits-shift" if shift else "digits"
    return ImageDataset(images.contiguous(), labels[idx], name, [str(i) for i in range(10)])


# Where torchvision expects each data set's files under ``root``, for the "not found" error.
_TV_FILES = {
    "cifar10": "cifar-10-batches-py/ (unpacked from cifar-10-python.tar.gz)",
    "cifar100": "cifar-100-python/ (unpacked from cifar-100-python.tar.gz)",
    "stl10": "stl10_binary/ (unpacked from stl10_binary.tar.gz)",
    "svhn": "train_32x32.mat and test_32x32.mat",
}


def _load_torchvision(
    name: str, split: str, root: str | None, download: bool, img_size: int | None, transform
) -> Dataset:
    import torchvision.datasets as tvd

    if root is None:
        raise ConfigError(
            f"data set {name!r} needs root=DIR, the folder holding {_TV_FILES[name]}"
            " (or pass download=True with internet access)"
        )
    train = split == "train"
    makers: dict[str, Callable[[], Dataset]] = {
        "cifar10": lambda: tvd.CIFAR10(root, train=train, download=download),
        "cifar100": lambda: tvd.CIFAR100(root, train=train, download=download),
        "stl10": lambda: tvd.STL10(root, split=split, download=download),
        "svhn": lambda: tvd.SVHN(root, split=split, download=download),
    }
    try:
        base = makers[name]()
    except RuntimeError as err:
        if "not found" in str(err).lower() or "download" in str(err).lower():
            raise DatasetNotFoundError(
                f"{name} files not found under {os.path.abspath(root)}: put {_TV_FILES[name]}"
                f" there, or pass download=True (needs internet)"
            ) from err
        raise
    targets = getattr(base, "targets", None)
    if targets is None:
        targets = base.labels
    labels = torch.as_tensor(np.asarray(targets))
    return _TorchvisionDataset(base, labels, name, img_size, transform)


#: PIL modes of 16-bit images: converted to RGB they would clip at 255 (all white)
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
#: the files an image folder reads (torchvision's, and GIF)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
                  ".gif")  # fmt: skip


def _read_image(path: str):
    """An image file as 8-bit RGB: 16-bit grayscale scaled from 0-65535 to 0-255 (PIL's own
    conversion clips it, every image white); 32-bit float images are refused (their range
    is not known)."""
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            img = Image.open(fh)
            img.load()
    except Exception as err:  # PIL raises many types for a bad file
        raise DataError(f"cannot read image {path}: {err}") from err
    if img.mode in WIDE_MODES:
        wide = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.round(wide.clip(0, 65535) / 257).astype(np.uint8), mode="L")
    elif img.mode == "F":
        raise DataError(
            f"image {path} holds 32-bit floats, whose range is not known: save it as an 8- or"
            " 16-bit image"
        )
    return img.convert("RGB")


def _load_folder(path: Path, split: str, img_size: int | None, transform) -> Dataset:
    import torchvision.datasets as tvd

    folder = path / split if (path / split).is_dir() else None
    if folder is None:
        if split == "test":
            raise DatasetNotFoundError(
                f"image folder {path} has no test/ subfolder: lay it out as {path}/train/CLASS/*"
                f" and {path}/test/CLASS/*, or use split='train' for the whole folder"
            )
        folder = path
    # classes are mapped by folder name across train/ and test/, so a split that lacks a class
    # does not shift the labels of the classes after it
    splits = [path / s for s in SPLITS if (path / s).is_dir()] if folder != path else [path]
    # hidden folders (.ipynb_checkpoints, .git) are not classes
    names = sorted({d.name for s in splits for d in s.iterdir()
                    if d.is_dir() and not d.name.startswith(".")})  # fmt: skip
    _warn_skipped(folder, names)

    class _Folder(tvd.ImageFolder):
        def find_classes(self, directory):
            if not names:
                raise FileNotFoundError(f"no class folders in {directory}")
            return names, {c: i for i, c in enumerate(names)}

    try:
        base = _Folder(str(folder), loader=_read_image, allow_empty=True,
                       is_valid_file=_is_image)  # fmt: skip
    except (FileNotFoundError, RuntimeError) as err:
        raise DatasetNotFoundError(
            f"no images in ImageFolder layout under {folder} (expected {folder}/CLASS/IMAGE): {err}"
        ) from err
    if len(base) == 0:
        raise DatasetNotFoundError(
            f"no images in ImageFolder layout under {folder} (expected {folder}/CLASS/IMAGE)"
        )
    data = _TorchvisionDataset(base, torch.as_tensor(base.targets), str(path), img_size, transform)
    if img_size is None and transform is None:  # images at their own size: one size for all
        data.size = tuple(data[0][0].shape[-2:])
    return data


def _is_image(path: str) -> bool:
    name = Path(path).name
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def _warn_skipped(folder: Path, classes: list[str]) -> None:
    """Say which files of the class folders are not read (not images by their suffix)."""
    skipped = [p for c in classes if (folder / c).is_dir() for p in (folder / c).rglob("*")
               if p.is_file() and not p.name.startswith(".") and not _is_image(str(p))]  # fmt: skip
    if skipped:
        warnings.warn(
            f"{folder}: {len(skipped)} files are not read, their suffix is not an image's"
            f" ({', '.join(IMAGE_SUFFIXES)}): {', '.join(str(p) for p in skipped[:3])}",
            DataWarning,
            stacklevel=4,
        )


BUILTIN = ("digits", "digits-shift", "toy")
TORCHVISION = tuple(_TV_FILES)


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset` (besides an image-folder path)."""
    return [*BUILTIN, *TORCHVISION]


def load_dataset(
    name: str = "digits",
    split: str = "train",
    root: str | os.PathLike | None = None,
    download: bool = False,
    img_size: int | None = None,
    transform: Callable | None = None,
    shift=None,
    **options,
) -> Dataset:
    """Load a data set whose items are ``(image [3, H, W] in [0, 1], label, index)``.

    Args:
        name: ``digits`` (built-in, offline: scikit-learn's 8x8 digits upsampled bilinearly to
            32x32 RGB, a fixed stratified 80/20 train/test split with seed 0: 1437/360 images),
            ``digits-shift`` (the same images and split, colour-inverted, turned a quarter
            counter-clockwise and tinted: the ``turn`` shift; a downstream task for
            encoders pretrained on ``digits``), ``toy`` (the synthetic signal/noise patch
            model, see :mod:`memprune.data._toy`; ``options``: ``size``, ``dim``, ``snr``,
            ``sigma``, ``redraw``, ``seed``; its ``augment`` keeps the signal and redraws the
            noise),
            ``cifar10``, ``cifar100``, ``stl10``, ``svhn`` (torchvision, read from ``root``), or
            the path of an image folder in ImageFolder layout (``PATH/CLASS/IMG`` or
            ``PATH/{train,test}/CLASS/IMG``).
        split: ``train`` or ``test``.
        root: folder holding a torchvision data set's files.
        download: let torchvision download missing files (needs internet).
        img_size: resize (shorter side) and centre-crop every image to this size; for digits,
            the size it is upsampled to (default 32); for toy, square images of this size
            (pixels repeated; a multiple of the patch width ``2 s``).
        transform: for torchvision and folder data, replaces the resize: a callable from a
            PIL image to a float tensor ``[C, H, W]`` in ``[0, 1]``, such as
            :func:`memprune.encoders.eval_transform` (the encoder's own eval preprocessing).
        shift: a distribution shift applied to the split (:mod:`memprune.data._shifts`):
            ``turn``, ``corrupt:CORRUPTION:SEVERITY``, ``subpopulation`` or ``relabel``, or a
            :class:`~memprune.data.Shift`. A ``subpopulation`` shift fits its styles on the
            train split, which is loaded for it.
    """
    if shift is not None:
        from memprune.data._shifts import Shift, shifted

        shift = Shift.parse(shift)
        kw = dict(root=root, download=download, img_size=img_size, transform=transform)
        data = load_dataset(name, split, **kw, **options)
        train = None
        if shift.kind == "subpopulation" and split != "train":
            train = load_dataset(name, "train", **kw, **options)
        return shifted(data, shift, split, train)
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    if img_size is not None and img_size < 1:
        raise ConfigError(f"img_size must be a positive int, got {img_size}")
    key = str(name).lower()
    if options and key != "toy":
        raise ConfigError(f"options {sorted(options)} are for the toy data set, not {name!r}")
    if key == "toy":
        from memprune.data._toy import make_toy

        try:
            return make_toy(split, img_size=img_size, **options)
        except TypeError as err:
            raise ConfigError(f"toy options: {err} (size, dim, snr, sigma, redraw, seed)") from err
    if key in BUILTIN:
        if transform is not None:
            raise ConfigError(f"{name!r} is made at its own size: pass img_size, not transform")
        return _load_digits(split, img_size, shift=key == "digits-shift")
    if img_size is not None and transform is not None:
        raise ConfigError("pass img_size or transform, not both: the transform sets the size")
    if key in _TV_FILES:
        return _load_torchvision(
            key, split, None if root is None else str(root), download, img_size, transform
        )
    path = Path(os.fspath(name)).expanduser()
    if path.is_dir():
        return _load_folder(path, split, img_size, transform)
    close = difflib.get_close_matches(key, available_datasets(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise DatasetNotFoundError(
        f"unknown data set {name!r}: use one of {', '.join(available_datasets())} or the path of"
        f" an existing image folder.{hint}"
    )


def native_size(name: str, img_size: int | None) -> int | None:
    """The size to load ``name`` at: ``img_size``, or None for the built-in data sets at their
    own size (digits at 32 px; the toy data set at its own unless a size is asked for
    explicitly: see :meth:`memprune.recipes._context.Context.dataset`)."""
    key = str(name).lower()
    if key == "toy" or (key in BUILTIN and img_size in (None, DIGITS_SIZE)):
        return None
    return img_size


def dataset_name(dataset: Dataset) -> str:
    """The name of a data set (through any ``Subset``), or its class name."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return getattr(dataset, "name", type(dataset).__name__)


def seeded_subset(dataset: Dataset, n_points: int | None, seed: int) -> Dataset:
    """``n_points`` points of ``dataset`` drawn by ``seed`` and kept in data order (all when
    ``n_points`` is None or not smaller than the data set)."""
    if n_points is None or n_points >= len(dataset):
        return dataset
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(dataset), generator=g)[:n_points]
    return torch.utils.data.Subset(dataset, sorted(picks.tolist()))
