"""Canaries: making them, their coins in the split, the audit, UnitMem's localization and the
causal ablation test, on a constructed encoder with known answers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.data import Subset

import memprune
from memprune.data import CANARY_KINDS, Splits, WithCanaries, make_canaries, make_splits
from memprune.errors import ConfigError, SiteError
from memprune.pruning import canary_ablation
from memprune.scores import canary_audit, canary_unit_map, canary_units
from memprune.train import pretrain_pair, pretrain_simclr

from .conftest import noise_views, tiny_resnet


@pytest.mark.parametrize("kind", list(CANARY_KINDS))
def test_canaries_are_seeded_atypical_images_appended_to_the_data(digits, kind):
    base = Subset(digits, range(50))
    a, b = make_canaries(base, 6, kind, seed=3), make_canaries(base, 6, kind, seed=3)
    assert torch.equal(a.images, b.images) and a.images.shape == (6, 3, 32, 32)
    assert a.images.min() >= 0 and a.images.max() <= 1
    assert not torch.equal(a.images, make_canaries(base, 6, kind, seed=4).images)
    data = WithCanaries(base, a)
    assert len(data) == 56 and data.canary_indices == list(range(50, 56))
    image, label, index = data[52]
    assert torch.equal(image, a.images[2]) and label == int(a.labels[2]) and index == 52
    assert torch.equal(data[7][0], base[7][0]) and data[7][2] == 7
    if a.sources[0]:  # made from training images, unlike any of them
        src = torch.stack([base[s[0]][0] for s in a.sources])
        assert (a.images - src).abs().mean() > 0.05


def test_collage_and_shuffle_canaries_are_made_of_their_sources(digits):
    base = Subset(digits, range(50))
    collage = make_canaries(base, 3, "collage", seed=1)
    for image, sources in zip(collage.images, collage.sources):
        quarters = [image[:, :16, :16], image[:, :16, 16:], image[:, 16:, :16], image[:, 16:, 16:]]
        for quarter, i in zip(quarters, sources):  # each quarter: a source at half size
            half = torch.nn.functional.interpolate(
                base[i][0][None], size=(16, 16), mode="bilinear", antialias=True
            )[0]
            torch.testing.assert_close(quarter, half)
    shuffle = make_canaries(base, 3, "shuffle", seed=1)
    for image, (i,) in zip(shuffle.images, shuffle.sources):
        tiles = image.unfold(1, 8, 8).unfold(2, 8, 8).reshape(3, 16, 64)
        own = base[i][0].unfold(1, 8, 8).unfold(2, 8, 8).reshape(3, 16, 64)
        assert not torch.equal(tiles, own)  # moved ...
        key = lambda t: sorted(t[0].tolist())  # noqa: E731
        assert key(tiles) == key(own)  # ... but the same 16 tiles


def test_canary_coins_join_f_and_never_g(tmp_path):
    plain = make_splits(100, 0.3, 0.2, 0.2, seed=5)
    with_c = make_splits(140, 0.3, 0.2, 0.2, seed=5, canaries=40, p=0.5)
    for part in ("shared", "candidate", "extra", "test"):  # the same parts as without canaries
        assert getattr(with_c, part) == getattr(plain, part)
    assert with_c.canaries == list(range(100, 140))
    assert 0 < len(with_c.included) < 40 and set(with_c.included) <= set(with_c.canaries)
    assert set(with_c.included) <= set(with_c.f_indices)
    assert not set(with_c.canaries) & set(with_c.g_indices)
    assert set(with_c.excluded) == set(with_c.canaries) - set(with_c.included)
    assert with_c.indices("excluded") == with_c.excluded
    with_c.save(tmp_path / "s.json")
    assert Splits.load(tmp_path / "s.json") == with_c
    many = make_splits(10_100, 0, 0, 0, canaries=10_000, p=0.3, seed=1)
    assert abs(len(many.included) / 10_000 - 0.3) < 0.02  # each coin has probability p
    with pytest.raises(ConfigError, match="p .* must be in"):
        make_splits(20, 0.5, 0.1, 0.1, canaries=4, p=1.0)


def test_repeated_canaries_are_trained_on_that_many_times_and_scored_once(digits, tmp_path):
    once = make_splits(140, 0.3, 0.2, 0.2, seed=5, canaries=40)
    thrice = make_splits(140, 0.3, 0.2, 0.2, seed=5, canaries=40, repeat=3)
    assert thrice.included == once.included and thrice.f_indices == once.f_indices
    assert once.f_training == once.f_indices
    counts = {i: thrice.f_training.count(i) for i in set(thrice.f_training)}
    assert all(counts[i] == 3 for i in thrice.included)
    assert all(counts[i] == 1 for i in thrice.shared + thrice.candidate)
    thrice.save(tmp_path / "s.json")
    assert Splits.load(tmp_path / "s.json") == thrice
    with pytest.raises(ConfigError, match="repeat must be an int >= 1, got 0"):
        make_splits(140, 0.3, 0.2, 0.2, canaries=40, repeat=0)
    with pytest.raises(ConfigError, match="duplicates"):  # only on purpose
        pretrain_simclr("resnet18", Subset(digits, range(8)), [0, 1, 1, 2],
                        batch_size=2, epochs=1, out_dir=tmp_path / "dup")  # fmt: skip


class CanaryMemory(torch.nn.Module):
    """A constructed encoder with a known answer: a fixed projection of the image, plus memory
    units (``act``), one per stored key, that fire only for an input close to their key and add
    a large value vector; and ordinary units (one per ``typical`` image: its centred pixels)
    that respond to typical images and add little. f stores the included canaries; g is f
    with the memory switched off."""

    def __init__(self, keys: torch.Tensor, typical: torch.Tensor, dim: int = 32, memory=True):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        d = keys[0].numel()
        n_dummy = len(typical)
        self.register_buffer("proj", torch.randn(d, dim, generator=gen) / d**0.5)
        rows = keys.flatten(1) - 0.5
        rows = rows / rows.norm(dim=1, keepdim=True)
        dummy = typical.flatten(1) - typical.flatten(1).mean(1, keepdim=True)
        dummy = dummy + 0.05 * torch.randn(dummy.shape, generator=gen)
        dummy = dummy / dummy.norm(dim=1, keepdim=True)
        self.memory = torch.nn.Linear(d, len(keys) + n_dummy)
        with torch.no_grad():
            self.memory.weight.copy_(torch.cat([rows, dummy]))
            # a key's own match is ~27.7, any other image's < 2 (3072 pixels, binary keys)
            self.memory.bias.copy_(torch.cat([torch.full((len(keys),), -13.8),
                                              torch.zeros(n_dummy)]))  # fmt: skip
            if not memory:
                self.memory.weight[: len(keys)] = 0
                self.memory.bias[: len(keys)] = 0
        self.act = torch.nn.ReLU()
        self.values = torch.nn.Linear(len(keys) + n_dummy, dim, bias=False)
        with torch.no_grad():
            self.values.weight.copy_(torch.cat([50 * torch.randn(dim, len(keys), generator=gen),
                                                0.1 * torch.randn(dim, n_dummy, generator=gen)],
                                               dim=1))  # fmt: skip
        self.num_features = dim
        self.pretrained_cfg = {"architecture": "canary_memory", "input_size": (3, 32, 32)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return x @ self.proj + self.values(self.act(self.memory(x)))


@pytest.fixture(scope="module")
def planted(digits):
    """Typical points, 12 binary-pattern canaries (strength 1), their coins, and the pair."""
    base = Subset(digits, range(40))
    canaries = make_canaries(base, 12, "pattern", seed=0, strength=1.0)
    data = WithCanaries(base, canaries)
    splits = make_splits(len(data), 0.5, 0.25, 0.25, canaries=12, p=0.5, seed=2)
    keys = torch.stack([data[i][0] for i in splits.included])
    typical = torch.stack([base[i % 40][0] for i in range(200)])
    f, g = CanaryMemory(keys, typical), CanaryMemory(keys, typical, memory=False)
    return data, splits, f, g


AUDIT = dict(n_pairs=3, augment=noise_views, chunk_size=16)


def test_an_encoder_storing_the_included_canaries_is_audited_with_the_known_answer(
    planted, tmp_path
):
    data, splits, f, g = planted
    assert 2 <= len(splits.included) <= 10
    audit = canary_audit(f, g, data, splits.included, splits.excluded, layers=["output"], **AUDIT)
    row = audit.table()[-1]
    assert row["auc"] == 1.0 and row["tpr_at_1pct_fpr"] == 1.0 and row["tpr_at_10pct_fpr"] == 1.0
    diff, se = audit.sslmem_difference()
    assert diff > 0.5 and diff > 5 * se
    assert audit.separable_layer() == "output"
    same = canary_audit(g, g, data, splits.included, splits.excluded, layers=["output"], **AUDIT)
    assert same.sslmem_difference()[0] == 0.0  # an encoder against itself: nothing
    loaded = type(audit).load(audit.save(tmp_path / "audit"))
    assert torch.equal(loaded.sslmem_included, audit.sslmem_included)
    assert loaded.table() == audit.table()


def test_unitmem_finds_the_memory_units_and_ablating_them_removes_the_signal(planted):
    data, splits, f, g = planted
    scores = memprune.unit_mem(f, data, n_views=3, sites=["act"], augment=noise_views,
                               progress=False)  # fmt: skip
    memory = canary_unit_map(scores, splits.included)["act"]
    n = len(splits.included)
    assert memory == list(range(n))  # exactly the memory units point at included canaries
    argmax = scores.sites["act"]["argmax"][:n].tolist()
    assert argmax == splits.included  # unit m's argmax is the canary it stores
    rows = {r["site"]: r for r in canary_units(scores, list(range(len(data))), splits.included,
                                               splits.excluded)}  # fmt: skip
    assert rows["act"]["top_included"] > rows["act"]["chance_included"]
    assert rows["act"]["top_excluded"] < rows["act"]["top_included"]

    from memprune.pruning._ablate import ABLATED

    def accuracy(model):  # a known cost: one point of accuracy per ablated unit
        return 0.9 - 0.01 * sum(len(u) for u in getattr(model, ABLATED, {}).values())

    table = canary_ablation(f, g, data, scores, splits.included, splits.excluded,
                            evaluate=accuracy, seeds=(0, 1), **AUDIT)  # fmt: skip
    arms = {(r["arm"], r["seed"]): r for r in table}
    assert arms[("none", None)]["auc"] == 1.0
    assert arms[("none", None)]["removed_per_point"] is None  # nothing lost: no ratio
    canary = arms[("canary", None)]
    assert canary["units"] == n and canary["sslmem_diff"] == 0.0  # f without its memory is g
    assert canary["auc_drop"] > 0.2
    assert canary["accuracy_drop"] == pytest.approx(0.01 * n)
    assert canary["removed_per_point"] == pytest.approx(canary["sslmem_drop"] / n)
    for seed in (0, 1):  # as many random units of the site: the memory mostly survives
        assert arms[("random", seed)]["auc"] >= 0.9
        assert arms[("random", seed)]["sslmem_drop"] < 0.5 * canary["sslmem_drop"]


def test_ablate_zeroes_units_at_their_site_even_a_residual_one(digits, tmp_path):
    """``layer1.0.act2`` also adds the shortcut: zeroing the weights before it would not
    switch its units off, the site hook does; the original is untouched and saving the
    ablated copy is refused (its weights do not hold the ablation)."""
    model = tiny_resnet()
    x = torch.stack([digits[i][0] for i in range(4)])
    from memprune.hooks import capture

    for site in ("layer1.0.act1", "layer1.0.act2"):
        ablated = memprune.ablate(model, {site: [0, 3, 5]})
        sites = [s for s in memprune.find_sites(ablated, "units") if s.name == site]
        with (
            torch.inference_mode(),
            capture(ablated, sites) as got,
            capture(model.eval(), sites) as ref,
        ):
            ablated(x)
            model(x)
        assert got[site][:, [0, 3, 5]].abs().max() == 0 and ref[site][:, [0, 3, 5]].abs().max() > 0
        assert torch.equal(got[site][:, 1], ref[site][:, 1])  # units before it are untouched
    assert all(torch.equal(a, b) for a, b in zip(ablated.state_dict().values(),
                                                 model.state_dict().values()))  # fmt: skip
    with pytest.raises(ConfigError, match="ablated copy"):
        memprune.save_pruned(ablated, tmp_path / "x")
    with pytest.raises(SiteError, match="has 8 units"):
        memprune.ablate(model, {"layer1.0.act1": [99]})
    vit = memprune.load_encoder("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1,
                                embed_dim=32, num_heads=2)  # fmt: skip
    memprune.ablate(vit, {"blocks.0.attn:heads": list(range(16))})  # a head, at proj's input


@pytest.mark.slow
def test_a_recipe_with_canaries_records_their_coins_and_reports_the_audit(tmp_path):
    """``data.canaries`` appends them to the train split, pretrain records their coins, and the
    canaries stage writes the audit, the localization and the ablation tables into the run and
    its report (a short budget: the numbers are not judged here)."""
    import json

    from memprune.recipes import load_recipe, run_recipe

    from .conftest import ROOT

    off = ["encoder.supervised.enabled=false", "scores.unitmem.enabled=false",
           "scores.classmem.enabled=false", "scores.sslmem.enabled=false",
           "scores.layermem.enabled=false", "scores.cka.enabled=false",
           "actions.prune.enabled=false", "actions.finetune.enabled=false",
           "evaluation.knn=false", "evaluation.cs=[1.0]", "encoder.pretrain.epochs=1",
           "encoder.pretrain.batch_size=64"]  # fmt: skip
    canaries = "data.canaries={n: 10, kind: mix, n_typical: 16, views: 2, pairs: 2, seeds: [0]}"
    recipe = load_recipe(ROOT / "recipes" / "digits-resnet.yaml", [*off, canaries])
    run = run_recipe(recipe, tmp_path / "run", log=lambda line: None)
    splits = Splits.load(run / "pretrain" / "splits.json")
    assert len(splits.canaries) == 10 and splits.canaries[0] == splits.n - 10
    assert set(splits.included) <= set(splits.f_indices)
    for name in ("canaries.md", "canaries.png", "canary_units.md", "canary_ablation.md"):
        assert (run / "canaries" / name).is_file(), name
    done = json.loads((run / "canaries" / "done.json").read_text())
    assert done["n_included"] + done["n_excluded"] == 10
    assert [r["arm"] for r in done["rows"]] == ["none", "canary", "lowest", "random"]
    report = (run / "report.md").read_text()
    assert "Canaries (mix" in report and "UnitMem against the canaries" in report
    assert "atypical (canary) points are memorized more" in report
    with pytest.raises(ConfigError, match="pair: true"):
        load_recipe(ROOT / "recipes" / "digits-resnet.yaml",
                    [canaries, "encoder.pretrain.pair=false"])  # fmt: skip
    # the split records what makes the canaries; a run on f's checkpoint reads it from beside
    # f, and only with the canaries f was trained with
    assert splits.canary_spec == {"n": 10, "kind": "mix", "seed": 0, "strength": 0.5}
    from memprune.recipes._context import Context

    f = run / "pretrain" / "f"
    on_f = [*off, "encoder.pretrain=null", f"encoder.checkpoint={f}",
            f"encoder.reference={run / 'pretrain' / 'g'}"]  # fmt: skip

    def ctx(*sets):
        recipe = load_recipe(ROOT / "recipes" / "digits-resnet.yaml", [*on_f, *sets])
        return Context(recipe, tmp_path / "other", log=lambda line: None)

    assert ctx(canaries).splits().included == splits.included
    with pytest.raises(ConfigError, match="f was trained with canaries .*'kind': 'mix'"):
        ctx(canaries.replace("mix", "noise")).splits()
    plain = ctx("data.canaries=null")  # the base points only: the parts still index them
    assert plain.splits().candidate == splits.candidate and len(plain.train) == splits.n - 10
    with pytest.raises(ConfigError, match="data.canaries make .* but f was trained with"):
        ctx(canaries.replace("n: 10", "n: 12")).splits()
    bare = tmp_path / "bare"
    bare.mkdir()
    dataclasses.replace(splits, n=splits.n - 10, canaries=[], included=[],
                        canary_spec=None).save(bare / "splits.json")  # fmt: skip
    with pytest.raises(ConfigError, match="f was trained without canaries"):
        ctx(canaries, f"encoder.checkpoint={bare / 'f'}").splits()
    # `memprune prune --reference g --forgetting` on f: each pruned encoder's SSLMem of f's
    # candidates against g, beside that of unseen points; the verdict names the criterion
    from memprune.cli import main

    pruned = tmp_path / "pruned"
    assert main(["prune", "--checkpoint", str(f), "--reference", str(run / "pretrain" / "g"),
                 "--forgetting", "--data", "digits", "--ratio", "0.5", "--strategy",
                 "magnitude", "random", "--seeds", "0", "1", "--latency-batch", "0",
                 "--out", str(pruned)]) == 0  # fmt: skip
    header, *lines = (pruned / "privacy.csv").read_text().splitlines()
    assert "sslmem_unseen" in header and "memorization" in header and "canary" not in header
    assert [line.split(",")[0] for line in lines] == ["none", "magnitude", "random"]
    verdicts = json.loads((pruned / "results.json").read_text())["verdicts"]
    assert any("leaves the least memorization" in v for v in verdicts), verdicts


#: The toy canary pair of benchmarks/planted_margin.py (``--canaries``): f trains on 64
#: candidates and the included ones of 64 pattern canaries, each 8 times per epoch; g on 64
#: extras. Over training seeds 0-9 (data seed 0) the included-minus-excluded SSLMem difference
#: was mean +0.206, SD 0.070, min +0.119; over data and training seeds 0-10 mean +0.233, SD
#: 0.082, min +0.117; since copies of a repeated canary draw their own views and are not each
#: other's negatives, over data and training seeds 0-10 mean +0.264, SD 0.089, min +0.140.
#: The threshold is 2.4 SD below that mean: far above a pair that did not
#: memorize (the difference is then 0 within its standard error, about 0.06), and a trajectory
#: on another machine falls below it with a normal tail under 1%.
CANARY_THRESHOLD = 0.05
CANARY_TOY = dict(size=128, dim=48, snr=1.0, redraw=0.3)
CANARY_PAIR = dict(epochs=60, lr=1e-2, batch_size=32, proj_dim=32, img_size=8, progress=False,
                   channels=[8, 16, 32, 64])  # fmt: skip


@pytest.mark.slow
def test_a_trained_toy_pair_memorizes_its_included_canaries(tmp_path):
    """A trained pair with canaries: the included ones have higher SSLMem than the excluded
    ones, by a margin set from ten training seeds (benchmarks/planted_margin.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        toy = memprune.load_dataset("toy", "train", seed=0, **CANARY_TOY)
        data = WithCanaries(toy, make_canaries(toy, 64, "pattern", seed=0))
        splits = make_splits(len(data), 0.0, 0.5, 0.5, seed=0, canaries=64, repeat=8)
        f, g, splits = pretrain_pair("resnet18", data, tmp_path, splits=splits, seed=0,
                                     augment=toy.augment, **CANARY_PAIR)  # fmt: skip
        audit = canary_audit(f.encoder, g.encoder, data, splits.included, splits.excluded,
                             n_pairs=8, layers=["output"], augment=toy.augment,
                             progress=False)  # fmt: skip
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    diff, se = audit.sslmem_difference()
    assert diff > CANARY_THRESHOLD, (diff, se)
