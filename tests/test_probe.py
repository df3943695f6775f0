import os
import subprocess
import sys
from typing import ClassVar

import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import Dataset, Subset

from memprune import knn_probe, linear_probe
from memprune.errors import ConfigError
from memprune.probe import LinearProbe, extract_features, knn_accuracy

from .conftest import ROOT, tiny_resnet


class Relabeled(Dataset):
    """The same images with labels permuted (a test set no selection may look at)."""

    def __init__(self, dataset, seed=0):
        self.dataset = dataset
        g = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(len(dataset), generator=g)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, _, index = self.dataset[i]
        return image, self.dataset[int(self.perm[i])][1], index


def test_probing_leaves_the_encoder_untouched(digits):
    model = tiny_resnet()
    model.train()  # a probe must not run it in train mode (BN statistics would move)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, test = Subset(digits, range(100)), Subset(digits, range(100, 150))
    linear_probe(model, train, test, Cs=(1.0,))
    knn_probe(model, train, test)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training  # its mode is given back


def test_backends_agree_on_the_same_features():
    x, y = load_digits(return_X_y=True)
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y)
    tr, te = slice(0, 1200), slice(1200, None)
    a = LinearProbe("torch").fit(x[tr], y[tr])
    b = LinearProbe("sklearn").fit(x[tr], y[tr])
    acc_a, acc_b = a.score(x[te], y[te]), b.score(x[te], y[te])
    assert acc_a > 0.85 and abs(acc_a - acc_b) <= 0.01, (acc_a, acc_b)


def test_test_labels_never_choose_hyperparameters(digits):
    model = tiny_resnet()
    train, test = Subset(digits, range(300)), Subset(digits, range(300, 400))
    true = linear_probe(model, train, test)
    noise = linear_probe(model, train, Relabeled(test))
    assert true.choice == noise.choice and true.val_scores == noise.val_scores
    assert true.accuracy != noise.accuracy
    k_true, k_noise = knn_probe(model, train, test), knn_probe(model, train, Relabeled(test))
    assert k_true.choice == k_noise.choice and k_true.val_scores == k_noise.val_scores


