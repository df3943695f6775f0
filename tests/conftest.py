"""Shared fixtures: tiny models and small real data, all offline and seeded."""

from __future__ import annotations

import pytest
import torch

from memprune import load_dataset, load_encoder

torch.set_num_threads(2)


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
