"""Helpers shared by the benchmark scripts (run them as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import time

import torch

import memprune
from memprune.data import ImageDataset

MODELS = {
    "resnet18@32": ("resnet18", 32, {}),
    "vit_tiny@32": ("vit_tiny_patch16_224", 32, {"patch_size": 4}),  # 8x8 patches + cls = 65 tokens
    "resnet50@224": ("resnet50", 224, {}),
    "vit_small@224": ("vit_small_patch16_224", 224, {}),
    # one small member of each timm family the pruning supports
    "mobilenetv3_small_050@64": ("mobilenetv3_small_050", 64, {}),
    "efficientnet_b0@64": ("efficientnet_b0", 64, {}),
    "convnext_atto@64": ("convnext_atto", 64, {}),
    "regnetx_002@64": ("regnetx_002", 64, {}),
}


def make_model(key: str):
    name, size, kw = MODELS[key]
    return memprune.load_encoder(name, img_size=size, **kw), size


def random_data(n: int, size: int, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    return ImageDataset(torch.rand(n, 3, size, size, generator=g), torch.zeros(n), "random", ["0"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    """Seconds ``fn()`` takes, with the device synchronized before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def describe(device: torch.device) -> str:
    """One line naming torch, the device and (on CPU) the thread count."""
    where = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{torch.get_num_threads()} threads"
    )
    return f"torch {torch.__version__}, device {device} ({where})"


class Stop(Exception):
    """Raised by a hook to end a forward pass early, as a truncated model would."""


def side_by_side(baseline, ours, repeats: int) -> tuple[float, float, float, float]:
    """Time ``baseline()`` and ``ours()`` alternately after one warm-up of each.

    Returns (best baseline s, best ours s, best-of ratio, median of the per-pair ratios);
    a ratio is baseline time / our time, so 1.0 means no overhead.
    """
    baseline(), ours()
    a, b = [], []
    for _ in range(repeats):
        a.append(baseline())
        b.append(ours())
    return min(a), min(b), min(a) / min(b), sorted(x / y for x, y in zip(a, b))[len(a) // 2]
