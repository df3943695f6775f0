"""Shift families, the oracle and the regret of every rule (docs/method.md §10b)."""

import itertools

import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from memprune.data import Shift, load_dataset, shifted
from memprune.errors import ConfigError
from memprune.recipes import RecipeError, load_recipe
from memprune.tuning import (
    FinetuneRuns,
    LayerValues,
    estimate_shift,
    layer_blocks,
    layer_modules,
    shift_regret,
    trainable_parameters,
)

from .conftest import tiny_resnet
from .test_recipes import ROOT


class Styled(Dataset):
    """Two classes, each of two known styles: bright top half (style 0, 3 of every 4 images)
    or bright bottom half (style 1); the label is the colour channel. Plus a little noise."""

    def __init__(self, n: int = 40, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images, self.labels, self.style = [], [], []
        for i in range(n):
            label, style = i % 2, int((i // 2) % 4 == 3)
            x = 0.05 * torch.rand(3, 16, 16, generator=g)
            rows = slice(0, 8) if style == 0 else slice(8, 16)
            x[label, rows] += 0.9
            self.images.append(x)
            self.labels.append(label)
            self.style.append(style)
        self.labels = torch.tensor(self.labels)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i]), i


def test_turn_is_digits_shift_and_corruptions_grow_with_severity(digits):
    turned = load_dataset("digits", "train", shift="turn")
    reference = load_dataset("digits-shift", "train")
    assert all(torch.equal(turned[i][0], reference[i][0]) for i in range(0, len(digits), 101))
    for corruption in ("gaussian_noise", "blur", "contrast"):
        moved = []
        for severity in range(1, 6):
            data = shifted(digits, f"corrupt:{corruption}:{severity}", "train")
            x = torch.stack([data[i][0] for i in range(20)])
            clean = torch.stack([digits[i][0] for i in range(20)])
            assert x.min() >= 0 and x.max() <= 1
            assert torch.equal(x[3], data[3][0])  # the same image every time
            moved.append(float((x - clean).abs().mean()))
        assert all(a < b for a, b in itertools.pairwise(moved)), (corruption, moved)
    train = shifted(digits, "corrupt:gaussian_noise:3", "train")
    test = shifted(digits, "corrupt:gaussian_noise:3", "test")
    assert not torch.equal(train[0][0], test[0][0])  # each split draws its own noise


def test_subpopulation_trains_on_one_style_and_tests_on_the_other():
    train, test = Styled(80, seed=0), Styled(40, seed=1)
    source = shifted(train, "subpopulation", "train")
    target = shifted(test, "subpopulation", "test", train=train)
    assert {train.style[p] for p in source.positions} == {0}  # the larger style
    assert {test.style[p] for p in target.positions} == {1}
    assert len(source) == sum(s == 0 for s in train.style)
    assert len(target) == sum(s == 1 for s in test.style)
    assert source.labels.tolist() == [train.labels[p].item() for p in source.positions]


def test_relabel_moves_every_chosen_class_and_keeps_the_images(digits):
    data = shifted(digits, {"kind": "relabel", "fraction": 0.5}, "train")
    changed = {c for c, d in data.mapping.items() if c != d}
    assert len(changed) == 5 and sorted(data.mapping.values()) == list(range(10))
    assert torch.equal(data[7][0], digits[7][0])
    assert data[7][1] == data.mapping[digits[7][1]]
    again = load_dataset("digits", "test", shift="relabel")
    assert again.mapping == data.mapping  # both splits share the map


def test_shifts_apply_to_an_image_folder(tmp_path):
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (12, 12), (40 * i, 100, 80 * (c == "b"))).save(
                    tmp_path / split / c / f"{i}.png"
                )
    for spec in ("turn", "corrupt:blur:2", "subpopulation", "relabel"):
        data = load_dataset(str(tmp_path), "test", shift=spec)
        image, label, index = data[0]
        assert image.shape == (3, 12, 12) and label in (0, 1) and index == 0
        assert data.name.endswith(spec)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("corrupt:fog:3", r"unknown corruption 'fog': use one of gaussian_noise"),
        ("corrupt:blur", r"write corrupt:CORRUPTION:SEVERITY"),
        ("corrupt:blur:6", r"severity must be 1-5, got 6"),
        ("rotate", r"unknown shift 'rotate': use one of turn, corrupt"),
        ("turn:2", r"only corrupt takes parameters"),
    ],
)
def test_bad_shifts_name_the_fix(spec, message):
    with pytest.raises(ConfigError, match=message):
        Shift.parse(spec)


