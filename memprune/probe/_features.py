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

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from memprune._dist import agree, barrier, gather_by_index, is_main, rank_world
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
    store: str | os.PathLike | None = None,
) -> Features:
    """Pre-logits features of every image of ``dataset`` (see the module docstring).

    With ``cache_dir``, features are stored under a key made of the weights' hash, the data
    set's fingerprint and the transform (normalization, image size, precision); a later call
    with the same key reads them back instead of running the encoder.

    ``store``: a directory where the features go to disk as they are made, for data sets
    whose features do not fit in memory (ImageNet-1k through ResNet-50: 1.28 M x 2048 x 4 B =
    10.5 GB). Every process writes its rows straight into one ``.npy`` file of ``[N, D]``
    float32 (disjoint rows, no gather), and the returned ``features`` is that file
    memory-mapped (copy-on-write: nothing in it can change), so memory stays flat as N grows.
    A finished store with the same key is reused like the cache.
    """
    if len(dataset) == 0:
        raise ConfigError("cannot extract features of an empty data set")
    compute = Compute(chunk_size, device, num_workers, progress, precision)
    if store is not None:
        return _to_disk(encoder, dataset, normalize, compute, Path(store))
    path = None
    if cache_dir is not None:
        key = cache_key(encoder, dataset, normalize, compute.dtype(encoder))
        path = Path(cache_dir) / f"features-{key}.safetensors"
        if agree(path.is_file()):  # the main process decides: it alone writes the cache
            from safetensors.torch import load_file

            t = load_file(str(path))
            return Features(t["features"], t["labels"], t["indices"])
    rows_x, rows_y, rows_i = [], [], []
    for indices, labels, rows in _batches(encoder, dataset, normalize, compute):
        rows_x.append(rows)
        rows_y.append(torch.as_tensor(labels))
        rows_i.append(torch.as_tensor(indices))
    i, x, y = gather_by_index(torch.cat(rows_i).long(), torch.cat(rows_x), torch.cat(rows_y).long())
    out = Features(x, y, i)
    if path is not None:
        tensors = {"features": out.features, "labels": out.labels, "indices": out.indices}
        write_safetensors(path, tensors)
    return out


def _batches(encoder, dataset, normalize, compute: Compute):
    """This process's ``(indices, labels, features [B, D] float32 on the CPU)``, in its shard's
    order (positions ``rank, rank + world, ...``)."""
    site = output_site(feature_dim(encoder, image_size(dataset)))
    for indices, labels, (acts,) in view_batches(
        [encoder], MultiView(dataset, 1, "none"), [[site]], compute,
        reduce=[lambda x: x.float()], normalize=normalize, desc="features",
    ):  # fmt: skip
        yield indices, labels, acts[site.name].cpu()


def _to_disk(encoder, dataset, normalize, compute: Compute, store: Path) -> Features:
    """:func:`extract_features` with ``store``: rows written into a memory-mapped file."""
    key = cache_key(encoder, dataset, normalize, compute.dtype(encoder))
    paths = {
        name: store / f"features-{key}.{name}.npy" for name in ("features", "labels", "indices")
    }
    n, dim = len(dataset), feature_dim(encoder, image_size(dataset))
    partial = store / f"features-{key}.partial.npy"
    if not agree(paths["features"].is_file()):
        if is_main():
            store.mkdir(parents=True, exist_ok=True)
            np.lib.format.open_memmap(partial, "w+", np.float32, (n, dim)).flush()
        barrier()
        out = np.load(partial, mmap_mode="r+")  # every process writes its own rows
        rows_y, rows_i, rows_p = [], [], []
        rank, world = rank_world()
        position = rank
        for indices, labels, rows in _batches(encoder, dataset, normalize, compute):
            at = np.arange(position, position + world * len(rows), world)  # this shard's rows
            out[at] = rows.numpy()
            position += world * len(rows)
            rows_y.append(torch.as_tensor(labels))
            rows_i.append(torch.as_tensor(indices))
            rows_p.append(torch.as_tensor(at))
        out.flush()
        del out
        _, i, y = gather_by_index(
            torch.cat(rows_p).long(), torch.cat(rows_i).long(), torch.cat(rows_y).long()
        )  # fmt: skip (by position)
        barrier()  # every row is on disk
        if is_main():  # the features file comes last: its presence marks a finished store
            order = np.argsort(i.numpy(), kind="stable")
            np.save(paths["labels"], y.numpy()[order])
            np.save(paths["indices"], i.numpy()[order])
            _sort_by_index(partial, i.numpy(), paths["features"])
        barrier()
    load = {name: np.load(path, mmap_mode="c") for name, path in paths.items()}
    return Features(*(torch.from_numpy(load[k]) for k in paths))


def _sort_by_index(partial: Path, indices: np.ndarray, final: Path, rows: int = 65536) -> None:
    """``partial`` (rows in data-set order) moved to ``final`` with rows sorted by data index:
    a rename when they already are (memprune's data sets and Subsets), else a copy made a
    block of rows at a time."""
    if np.all(np.diff(indices) > 0):
        partial.rename(final)
        return
    src = np.load(partial, mmap_mode="r")
    order = np.argsort(indices, kind="stable")
    tmp = final.with_suffix(".tmp.npy")
    dst = np.lib.format.open_memmap(tmp, "w+", np.float32, src.shape)
    for start in range(0, len(order), rows):
        dst[start : start + rows] = src[order[start : start + rows]]
    dst.flush()
    del dst, src
    tmp.rename(final)
    partial.unlink()
