"""Shared fixtures: tiny models and small real data, all offline and seeded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from memprune import load_dataset, load_encoder

#: Torch threads for the suite, chosen by measurement on 2 cores (README, "Tests"): alone, 1 and
#: 2 threads take the same time; beside another busy process, 2 threads spin-wait for a core
#: and crawl. MEMPRUNE_TEST_THREADS overrides it, e.g. to measure again. Subprocesses (CLI
#: runs, torchrun workers, the notebook's kernel) inherit it through OMP_NUM_THREADS.
THREADS = int(os.environ.get("MEMPRUNE_TEST_THREADS", "1"))
torch.set_num_threads(THREADS)
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


#: timm arguments of a tiny ResNet-18 (64-wide stem, 0.2M parameters).
TINY_RESNET = {"channels": (8, 16, 32, 64)}


def tiny_resnet(**kw):
    torch.manual_seed(0)
    return load_encoder("resnet18", **TINY_RESNET, **kw)


def tiny_vit(**kw):
    torch.manual_seed(0)
    return load_encoder(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, **kw
    )


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits", "train")


@pytest.fixture
def resnet():
    return tiny_resnet()


@pytest.fixture
def vit():
    return tiny_vit()


class MemoryEncoder(torch.nn.Module):
    """An encoder with a known answer: a fixed random projection of the image, plus a key-value
    memory. An input close to one of the stored ``keys`` (within the noise of its views) also
    returns that key's large value vector, so its views align almost perfectly; any other input
    only gets the projection, whose views differ by their noise. Two such encoders with the same
    projection but different keys are a planted pair: each memorizes exactly its own points."""

    def __init__(self, keys: torch.Tensor, dim: int = 32, strength: float = 50.0):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        d_in = keys[0].numel()
        self.register_buffer("proj", torch.randn(d_in, dim, generator=gen) / d_in**0.5)
        self.register_buffer("keys", keys.flatten(1).clone())
        self.register_buffer("values", torch.randn(len(keys), dim, generator=gen))
        # a view's own key weighs exp(-2); the nearest other digit (squared distance >= 40) < 1e-5
        self.bandwidth = 0.5 * d_in * NOISE_SIGMA**2
        self.strength = strength
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        weight = torch.exp(-torch.cdist(x, self.keys).pow(2) / self.bandwidth)  # [B, M]
        return x @ self.proj + self.strength * weight @ self.values


#: Std of the pixel noise of :func:`noise_views`.
NOISE_SIGMA = 0.05


def noise_views(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A view: the image plus Gaussian pixel noise drawn from the view's generator."""
    return image + NOISE_SIGMA * torch.randn(image.shape, generator=gen)


def kill_when(argv: list[str], ready, timeout: float = 240.0) -> None:
    """Run ``memprune ARGV`` in a subprocess and SIGKILL it as soon as ``ready()`` is true
    (polled every 10 ms): a crash at an arbitrary moment of the command's work."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}  # the test waits: the child has the cores
    proc = subprocess.Popen([sys.executable, "-m", "memprune.cli", *argv], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"finished before the kill: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("the moment to kill never came")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def unfinished(out) -> bool:
    """Whether the output directory ``out`` holds a command that did not finish."""
    import json

    from memprune.report._rundir import MARKER

    return json.loads((out / MARKER).read_text())["finished"] is False


def same_tensors(a, b) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


ROOT = Path(__file__).resolve().parents[1]

#: ResNet-18's layer sites (without the output), for planted LayerMem results.
LAYERS = ["maxpool", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1",
          "layer4.0", "layer4.1"]  # fmt: skip


def planted_layermem(values):
    """A LayerMemResult whose LayerMem per layer is ``values`` (then the output's)."""
    v = torch.tensor([*values, values[-1]], dtype=torch.float64)
    loss_f = torch.ones(4, len(v), dtype=torch.float64)
    loss_g = loss_f * (1 + v) / (1 - v)  # (g - f) / (g + f) = v
    from memprune.scores import LayerMemResult

    return LayerMemResult([*LAYERS, "output"], torch.arange(4), loss_f, loss_g, {})