def test_recipe_refuses_bad_shifts():
    with pytest.raises(RecipeError, match=r"actions\.shifts\.shifts\[1\]: unknown corruption"):
        load_recipe(ROOT / "recipes" / "digits-shifts.yaml",
                    ["actions.shifts.shifts=[turn, 'corrupt:fog:1']"])  # fmt: skip
    with pytest.raises(RecipeError, match=r"actions\.shifts\.shift: 'labels' is neither"):
        load_recipe(ROOT / "recipes" / "digits-shifts.yaml", ["actions.shifts.shift=labels"])
    with pytest.raises(RecipeError, match=r"actions\.shifts\.shifts: \['turn', 'turn'\] repeats"):
        load_recipe(ROOT / "recipes" / "digits-shifts.yaml", ["actions.shifts.shifts=[turn,turn]"])


def test_blocks_are_every_layer_and_every_run_of_adjacent_layers():
    blocks = layer_blocks(["a", "b", "c", "d"], [1, 3])
    assert blocks == {1: [("a",), ("b",), ("c",), ("d",)], 3: [("a", "b", "c"), ("b", "c", "d")]}


def test_regret_against_a_known_oracle(monkeypatch):
    """Fine-tuning replaced by a known accuracy: 0.6 + 0.2 if the block holds layer3.0, + 0.1
    if it holds layer4.1, + 0.01 * seed. The oracle at k=1 is layer3.0, at k=2 the first block
    with layer3.0; a ranking that points at layer3.0 has regret 0, last-1 (layer4.1) 0.1,
    first-1 0.2."""
    f = tiny_resnet()
    layers = list(layer_modules(f))

    def fake(self, block, seed):
        block = tuple(block)
        acc = 0.6 + 0.2 * ("layer3.0" in block) + 0.1 * ("layer4.1" in block) + 0.01 * seed
        calls.append((block, seed))
        return {"layers": list(block), "seed": seed, "accuracy": acc}

    calls = []
    monkeypatch.setattr(FinetuneRuns, "__call__", fake)
    right = torch.tensor([float(name == "layer3.0") for name in layers])
    ranking = LayerValues(layers, {"rgn": right}, torch.ones(len(layers)))
    oracle, rows, _ = shift_regret(f, {"rgn": ranking}, None, None, ks=[1, 2], seeds=[0, 1, 2],
                                   strategies=["top", "last", "first", "all"],
                                   baseline=lambda e, s: 0.5 + 0.01 * s, log=lambda *a: None,
                                   epochs=1)  # fmt: skip
    at = {(r["rule"], r["k"]): r for r in rows}
    assert at[("oracle k=1", 1)]["layers"] == "layer3.0"
    assert at[("oracle k=2", 2)]["layers"] == "layer2.1 layer3.0"  # the first of the best
    assert at[("top rgn", 1)]["regret"] == pytest.approx(0.0, abs=1e-12)
    assert at[("last", 1)]["regret"] == pytest.approx(0.1)
    assert at[("first", 1)]["regret"] == pytest.approx(0.2)
    assert at[("first", 1)]["regret_se"] == pytest.approx(0.0, abs=1e-12)  # paired by seed
    assert at[("last", 2)]["regret"] == pytest.approx(0.1)  # layer4.0 layer4.1 vs 0.8
    assert at[("all", len(layers))]["regret"] == pytest.approx(-0.1)  # all beats every block
    assert at[("linear probe", 0)]["regret"] == pytest.approx(0.3)
    assert at[("oracle k=1", 1)]["choice_runs"] == len(layers) * 3
    assert at[("top rgn", 1)]["choice_runs"] == 0
    assert at[("last", 1)]["parameters"] == trainable_parameters(f, ["layer4.1"])
    assert trainable_parameters(f, layers) == sum(
        p.numel() for n, p in f.named_parameters() if not n.startswith(("fc", "head"))
    )
    assert len(oracle) == len(layers) + len(layers) - 1


