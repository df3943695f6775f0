"""Data sets, reproducible multi-view augmentation and splits."""

from memprune.data._augment import (
    AUGMENTS,
    CROP_FLIP,
    AugmentSpec,
    MultiView,
    SimCLRAugment,
    augment_spec,
    describe_augment,
    make_augment,
    view_generator,
)
from memprune.data._datasets import (
    BUILTIN,
    ImageDataset,
    IndexedDataset,
    available_datasets,
    dataset_labels,
    dataset_name,
    load_dataset,
    native_size,
    seeded_subset,
)
from memprune.data._splits import PARTS, SETS, Splits, make_splits, read_indices

__all__ = [
    "AUGMENTS",
    "BUILTIN",
    "CROP_FLIP",
    "PARTS",
    "SETS",
    "AugmentSpec",
    "ImageDataset",
    "IndexedDataset",
    "MultiView",
    "SimCLRAugment",
    "Splits",
    "augment_spec",
    "available_datasets",
    "dataset_labels",
    "dataset_name",
    "describe_augment",
    "load_dataset",
    "make_augment",
    "make_splits",
    "native_size",
    "read_indices",
    "seeded_subset",
    "view_generator",
]
