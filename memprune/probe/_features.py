"""Frozen feature extraction with an on-disk cache (docs/method.md §11).

Features are the encoder's pre-logits outputs on un-augmented images, extracted in eval mode
under ``inference_mode`` (parameters and norm statistics cannot change). Under
``torchrun`` / ``accelerate launch`` each process extracts a shard and the rows are gathered
and ordered by data index, so padded duplicates never count.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from memprune._dist import agree, gather_by_index
from memprune._io import write_safetensors
from memprune.data import MultiView, dataset_name
from memprune.encoders import feature_dim, weights_hash
from memprune.engine import Compute, image_size, resolve_normalize, view_batches
from memprune.errors import ConfigError
from memprune.sites import output_site


@dataclass
class Features:
    """Features ``[N, D]`` (float32), labels ``[N]`` and data indices ``[N]``, sorted by index."""

    features: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


def data_fingerprint(dataset: Dataset) -> dict:
    """What identifies a data set for the cache: its name, size, data indices and a hash of
    its first and last 8 images. Reading every image would cost a full pass, so a data set
    whose other images change under the same name, size and indices would hit a stale cache:
    use a fresh ``cache_dir`` after editing data in place."""
    n = len(dataset)
    picks = sorted({*range(min(8, n)), *range(max(0, n - 8), n)})
    h = hashlib.sha256()
    indices = []
    for p in picks:
        image, label, index = dataset[p]
        h.update(image.contiguous().numpy().tobytes())
        h.update(f"{label}:{index}".encode())
    for p in range(n):  # indices are cheap for memprune's data sets and Subsets
        indices.append(int(dataset.indices[p]) if hasattr(dataset, "indices") else p)
    h.update(json.dumps(indices).encode())
    return {"name": dataset_name(dataset), "n": n, "hash": h.hexdigest()}


def cache_key(encoder: nn.Module, dataset: Dataset, normalize, precision: str = "fp32") -> str:
    spec = {
        "weights": weights_hash(encoder),
        "data": data_fingerprint(dataset),
        "transform": {
            "normalize": resolve_normalize(encoder, normalize),
            "size": image_size(dataset),
        },
        **({"precision": precision} if precision != "fp32" else {}),  # fp32 keeps old keys
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def extract_features(
    encoder: nn.Module,
    dataset: Dataset,
    normalize="auto",
    chunk_size: int = 256,
    cache_dir: str | os.PathLike | None = None,
    device=None,
    num_workers: int | None = None,
    progress: bool | None = None,
    precision: str = "auto",
) -> Features:
    """Pre-logits features of every image of ``dataset`` (see the module docstring).

    With ``cache_dir``, features are stored under a key made of the weights' hash, the data
    set's fingerprint and the transform (normalization, image size); a later call with the
    same key reads them back instead of running the encoder.
    """
    if len(dataset) == 0:
        raise ConfigError("cannot extract features of an empty data set")
    path = None
    if cache_dir is not None:
        compute = Compute(chunk_size, device, num_workers, progress, precision)
        key = cache_key(encoder, dataset, normalize, compute.dtype(encoder))
        path = Path(cache_dir) / f"features-{key}.safetensors"
        if agree(path.is_file()):  # the main process decides: it alone writes the cache
            from safetensors.torch import load_file

            t = load_file(str(path))
            return Features(t["features"], t["labels"], t["indices"])
    site = output_site(feature_dim(encoder, image_size(dataset)))
    views = MultiView(dataset, 1, "none")
    rows_x, rows_y, rows_i = [], [], []
    for indices, labels, (acts,) in view_batches(
        [encoder], views, [[site]], Compute(chunk_size, device, num_workers, progress, precision),
        reduce=[lambda x: x.float()], normalize=normalize, desc="features",
    ):  # fmt: skip
        rows_x.append(acts[site.name].cpu())
        rows_y.append(torch.as_tensor(labels))
        rows_i.append(torch.as_tensor(indices))
    i, x, y = gather_by_index(torch.cat(rows_i).long(), torch.cat(rows_x), torch.cat(rows_y).long())
    out = Features(x, y, i)
    if path is not None:
        tensors = {"features": out.features, "labels": out.labels, "indices": out.indices}
        write_safetensors(path, tensors)
    return out
