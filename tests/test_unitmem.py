import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from memprune import ClassMemResult, UnitMemResult, class_mem, find_sites, unit_mem
from memprune.data import ImageDataset, MultiView
from memprune.engine import Normalizer, resolve_normalize
from memprune.errors import ConfigError, SiteError
from memprune.hooks import capture
from memprune.stats import MeanRestState, unitmem_reference

from .conftest import ROOT, tiny_resnet, tiny_vit


class Planted(nn.Module):
    """Its unit site ``units`` outputs the input channels: activations are what the data says."""

    def __init__(self):
        super().__init__()
        self.units = nn.ReLU()

    def forward(self, x):
        return self.units(x).mean((2, 3))


def planted_data(n=10, star=7):
    images = torch.zeros(n, 3, 4, 4)
    images[star, 0] = 1.0  # unit 0 fires for point `star` only
    images[:, 1] = 0.5  # unit 1 fires equally for every point
    labels = torch.arange(n) % 2
    images[labels == 1, 2] = 0.3  # unit 2 fires for class 1 only
    return ImageDataset(images, labels, "planted", ["a", "b"])


def score_planted(data, **kw):
    model = Planted()
    return unit_mem(model, data, n_views=2, sites=["units"], augment="none", normalize="none", **kw)


def test_planted_unit_scores():
    result = score_planted(planted_data())
    s = result["units"]
    torch.testing.assert_close(s["score"][:2], torch.tensor([1.0, 0.0]))
    assert s["argmax"][0] == 7 and s["argmax"][1] == 0  # ties: lowest index
    assert s["mu_max"][0] == 1.0 and s["mu_rest"][0] == 0.0
    assert s["dead"].tolist() == [False, False, False]
    # a dead unit scores 0 and is flagged
    images = planted_data().images.clone()
    images[:, 2] = 0
    dead = score_planted(ImageDataset(images, torch.zeros(10), "dead", ["a"]))["units"]
    assert dead["score"][2] == 0 and dead["dead"][2] and not dead["score"].isnan().any()


def test_argmax_is_the_data_index_not_the_position():
    data = Subset(planted_data(), [9, 2, 7, 4])  # the star point sits at position 2
    assert score_planted(data)["units"]["argmax"][0] == 7


def test_planted_class_scores():
    result = class_mem(Planted(), planted_data(), sites=["units"], normalize="none")
    s = result["units"]
    # unit 2: class 1 mean 0.3, class 0 mean 0 -> 1; unit 1 equal -> 0
    torch.testing.assert_close(s["score"][1:], torch.tensor([0.0, 1.0]))
    assert s["argmax"][2] == 1
    # unit 0: class 1 holds the star (7 is odd): mean 1/5 vs 0
    assert s["argmax"][0] == 1 and s["score"][0] == 1.0


def reference_activations(model, data, n_views, seed=0):
    """Every view of every point through the model one image at a time: [N, K, U] per site."""
    sites = find_sites(model, "units")
    views = MultiView(data, n_views, seed=seed)
    norm = Normalizer(resolve_normalize(model, "auto"), torch.device("cpu"))
    per_site = {s.name: [] for s in sites}
    indices = []
    with torch.no_grad(), capture(model, sites) as acts:
        for p in range(len(views)):
            v, _, index = views[p]
            indices.append(index)
            rows = {s.name: [] for s in sites}
            for k in range(n_views):
                model(norm(v[k : k + 1]))
                for s in sites:
                    rows[s.name].append(acts[s.name][0])
            for s in sites:
                per_site[s.name].append(torch.stack(rows[s.name]))
    return {n: torch.stack(a) for n, a in per_site.items()}, torch.tensor(indices)