def test_cache_hits_and_invalidation(tmp_path, digits):
    model = tiny_resnet()
    data = Subset(digits, range(40))
    first = extract_features(model, data, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 1

    def refuse(*_):
        raise AssertionError("the encoder ran although the features were cached")

    handle = model.register_forward_pre_hook(refuse)
    hit = extract_features(model, data, cache_dir=tmp_path)
    handle.remove()
    assert torch.equal(hit.features, first.features) and torch.equal(hit.indices, first.indices)
    with torch.no_grad():
        model.conv1.weight.mul_(1.5)
    changed = extract_features(model, data, cache_dir=tmp_path)
    assert not torch.equal(changed.features, first.features)
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 2


def test_separable_planted_features_give_100_percent():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(5, 16) * 10
    y = torch.arange(200) % 5
    x = centers[y] + 0.5 * torch.randn(200, 16, generator=g)
    for backend in ("torch", "sklearn"):
        assert LinearProbe(backend).fit(x[:150], y[:150]).score(x[150:], y[150:]) == 1.0
    assert knn_accuracy(x[:150], y[:150], x[150:], y[150:])["accuracy"] == 1.0


def test_bad_input(digits):
    model = tiny_resnet()
    with pytest.raises(ConfigError, match="empty"):
        linear_probe(model, Subset(digits, []), Subset(digits, range(5)))
    only_some = Subset(digits, [i for i in range(200) if digits.labels[i] < 5])
    with pytest.raises(ConfigError, match=r"test classes \[5, 6, 7, 8, 9\] never occur in train"):
        linear_probe(model, only_some, Subset(digits, range(200, 260)))
    probe = LinearProbe().fit(torch.randn(40, 8), torch.arange(40) % 2)
    with pytest.raises(
        ConfigError, match="features have 6 dimensions but the probe was fitted on 8"
    ):
        probe.predict(torch.randn(3, 6))
    with pytest.raises(ConfigError, match="backend"):
        LinearProbe("keras").fit(torch.randn(10, 2), torch.arange(10) % 2)


@pytest.mark.slow
def test_extraction_two_processes_equal_one(tmp_path, digits):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(28500 + (os.getpid() % 400)),
           str(ROOT / "tests" / "_mp_features.py"), str(tmp_path),
           str(tmp_path / "store")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    two = load_file(str(tmp_path / "features.safetensors"))
    one = extract_features(tiny_resnet(), Subset(digits, range(37)), chunk_size=5, device="cpu")
    assert torch.equal(two["indices"], one.indices) and torch.equal(two["labels"], one.labels)
    torch.testing.assert_close(two["features"], one.features)
    stored = sorted(p.name.split(".", 1)[1] for p in (tmp_path / "store").iterdir())
    assert stored == ["features.npy", "indices.npy", "labels.npy"]


def _ill_conditioned(n=600, seed=0):
    """Digits pixels through a random map with singular values from 1 to 1e-3."""
    x, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    scales = torch.logspace(0, -3, 64, dtype=torch.float64)
    x = torch.as_tensor(x[:n], dtype=torch.float64) @ (q * scales)
    return x, torch.as_tensor(y[:n])


@pytest.mark.parametrize("n_classes", [2, 10])
def test_backends_converge_to_the_same_optimum(n_classes):
    x, y = _ill_conditioned()
    keep = y < n_classes
    x, y = x[keep], y[keep]
    for tol, agree in ((1e-4, 1e-2), (1e-6, 1e-3)):  # measured: 5e-3 and 2e-4 at most
        a = LinearProbe("torch", Cs=(1.0,), tol=tol).fit(x, y)
        b = LinearProbe("sklearn", Cs=(1.0,), tol=tol).fit(x, y)
        assert max(a.gradients_.values()) < 10 * tol and max(b.gradients_.values()) < 10 * tol
        diff = (a.coef_ - b.coef_).norm() / b.coef_.norm()
        assert diff < agree, (tol, diff)  # scikit-learn's defaults: 2% here, up to 5% elsewhere
        assert (a.predict(x) == b.predict(x)).double().mean() > 0.99


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_an_unconverged_fit_warns_once(backend):
    import warnings

    from memprune.probe import ProbeConvergenceWarning

    x, y = _ill_conditioned()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LinearProbe(backend, Cs=(1.0, 10.0), max_iter=3).fit(x, y)
    ours = [w for w in caught if issubclass(w.category, ProbeConvergenceWarning)]
    assert len(caught) == len(ours) == 1, [str(w.message) for w in caught]
    assert "raise max_iter" in str(ours[0].message) and "max_iter=3" in str(ours[0].message)


def test_a_chunked_fit_equals_the_in_memory_fit(tmp_path):
    """Streaming == one-shot: the same C, validation scores and predictions, weights equal to
    float summation order, also when the features are a memory-mapped file on disk."""
    import numpy as np

    x, y = _ill_conditioned()
    one = LinearProbe("torch", Cs=(0.1, 1.0, 10.0)).fit(x, y)
    np.save(tmp_path / "x.npy", x.float().numpy())
    disk = torch.from_numpy(np.load(tmp_path / "x.npy", mmap_mode="c"))
    for features in (x, disk):
        many = LinearProbe("torch", Cs=(0.1, 1.0, 10.0), chunk_rows=37).fit(features, y)
        assert many.C_ == one.C_ and many.val_scores_ == one.val_scores_
        rel = (many.coef_ - one.coef_).norm() / one.coef_.norm()
        assert rel < (1e-9 if features is x else 1e-4), rel  # the file holds float32
        assert torch.equal(many.predict(features), one.predict(x))
    assert LinearProbe(chunk_rows=37).fit(x[:200], y[:200]).backend_ == "torch"
    with pytest.raises(ConfigError, match="backend='torch'"):
        LinearProbe("sklearn", chunk_rows=37).fit(x, y)
    with pytest.raises(ConfigError, match="chunk_rows must be an int >= 1"):
        LinearProbe(chunk_rows=0).fit(x, y)


def test_a_chunked_knn_search_equals_the_one_shot_search():
    x, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(0)
    x = torch.as_tensor(x, dtype=torch.float32) + 0.01 * torch.randn(len(x), 64, generator=g)
    y = torch.as_tensor(y)
    one = knn_accuracy(x[:1200], y[:1200], x[1200:], y[1200:])
    many = knn_accuracy(x[:1200], y[:1200], x[1200:], y[1200:], chunk=77)
    assert many["k"] == one["k"] and many["val_scores"] == one["val_scores"]
    assert torch.equal(many["predictions"], one["predictions"])
    assert 0.9 < one["accuracy"] < 1.0


def test_probes_on_features_stored_on_disk_equal_in_memory(tmp_path, digits):
    model = tiny_resnet()
    train, test = Subset(digits, range(120)), Subset(digits, range(120, 170))
    for probe in (linear_probe, knn_probe):
        ram = probe(model, train, test, device="cpu")
        disk = probe(model, train, test, device="cpu", store=tmp_path / "store")
        assert disk.accuracy == ram.accuracy and disk.choice == ram.choice
        assert disk.meta["store"] is True and "store" not in ram.meta
    assert len(list((tmp_path / "store").glob("*.features.npy"))) == 2  # train and test
    with pytest.raises(ConfigError, match="not both"):
        linear_probe(model, train, test, cache_dir=tmp_path / "c", store=tmp_path / "s")


class Watched(torch.Tensor):
    """Features that record what is done to them as a whole: the rows read by indexing, and
    every other operation (a copy, a conversion, a reduction over all rows)."""

    reads: ClassVar[list[int]] = []
    whole: ClassVar[list[str]] = []
    FREE: ClassVar = {"__len__", "__get__", "dim", "size", "__repr__"}  # shape, len(x), ...

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.__getitem__:
            cls.reads.append(len(out))
        elif getattr(func, "__name__", str(func)) not in cls.FREE:
            cls.whole.append(getattr(func, "__name__", str(func)))
        return out


def test_a_chunked_fit_never_copies_the_features():
    """Memory stays flat as N grows: with chunk_rows, fitting, validating and predicting
    touch the features only by reading at most chunk_rows rows at a time (a float64 copy,
    a standardized copy or a full-matrix reduction would show up here)."""
    x, y = _ill_conditioned()
    watched = x.float().as_subclass(Watched)
    Watched.reads.clear()
    Watched.whole.clear()
    probe = LinearProbe(Cs=(1.0, 10.0), chunk_rows=50).fit(watched, y)
    probe.predict(watched)
    knn_accuracy(watched, y, watched[:40].as_subclass(Watched), y[:40], chunk=50)
    assert Watched.whole == [] and 0 < max(Watched.reads) <= 50, (Watched.whole, Watched.reads)
    assert len(Watched.reads) > 3 * len(x) / 50  # many passes, each a chunk at a time
