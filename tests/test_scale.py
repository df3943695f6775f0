"""The large case on the CPU: precision, layouts and loader settings chosen by device, and
the parts of the GPU path that can be checked without a GPU."""

import contextlib
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

from memprune.engine import Compute, fast_layout, loader_options, uses_channels_last
from memprune.errors import ConfigError
from memprune.hooks import unit_reducer
from memprune.probe import extract_features
from memprune.scores import unit_mem
from memprune.sites import find_sites
from memprune.train import resolve_mixed_precision
from tests.conftest import tiny_resnet, tiny_vit

CUDA = torch.device("cuda")  # a device object only: nothing here runs on a GPU
CPU = torch.device("cpu")


def test_auto_precision_is_fp32_on_the_cpu_and_bf16_is_close(digits):
    data = Subset(digits, range(40))
    model = tiny_resnet()
    assert Compute().dtype(model) == "fp32" and resolve_mixed_precision("auto") == "no"
    auto = unit_mem(model, data, n_views=2, device="cpu")
    fp32 = unit_mem(model, data, n_views=2, device="cpu", precision="fp32")
    bf16 = unit_mem(model, data, n_views=2, device="cpu", precision="bf16")
    assert auto.meta["precision"] == "fp32" and bf16.meta["precision"] == "bf16"
    for name in auto.sites:  # auto on the CPU is exactly fp32
        assert torch.equal(auto[name]["score"], fp32[name]["score"])
    a = torch.cat([fp32[n]["score"] for n in fp32.sites])
    b = torch.cat([bf16[n]["score"] for n in bf16.sites])
    assert b.dtype == torch.float32  # statistics stay float32
    assert (a - b).abs().max() < 0.1 and torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.95
    assert not torch.equal(a, b)  # bf16 really ran
    with pytest.raises(ConfigError, match="precision"):
        unit_mem(model, data, precision="fp8")


def test_bf16_activations_are_summed_in_float32():
    site = find_sites(tiny_resnet(), "units")[1]
    x = torch.rand(3, site.n_units, 50, 50).bfloat16() * 100 + 100  # bf16 sums would round
    out = unit_reducer(site, "raw")(x)
    exact = x.double().mean(dim=(2, 3))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=0)


def test_loader_options_by_device():
    assert loader_options(CPU) == {"num_workers": 0, "pin_memory": False}
    gpu = loader_options(CUDA)
    assert gpu["pin_memory"] and 1 <= gpu["num_workers"] <= 8 and gpu["prefetch_factor"] == 4
    assert loader_options(CUDA, 0) == {"num_workers": 0, "pin_memory": True}
    assert loader_options(CPU, 2)["num_workers"] == 2
    with pytest.raises(ConfigError, match="num_workers"):
        loader_options(CPU, -1)


def test_channels_last_for_cnns_on_cuda_only_and_undone_after():
    cnn, vit = tiny_resnet(), tiny_vit()
    assert uses_channels_last(cnn, CUDA) and not uses_channels_last(cnn, CPU)
    assert not uses_channels_last(vit, CUDA)  # one conv: the patch embedding
    conv = cnn.conv1.weight
    with fast_layout(cnn, CUDA) as nhwc:  # the layout change itself runs on the CPU too
        assert nhwc and cnn.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        assert not cnn.conv1.weight.is_contiguous()
    assert cnn.conv1.weight.is_contiguous() and torch.equal(cnn.conv1.weight, conv)
    with fast_layout(cnn, CPU) as nhwc:
        assert not nhwc and cnn.conv1.weight.is_contiguous()


def test_channels_last_path_gives_the_same_features(digits, monkeypatch):
    """The scoring loop's NHWC path (weights and inputs in channels_last, as on CUDA) computes
    what the default layout computes, and leaves the weights as they were."""
    import memprune.engine as engine

    data = Subset(digits, range(20))
    model = tiny_resnet()
    plain = extract_features(model, data, device="cpu").features
    seen = []
    real = engine.fast_layout

    @contextlib.contextmanager
    def spy(m, device):
        with real(m, CUDA) as nhwc:  # the CUDA decision, on the CPU
            seen.append(m.conv1.weight.is_contiguous(memory_format=torch.channels_last))
            yield nhwc

    monkeypatch.setattr(engine, "fast_layout", spy)
    nhwc = extract_features(model, data, device="cpu").features
    assert seen == [True] and model.conv1.weight.is_contiguous()
    torch.testing.assert_close(nhwc, plain, rtol=1e-4, atol=1e-5)


