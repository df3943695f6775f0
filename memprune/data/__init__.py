"""Data sets, reproducible multi-view augmentation and splits."""

from memprune.data._augment import MultiView, SimCLRAugment, make_augment, view_generator
from memprune.data._datasets import (
    ImageDataset,
    IndexedDataset,
    available_datasets,
    dataset_labels,
    load_dataset,
)
from memprune.data._splits import Splits, make_splits

__all__ = [
    "ImageDataset",
    "IndexedDataset",
    "MultiView",
    "SimCLRAugment",
    "Splits",
    "available_datasets",
    "dataset_labels",
    "load_dataset",
    "make_augment",
    "make_splits",
    "view_generator",
]