def test_rules_that_pick_the_same_layers_share_a_run(digits, monkeypatch):
    import memprune.tuning._compare as compare

    made = []
    real = compare.finetune

    def counted(*args, **kw):
        made.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(compare, "finetune", counted)
    f = tiny_resnet()
    small = torch.utils.data.Subset(digits, range(48))
    runs = FinetuneRuns(f, small, small, epochs=1, batch_size=16, augment="none",
                        progress=False)  # fmt: skip
    a, b = runs(["layer4.1"], 0), runs(["layer4.1"], 0)
    assert a is b and len(made) == 1 and len(runs) == 1
    runs(["layer4.1"], 1)
    assert len(made) == 2


def test_the_feature_estimate_tells_the_three_families_apart(digits):
    f = tiny_resnet()
    test = load_dataset("digits", "test")
    for spec, family in (("turn", "input"), ("corrupt:contrast:4", "input"),
                         ("subpopulation", "feature"), ("relabel", "output")):  # fmt: skip
        train = shifted(digits, spec, "train")
        target = shifted(test, spec, "test", train=digits)
        est = estimate_shift(f, digits, train, target)
        assert est["family"] == family, (spec, est)


def test_the_surgical_claim_is_judged_on_the_best_single_layer_per_seed(tmp_path):
    import json

    from memprune.recipes._findings import FAILS, HOLDS, SKIPPED, shifts_depth

    def results(best_input: int, best_other: int) -> dict:
        rows = []
        for shift, family, best in (("turn", "input", best_input),
                                    ("relabel", "output", best_other)):  # fmt: skip
            for i in range(4):
                accs = [0.9 if i == best else 0.5 + 0.01 * s for s in range(3)]
                rows.append({"shift": shift, "family": family, "k": 1,
                             "accuracies": " ".join(map(str, accs))})  # fmt: skip
            rows.append({"shift": shift, "family": family, "k": 2, "accuracies": "1 1 1"})
        return {"oracle": rows}

    (tmp_path / "shifts").mkdir()
    for best_input, best_other, verdict in ((0, 3, HOLDS), (3, 0, FAILS)):
        (tmp_path / "shifts" / "results.json").write_text(
            json.dumps(results(best_input, best_other))
        )
        assert shifts_depth(tmp_path, {"shifts": {}}).verdict == verdict
    assert shifts_depth(tmp_path, {}).verdict == SKIPPED


def test_the_permutation_distances_equal_the_direct_formula():
    from memprune.tuning._oracle import _distances

    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64) * torch.arange(1, 6)
    first = torch.stack([torch.randperm(30, generator=g) < 12 for _ in range(4)]).double()
    for row, d in zip(first, _distances(x, first)):
        a, b = x[row.bool()], x[~row.bool()]
        spread = 0.5 * (a.var(0).sum() + b.var(0).sum())
        assert float(d) == pytest.approx(float((a.mean(0) - b.mean(0)).pow(2).sum() / spread))


def test_a_shift_task_is_made_of_the_data_sets_own_points_not_its_canaries(digits):
    from memprune.data import WithCanaries, make_canaries
    from memprune.recipes.stages.shifts import _own

    small = torch.utils.data.Subset(digits, range(20))
    with_canaries = WithCanaries(small, make_canaries(small, 4, "noise"))
    assert _own(with_canaries) is small and _own(small) is small