def _folder(root, sizes=((300, 400), (220, 180), (500, 260))):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i, (h, w) in enumerate(sizes):
                pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def test_folder_data_with_the_encoders_eval_transform(tmp_path):
    """Images of any size come out as timm's eval preprocessing of the encoder (resize to the
    input size over crop_pct, bicubic for ResNets, centre crop), in [0, 1] and unnormalized."""
    import timm.data

    from memprune.data import load_dataset
    from memprune.encoders import create_encoder, eval_transform

    root = _folder(tmp_path / "imgs")
    model = create_encoder("resnet18", img_size=64, channels=[8, 16, 32, 64])
    data = load_dataset(root, "train", transform=eval_transform(model))
    cfg = timm.data.resolve_data_config({}, model=model)
    timm_tf = timm.data.create_transform(**cfg, is_training=False)  # normalizes
    mean, std = (torch.tensor(cfg[k]).view(3, 1, 1) for k in ("mean", "std"))
    base = data.base
    for i in range(len(data)):
        image, label, index = data[i]
        assert image.shape == (3, 64, 64) and image.min() >= 0 and image.max() <= 1
        expected = timm_tf(base[i][0]) * std + mean
        torch.testing.assert_close(image, expected, atol=2e-6, rtol=0)
    with pytest.raises(ConfigError, match="own size"):
        load_dataset("digits", transform=eval_transform(model))
    with pytest.raises(ConfigError, match="not both"):
        load_dataset(root, img_size=32, transform=eval_transform(model))


def test_recipe_loads_folder_data_at_the_encoders_input_size(tmp_path):
    from memprune.recipes import Context as _Context
    from memprune.recipes import load_recipe

    root = _folder(tmp_path / "imgs")
    sets = [f"data.name={root}", "encoder.img_size=48", "encoder.model=resnet18"]
    ctx = _Context(load_recipe(None, sets), tmp_path / "run", print)
    assert ctx.train[0][0].shape == (3, 48, 48)
    resized = _Context(load_recipe(None, [*sets, "data.transform=resize"]), tmp_path, print)
    assert resized.train[0][0].shape == (3, 48, 48)
    # the eval transform crops a centre square of the resized image; resize keeps more border
    assert not torch.equal(ctx.train[0][0], resized.train[0][0])


def test_simclr_views_at_the_encoders_input_size(tmp_path):
    import json

    from torch.utils.data import TensorDataset

    from memprune.data import IndexedDataset, MultiView
    from memprune.train.simclr import pretrain_simclr, view_size

    assert view_size("simclr", 32) == {"preset": "simclr", "size": 32}
    assert view_size({"scale": [0.3, 1.0]}, 24)["size"] == 24
    assert view_size({"size": 24}, 32) == {"size": 24}  # explicit: kept
    assert view_size("none", 32) == "none" and view_size("simclr", None) == "simclr"
    big = IndexedDataset(TensorDataset(torch.rand(8, 3, 40, 40), torch.zeros(8)))
    pretrain_simclr("resnet18", big, epochs=1, batch_size=4, img_size=24, out_dir=tmp_path,
                    channels=[8, 16, 32, 64])  # fmt: skip
    augment = json.loads((tmp_path / "card.json").read_text())["augment"]
    assert augment == {"preset": "simclr", "size": 24}
    assert MultiView(big, 2, augment)[0][0].shape == (2, 3, 24, 24)


@pytest.mark.slow
def test_scale_benchmark_runs_on_the_cpu(tmp_path):
    """benchmarks/scale.py runs end to end on the CPU (tiny: a smoke run, no timing asserted)."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "scale.json"
    cmd = [sys.executable, str(root / "benchmarks" / "scale.py"), "--models", "resnet18",
           "--img-size", "32", "--n", "4", "--json", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CPU mode: N=4 points" in proc.stdout
    (row,) = json.loads(out.read_text())["rows"]
    for key in ("forward_img_s", "unitmem_ratio", "layermem_ratio", "features_ratio",
                "simclr_ratio", "views_s", "device_views_s"):  # fmt: skip
        assert row[key] > 0, key
    assert row["view_difference"]["max"] < 1e-4  # the same views, made in batches
    assert row["precision"] == "fp32" and row["loader"]["num_workers"] == 0


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_features_on_disk_equal_in_memory_and_stay_memory_mapped(tmp_path, digits):
    data = Subset(digits, [int(i) for i in torch.randperm(len(digits))[:45]])  # unsorted
    model = tiny_resnet()
    ram = extract_features(model, data, chunk_size=8, device="cpu")
    disk = extract_features(model, data, chunk_size=8, device="cpu", store=tmp_path)
    assert torch.equal(disk.indices, ram.indices) and torch.equal(disk.labels, ram.labels)
    torch.testing.assert_close(disk.features, ram.features, rtol=0, atol=0)
    files = sorted(p.name.split(".", 1)[1] for p in tmp_path.iterdir())
    assert files == ["features.npy", "indices.npy", "labels.npy"]  # no partial file left
    (mapped,) = [p for p in tmp_path.iterdir() if p.name.endswith(".features.npy")]
    assert str(mapped) in Path("/proc/self/maps").read_text()  # the file is mapped, not read
    again = extract_features(model, data, chunk_size=8, device="cpu", store=tmp_path)
    assert torch.equal(again.features, disk.features)  # reused: same key, same file