@pytest.mark.parametrize("make", [tiny_resnet, tiny_vit], ids=["resnet", "vit"])
@pytest.mark.parametrize("rest", ["mean", "median"])
def test_streaming_equals_brute_force(make, rest, digits):
    model = make()
    data = Subset(digits, list(range(11)))  # odd N: median of an even number of rest values
    acts, indices = reference_activations(model, data, n_views=3)
    result = unit_mem(model, data, n_views=3, chunk_size=4, rest=rest)
    assert list(result.sites) == list(acts)
    for name, a in acts.items():
        ref = unitmem_reference(a, indices, rest=rest)
        got = result[name]
        torch.testing.assert_close(got["score"], ref["score"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got["mu_rest"], ref["mu_rest"], atol=1e-5, rtol=1e-4)
        assert torch.equal(got["dead"], ref["dead"])
        live = ~ref["dead"]
        assert torch.equal(got["argmax"][live], ref["argmax"][live])


def test_median_even_count_is_mean_of_middle_values():
    acts = torch.tensor([[1.0], [2.0], [4.0], [8.0], [100.0]])[:, None, :]  # [N=5, K=1, U=1]
    ref = unitmem_reference(acts, torch.arange(5), rest="median")
    assert ref["mu_rest"].item() == 3.0  # median of 1, 2, 4, 8
    acts = torch.tensor([[4.0], [100.0], [1.0], [2.0]])[:, None, :]
    assert unitmem_reference(acts, torch.arange(4), rest="median")["mu_rest"].item() == 2.0


def test_chunk_size_and_order_do_not_matter(digits):
    model = tiny_resnet()
    data = Subset(digits, list(range(20)))
    shuffled = Subset(
        digits, torch.randperm(20, generator=torch.Generator().manual_seed(1)).tolist()
    )
    a = unit_mem(model, data, n_views=2, chunk_size=3)
    b = unit_mem(model, shuffled, n_views=2, chunk_size=20)
    for name in a.sites:
        torch.testing.assert_close(a[name]["score"], b[name]["score"], atol=1e-5, rtol=1e-4)
        live = ~a[name]["dead"]
        assert torch.equal(a[name]["argmax"][live], b[name]["argmax"][live])


def test_views_made_on_the_device_give_the_same_scores(digits, monkeypatch):
    """UnitMem with the views made in batches (what CUDA does) equals the loader's views'
    scores up to float rounding; the metadata says where the views were made."""
    import memprune.engine as engine
    from memprune.data import loop_views

    model, data = tiny_resnet(), Subset(digits, list(range(20)))
    host = unit_mem(model, data, n_views=3, chunk_size=4)
    made_on = []

    def on_device(views, device, _place):
        made_on.append(device.type)
        return loop_views(views, device, "device")

    monkeypatch.setattr(engine, "loop_views", on_device)
    made = unit_mem(model, data, n_views=3, chunk_size=4)
    assert made_on == ["cpu"] and host.meta["views"] == "host"
    for name in host.sites:
        torch.testing.assert_close(made[name]["mu_max"], host[name]["mu_max"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(made[name]["score"], host[name]["score"], atol=1e-4, rtol=1e-3)


def test_merge_equals_one_state():
    values, idx = torch.rand(30, 6), torch.randperm(30)
    one = MeanRestState.empty(6)
    one.update(values, idx)
    parts = [MeanRestState.empty(6) for _ in range(3)]
    for p in range(3):
        parts[p].update(values[p::3], idx[p::3])
    parts[0].merge(parts[1])
    parts[0].merge(parts[2])
    for k, v in one.compute().items():
        torch.testing.assert_close(parts[0].compute()[k], v)


def test_save_load_round_trip(tmp_path, digits):
    result = unit_mem(tiny_vit(), Subset(digits, range(6)), n_views=2)
    result.save(tmp_path / "scores")
    loaded = UnitMemResult.load(tmp_path / "scores.safetensors")
    assert loaded.meta == result.meta and list(loaded.sites) == list(result.sites)
    for name in result.sites:
        for k, v in result[name].items():
            assert torch.equal(loaded[name][k], v)
    assert loaded.meta["n_views"] == 2 and "torch" in loaded.meta["versions"]


def test_bad_input(digits):
    model = tiny_resnet()
    with pytest.raises(ConfigError, match="N >= 2 data points, got N = 1"):
        unit_mem(model, Subset(digits, [0]))
    with pytest.raises(ConfigError, match="n_views must be an int >= 1"):
        unit_mem(model, digits, n_views=0)
    with pytest.raises(SiteError, match="'layer9.*' matches no units site"):
        unit_mem(model, digits, sites=["layer9.*"])
    with pytest.raises(ConfigError, match="unknown rest statistic .max.: use one of mean, median"):
        unit_mem(model, digits, rest="max")
    with pytest.warns(UserWarning, match="signed='raw'"):
        unit_mem(
            Planted(), planted_data(), n_views=1, sites=["units"], signed="raw", augment="none"
        )


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, digits):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29500 + (os.getpid() % 500)),
        str(ROOT / "tests" / "_mp_score.py"),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = Subset(digits, list(range(0, 45)))
    for rest in ("mean", "median"):  # one launch scores both
        one = unit_mem(tiny_resnet(), data, n_views=3, chunk_size=4, rest=rest, device="cpu")
        two = UnitMemResult.load(tmp_path / f"unitmem_{rest}")
        for name in one.sites:
            torch.testing.assert_close(two[name]["score"], one[name]["score"], atol=1e-5,
                                       rtol=1e-4)  # fmt: skip
            alive = ~one[name]["dead"]
            assert torch.equal(two[name]["argmax"][alive], one[name]["argmax"][alive]), rest
    classes = class_mem(tiny_resnet(), data, chunk_size=4, device="cpu")
    for name, s in ClassMemResult.load(tmp_path / "classmem").sites.items():
        torch.testing.assert_close(s["score"], classes[name]["score"], atol=1e-5, rtol=1e-4)
    # minibatch CKA: each minibatch whole on one process, so the same estimate
    from memprune import cka, load_encoder
    from memprune.scores.cka import CKAResult

    torch.manual_seed(1)
    other = load_encoder("resnet18", channels=(8, 16, 32, 64))
    one = cka(data, tiny_resnet(), other, minibatch=8, device="cpu")
    two = CKAResult.load(tmp_path / "cka")
    for field in ("matrix", "labels_a", "labels_b", "invariance_a", "invariance_b"):
        torch.testing.assert_close(getattr(two, field), getattr(one, field), atol=1e-6,
                                   rtol=1e-5)  # fmt: skip


def test_unitmem_metric_from_your_own_loop_equals_the_function(digits):
    """A user's own loop feeding UnitMem.update gives exactly unit_mem's scores; two metrics
    over halves merge into the one-shot result; a result of one kind refuses to load as
    another."""
    from memprune import UnitMem
    from memprune.encoders import normalization

    model, data = tiny_resnet(), Subset(digits, range(24))
    sites = find_sites(model, "units")
    expected = unit_mem(model, data, n_views=1, augment="none", progress=False)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in normalization(model))
    whole, halves = UnitMem(sites), [UnitMem(sites), UnitMem(sites)]
    with torch.inference_mode(), capture(model, sites) as acts:
        for i, (x, _, index) in enumerate(torch.utils.data.DataLoader(data, batch_size=5)):
            model((x - mean) / std)
            whole.update(acts, index)
            halves[i % 2].update(acts, index)
    for got in (whole.compute(), halves[0].merge(halves[1]).compute()):
        for name in expected.sites:
            for key in ("score", "argmax", "dead"):
                assert torch.equal(got[name][key], expected[name][key]), (name, key)
    whole.reset()
    assert whole.state.count == 0


def test_load_refuses_another_kind(tmp_path, digits):
    from memprune import ClassMemResult, load_result

    result = unit_mem(tiny_resnet(), Subset(digits, range(6)), n_views=1, progress=False)
    result.save(tmp_path / "u")
    with pytest.raises(ConfigError, match="holds a unitmem result, not classmem"):
        ClassMemResult.load(tmp_path / "u")
    assert isinstance(load_result(tmp_path / "u"), UnitMemResult)
