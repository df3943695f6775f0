import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from memprune import Splits, load_dataset, make_splits
from memprune.data import (
    ImageDataset,
    MultiView,
    SimCLRAugment,
    loop_views,
    view_generator,
    view_place,
)
from memprune.data._augment import PARAMS
from memprune.errors import ConfigError, DataError, DatasetNotFoundError


def test_digits_items_and_split(digits):
    test = load_dataset("digits", "test")
    assert len(digits) == 1437 and len(test) == 360
    image, label, index = digits[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0 and image.max() > 0.5
    assert index == 5 and 0 <= label < 10
    assert torch.equal(load_dataset("digits", "train")[5][0], image)  # fixed split
    assert sorted(set(digits.labels.tolist())) == list(range(10))


def _all_views(ds, batch_size, workers):
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers)
    views, idx = zip(*[(v, i) for v, _, i in loader])
    return torch.cat(views), torch.cat(idx)


def test_views_identical_across_batch_sizes_workers_and_subsets(digits):
    sub = Subset(digits, list(range(12)))
    mv = MultiView(sub, n_views=3, seed=7)
    a, ia = _all_views(mv, 5, 0)
    b, ib = _all_views(mv, 12, 2)
    assert a.shape == (12, 3, 3, 32, 32)
    assert torch.equal(ia, ib) and torch.equal(a, b)
    # the same point through another subset (other position) gets the same views
    other = MultiView(Subset(digits, [11, 3]), n_views=3, seed=7)
    assert torch.equal(other[0][0], a[11]) and other[0][2] == 11
    # views of one point differ from each other, and another seed gives other views
    assert not torch.equal(a[0, 0], a[0, 1])
    assert not torch.equal(MultiView(sub, 3, seed=8)[0][0], a[0])


def test_augment_works_on_unit_range_images(digits):
    """Augmentation runs before normalization: views stay in [0, 1] and keep their content."""
    image = digits[0][0]
    aug = SimCLRAugment(jitter_p=1.0, gray_p=0.0)
    views = torch.stack([aug(image, view_generator(0, 0, k)) for k in range(20)])
    assert views.min() >= 0 and views.max() <= 1
    # jitter on [0, 1] keeps bright strokes bright; on a normalized tensor they would be clamped
    assert (views.amax(dim=(1, 2, 3)) > 0.3).all()
    assert views.std() > 0.05


def test_multiview_none_and_callable(digits):
    mv = MultiView(digits, 2, augment="none")
    views, label, index = mv[3]
    assert torch.equal(views[0], digits[3][0]) and torch.equal(views[1], digits[3][0])
    flip = MultiView(digits, 2, augment=lambda img, g: img.flip(-1))
    assert torch.equal(flip[3][0][0], digits[3][0].flip(-1))
    with pytest.raises(ConfigError, match="n_views"):
        MultiView(digits, 0)
    with pytest.raises(ConfigError, match="unknown augmentation 'simclar'"):
        MultiView(digits, 2, augment="simclar")
    with pytest.raises(ConfigError, match="scale"):
        MultiView(digits, 2, {"scale": (0.5, 2.0)})


def _both(views: MultiView):
    """The same views made by the loader (host) and in batches (on the CPU here)."""
    host = torch.cat([b.flatten(0, 1) for b, _, _ in DataLoader(views, batch_size=7)])
    deferred, make = loop_views(views, torch.device("cpu"), "device")
    made = torch.cat([make(b) for b, _, _ in DataLoader(deferred, batch_size=5)])
    return host, made, deferred


@pytest.mark.parametrize(
    "augment, size, tol",
    [
        ("simclr", 32, 1e-4),  # crops enlarged to the image size, every colour operation
        ({"size": 24}, 40, 1e-4),  # larger images: some crops shrink (antialiased path)
        ({"preset": "crop_flip"}, 32, 1e-5),  # geometry alone: sampling the crop's own pixels
    ],
)
def test_views_made_in_batches_equal_host_views(augment, size, tol):
    """Views made on a device from deferred parameters are the loader's views up to float
    rounding: the same (seed, point, view) draws, every branch (crops shrunk and enlarged,
    flip, each jitter order, grayscale) taken."""
    g = torch.Generator().manual_seed(0)
    data = ImageDataset(torch.rand(24, 3, size, size, generator=g), torch.zeros(24), "r", ["0"])
    views = MultiView(data, 4, augment, seed=3)
    host, made, deferred = _both(views)
    assert made.shape == host.shape
    assert (made - host).abs().max() < tol
    (image, params), _, index = deferred[5]
    assert torch.equal(image, data[5][0])
    fresh = views.augment.draw(size, size, view_generator(3, index, 2))
    assert torch.equal(params[2], fresh) and params.shape == (4, len(PARAMS))
    every = torch.stack([deferred[i][0][1] for i in range(len(data))]).flatten(0, 1)
    assert every[:, PARAMS.index("flip")].any() and not every[:, PARAMS.index("flip")].all()
    if views.augment.jitter_p > 0:
        assert every[:, PARAMS.index("gray")].any() and every[:, PARAMS.index("jitter")].any()
    if size > views.augment._size(size, size)[0]:
        assert (every[:, PARAMS.index("height")] > 24).any()  # the antialiased path ran


