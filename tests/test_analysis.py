import math

import pytest
import torch
from torch import nn

import memprune
from memprune import cka, learnedness
from memprune.data import ImageDataset
from memprune.errors import ConfigError
from memprune.scores import CKAResult, cka_from_features

from .conftest import tiny_resnet, tiny_vit

# ------------------------------------------------------------------ CKA


def test_cka_invariances_and_independence():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 30, generator=g)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g))
    before = x.clone()
    assert cka_from_features(x, x @ q).item() == pytest.approx(1.0, abs=1e-10)
    assert cka_from_features(x, 3.0 * x, minibatch=100).item() == pytest.approx(1.0, abs=1e-10)
    noise = torch.randn(400, 40, generator=g)
    assert abs(cka_from_features(x, noise, minibatch=100).item()) < 0.05
    assert torch.equal(x, before)  # the caller's features are untouched
    # minibatch estimate close to the full-data one on related features
    w = torch.randn(12, 20, generator=g)
    y = torch.tanh(x[:, :12] @ w) + 0.3 * torch.randn(400, 20, generator=g)
    full, mini = cka_from_features(x, y), cka_from_features(x, y, minibatch=100)
    assert full.item() > 0.3 and mini.item() == pytest.approx(full.item(), abs=0.05)
    with pytest.raises(ConfigError, match="minibatch must be in"):
        cka_from_features(x, y, minibatch=3)


def test_cka_between_encoders_and_within_one(digits, tmp_path):
    data = torch.utils.data.Subset(digits, range(96))
    a = tiny_resnet(img_size=32)
    within = cka(data, a, minibatch=32, invariance=False, progress=False)
    assert within.matrix.shape == (9, 9)
    assert torch.allclose(within.matrix.diagonal(), torch.ones(9, dtype=torch.float64))
    assert torch.allclose(within.matrix, within.matrix.T)
    # an encoder and its exact copy agree layer for layer; views and labels are per layer
    across = cka(data, a, tiny_resnet(img_size=32), minibatch=32, progress=False)
    assert torch.allclose(across.matrix, within.matrix)
    assert across.labels_a.shape == (9,) and ((across.labels_a > 0) & (across.labels_a < 1)).all()
    assert across.invariance_a.shape == (9,) and (across.invariance_a <= 1 + 1e-9).all()
    across.save(tmp_path / "cka")
    back = CKAResult.load(tmp_path / "cka")
    assert torch.equal(back.matrix, across.matrix) and back.layers_b == across.layers_b
    pooled = cka(data, a, minibatch=32, invariance=False, representation="pool", progress=False)
    assert not torch.allclose(pooled.matrix, within.matrix)  # the representation is used
    vit = cka(data, tiny_vit(), minibatch=32, invariance=False, progress=False)
    assert vit.layers_a == ["blocks.0:after_attn", "blocks.0:after_mlp", "blocks.1:after_attn",
                            "blocks.1:after_mlp"]  # fmt: skip


# ------------------------------------------------------------------ learnedness


