"""The labels of a data set, read without loading its images where it keeps them."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """Labels of every item of ``dataset`` in order (fast path for memprune's own data sets)."""
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, torch.Tensor) and len(labels) == len(dataset):
        return labels
    if isinstance(dataset, torch.utils.data.Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices)]
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