def test_deferred_views_without_augmentation_are_exact(digits):
    host, made, _ = _both(MultiView(Subset(digits, range(10)), 3, "none"))
    assert torch.equal(made, host)


def test_where_views_are_made():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # cuda: a name only, nothing runs
    assert view_place("auto", cpu, "simclr") == "host"
    assert view_place("auto", cuda, "simclr") == "device"
    assert view_place("auto", cuda, "none") == "device"
    custom = lambda img, g: img.flip(-1)  # noqa: E731
    assert view_place("auto", cuda, custom) == "host"  # a plain callable cannot be batched
    assert view_place("device", cpu, "simclr") == "device"
    data = ImageDataset(torch.rand(4, 3, 8, 8), torch.zeros(4), "r", ["0"])
    with pytest.raises(ConfigError, match="views='host'"):
        loop_views(MultiView(data, 2, custom), cpu, "device")
    with pytest.raises(ConfigError, match="unknown views 'gpu'"):
        view_place("gpu", cpu, "simclr")
    views = MultiView(data, 2)
    assert loop_views(views, cpu, "auto")[0] is views  # the CPU default: the loader makes them


def test_unknown_and_missing_datasets(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="Did you mean digits"):
        load_dataset("digit")
    with pytest.raises(ConfigError, match="root=DIR"):
        load_dataset("cifar10")
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        load_dataset("cifar10", root=tmp_path)
    with pytest.raises(ConfigError, match="split"):
        load_dataset("digits", split="val")


def _write_folder(root, n_per_class=3, size=10):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")


def test_image_folder(tmp_path):
    _write_folder(tmp_path)
    ds = load_dataset(str(tmp_path), img_size=8)
    assert len(ds) == 6 and ds.classes == ["cat", "dog"]
    image, label, index = ds[4]
    assert image.shape == (3, 8, 8) and label == 1 and index == 4
    assert image.min() >= 0 and image.max() <= 1
    with pytest.raises(DatasetNotFoundError, match="no test/ subfolder"):
        load_dataset(str(tmp_path), split="test")
    bad = tmp_path / "dog" / "broken.png"
    bad.write_bytes(b"not an image")
    ds = load_dataset(str(tmp_path))
    position = [p for p, _ in ds.base.samples].index(str(bad))
    with pytest.raises(DataError, match="broken.png"):
        ds[position]


def test_make_splits_disjoint_seeded_and_saved(tmp_path):
    s = make_splits(100, shared=0.5, candidate=10, extra=10, test=0.2, seed=3)
    assert (len(s.shared), len(s.candidate), len(s.extra), len(s.test)) == (50, 10, 10, 20)
    sets = [set(s.shared), set(s.candidate), set(s.extra), set(s.test)]
    assert sum(map(len, sets)) == len(set().union(*sets))
    assert make_splits(100, 0.5, 10, 10, 0.2, seed=3) == s
    assert make_splits(100, 0.5, 10, 10, 0.2, seed=4) != s
    assert s.f_indices == sorted(s.shared + s.candidate)
    s.save(tmp_path / "splits.json")
    assert Splits.load(tmp_path / "splits.json") == s


def test_bad_splits():
    with pytest.raises(ConfigError, match="= 110 points but the data set has 100"):
        make_splits(100, 50, 30, 30)
    with pytest.raises(ConfigError, match="outside"):
        make_splits(100, 1.5, 0, 0)
    with pytest.raises(ConfigError, match="index 3 is in both 'shared' and 'candidate'"):
        Splits(n=10, shared=[1, 3], candidate=[3])
    with pytest.raises(ConfigError, match="outside"):
        Splits(n=10, extra=[10])


def test_folder_classes_are_mapped_by_name_across_splits(tmp_path):
    """test/ lacks class b: class c keeps the label it has in train/ (2), not 1."""
    for split, classes in (("train", "abc"), ("test", "ac")):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            image = Image.new("RGB", (8, 8), (10 * ord(c) % 255, 0, 0))
            image.save(tmp_path / split / c / "0.png")
    train = load_dataset(str(tmp_path), "train", img_size=8)
    test = load_dataset(str(tmp_path), "test", img_size=8)
    assert sorted(train[i][1] for i in range(len(train))) == [0, 1, 2]
    assert sorted(test[i][1] for i in range(len(test))) == [0, 2]
    assert train.classes == test.classes == ["a", "b", "c"]


def test_read_indices_from_a_list_or_a_splits_file(tmp_path):
    import json

    from memprune.data import make_splits, read_indices

    splits = make_splits(40, 10, 5, 5, 0, seed=1)
    splits.save(tmp_path / "splits.json")
    assert read_indices(tmp_path / "splits.json", "f") == splits.f_indices
    assert read_indices(tmp_path / "splits.json", "extra") == splits.extra
    (tmp_path / "list.json").write_text(json.dumps([3, 1, 2]))
    assert read_indices(tmp_path / "list.json") == [3, 1, 2]
    with pytest.raises(ConfigError, match="is a splits file: name which of shared"):
        read_indices(tmp_path / "splits.json")
    with pytest.raises(ConfigError, match="not 'h'"):
        read_indices(tmp_path / "splits.json", "h")