def _planted(n=64, hard=range(0, 64, 4)):
    """Images with a unique pattern each; ``hard`` points carry a flag pixel."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 4, 4, generator=g) * 0.5
    images[list(hard), 0, 0, 0] = 1.0
    return ImageDataset(images, torch.zeros(n), "planted", ["0"])


def _hard_views(image, generator):
    """Easy points: the view is the image. Hard points: a fresh random image every view."""
    if image[0, 0, 0] > 0.75:
        return torch.rand(image.shape, generator=generator) * 0.5
    return image


def test_learnedness_on_a_planted_case():
    data = _planted()
    encoder = nn.Flatten()
    r = learnedness([encoder, encoder], data, probe_size=64, n_pairs=2, group_size=16,
                    runs=[[encoder, encoder]], augment=_hard_views)  # fmt: skip
    assert r.learned.shape == (2, 2, 64, 4)
    points = r.points()[-1]
    hard = torch.tensor([int(i) % 4 == 0 for i in r.indices])
    assert torch.all(points[~hard] == 1.0)  # identical views always find each other
    assert points[hard].mean() < 0.2  # unrelated views: chance is 1/31
    test = r.homogeneity()
    assert test["R"] == 8 and test["p_value"] < 1e-6  # two kinds of points: not homogeneous


def test_homogeneity_null_counts_every_draw():
    g = torch.Generator().manual_seed(1)
    # every point equally hard: each of R = runs x views draws is learned with p = 0.3
    learned = torch.rand(1, 2, 400, 6, generator=g) < 0.3
    r = memprune.LearnednessResult(learned, torch.arange(400), ["0"])
    test = r.homogeneity()
    assert test["R"] == 12 and test["p_value"] > 0.01
    # r(x) pools all runs x views: its spread is that of Binomial(12, p) / 12, half that of
    # an average over one view per run (Binomial(2, p) / 2 would be 6x larger)
    assert r.points()[0].var().item() == pytest.approx(0.3 * 0.7 / 12, rel=0.3)


# ------------------------------------------------------------------ toy data


def test_toy_noise_is_orthogonal_and_snr_as_requested():
    toy = memprune.load_dataset("toy", "train", size=500, dim=48, snr=0.5, sigma=2.0)
    mu, p = toy.mu, toy.patches
    assert toy[0][0].shape == (3, 4, 8)
    assert mu.norm().item() / (2.0 * math.sqrt(48)) == pytest.approx(0.5)
    noise = torch.where(toy.signal_first[:, None], p[:, 1], p[:, 0])
    signal = torch.where(toy.signal_first[:, None], p[:, 0], p[:, 1])
    assert (noise @ mu).abs().max() < 1e-4 * mu.norm() * noise.norm(dim=1).max()
    y = 2 * toy.labels.float() - 1
    assert torch.allclose(signal, y[:, None] * mu[None])
    # noise variance per coordinate: sigma^2 (d - 1) / d
    assert noise.pow(2).mean().item() == pytest.approx(4.0 * 47 / 48, rel=0.05)
    # the augmentation keeps the signal patch and redraws the noise (still orthogonal)
    gen = torch.Generator().manual_seed(0)
    image = toy[3][0]
    view = toy.augment(image, gen)
    s = 0 if toy.signal_first[3] else 1
    patch = lambda img, i: img[:, :, 4 * i : 4 * i + 4].flatten()  # noqa: E731
    assert torch.equal(patch(view, s), patch(image, s))
    assert not torch.allclose(patch(view, 1 - s), patch(image, 1 - s))
    assert abs(float(patch(view, 1 - s) @ mu)) < 1e-3 * float(mu.norm())
    test = memprune.load_dataset("toy", "test", size=500, dim=48, snr=0.5, sigma=2.0)
    assert len(test) == 125 and torch.equal(test.mu, mu)
    with pytest.raises(ConfigError, match=r"toy dim must be 3 \* s\^2"):
        memprune.load_dataset("toy", dim=50)
    with pytest.raises(ConfigError, match="options .* are for the toy data set"):
        memprune.load_dataset("digits", snr=2.0)


def test_learnedness_from_kept_epoch_checkpoints(tmp_path, digits):
    from memprune.report import plot_learnedness
    from memprune.train import pretrain_simclr

    run = tmp_path / "run"
    tiny = {"channels": [8, 16, 32, 64], "img_size": 32}
    pretrain_simclr("resnet18", digits, list(range(64)), epochs=2, batch_size=32, out_dir=run,
                    keep_checkpoints=True, progress=False, **tiny)  # fmt: skip
    r = learnedness(run, digits, probe_size=40, n_pairs=2, group_size=16)
    assert r.checkpoints == ["epoch_000", "epoch_001"]
    assert r.learned.shape == (2, 1, 32, 4)  # probe rounded down to full batches
    assert ((r.curve() >= 0) & (r.curve() <= 1)).all()
    r.save(tmp_path / "learned")
    back = memprune.LearnednessResult.load(tmp_path / "learned")
    assert torch.equal(back.learned, r.learned) and back.checkpoints == r.checkpoints
    assert plot_learnedness(r, tmp_path / "l.png").is_file()
    with pytest.raises(ConfigError, match="keep_checkpoints=True"):
        learnedness(tmp_path, digits)
