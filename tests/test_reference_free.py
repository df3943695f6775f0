"""One encoder, no reference: the member gap, the UnitMem profile and Auto-RGN as layer
rankings for select_layers and compare_finetuning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

import memprune
from memprune.errors import ConfigError
from memprune.scores import MemberGapResult, member_gap
from memprune.tuning import (
    LayerValues,
    auto_rgn,
    compare_finetuning,
    layer_parameters,
    select_layers,
    unitmem_profile,
)

from .conftest import LAYERS, MemoryEncoder, noise_views, planted_layermem, tiny_resnet

VIEWS = dict(n_pairs=4, augment=noise_views, chunk_size=5, layers="output")


def test_planted_memory_has_the_known_member_gap(digits):
    """An encoder that stores its members: their views align, the non-members' do not, so the
    gap is large with an interval above 0 and the AUC is 1; swapping the roles flips both."""
    members, nonmembers = list(range(0, 24, 2)), list(range(1, 24, 2))
    f = MemoryEncoder(torch.stack([digits[i][0] for i in members]))
    r = member_gap(f, digits, digits, members, nonmembers, **VIEWS)
    assert r.layers == ["output"]
    assert r.gap()[0] > 0.5 and r.gap_ci()[0, 0] > 0.3, r.table()
    assert r.auc()[0] == 1.0
    swapped = member_gap(f, digits, digits, nonmembers, members, **VIEWS)
    torch.testing.assert_close(swapped.gap(), -r.gap())
    assert swapped.auc()[0] == 0.0


def test_member_losses_are_layermems_losses_and_save_load(digits, tmp_path):
    """The same view-pair distance as LayerMem: f's losses on its members equal layer_mem's
    loss_f on the same points, views and seed, at every layer."""
    f, g = tiny_resnet(), tiny_resnet()
    members, nonmembers = list(range(12)), list(range(100, 112))
    r = member_gap(f, digits, digits, members, nonmembers, n_pairs=2, n_boot=200, seed=3)
    lm = memprune.layer_mem(f, g, digits, members, n_pairs=2, seed=3)
    assert r.layers == lm.layers == [*LAYERS, "output"]
    assert torch.equal(r.member_loss, lm.loss_f)
    ci = r.gap_ci()
    assert ((ci[:, 0] <= r.gap()) & (r.gap() <= ci[:, 1])).all()
    assert torch.equal(ci, r.gap_ci())  # the bootstrap is seeded
    r.save(tmp_path / "gap")
    back = memprune.load_result(tmp_path / "gap")
    assert isinstance(back, MemberGapResult) and back.table() == r.table()


def test_member_sets_are_checked(digits):
    f = tiny_resnet()
    with pytest.raises(ConfigError, match="share 2 points"):
        member_gap(f, digits, digits, [0, 1, 2], [2, 3, 1])
    with pytest.raises(ConfigError, match="non-members must hold at least 2 points"):
        member_gap(f, digits, digits, [0, 1], [5])
    with pytest.raises(ConfigError, match="share 3 points"):  # the same points, as Subsets
        member_gap(f, Subset(digits, [4, 5, 6]), Subset(Subset(digits, [6, 5, 4, 9]), [0, 1, 2]))


def test_select_layers_by_every_single_encoder_ranking(digits):
    f = tiny_resnet()
    gap = member_gap(f, digits, digits, list(range(8)), list(range(8, 16)), n_pairs=1)
    assert select_layers(gap, 2).by == "gap"
    auc = gap.auc()[:-1]  # without the output
    top = select_layers(gap, 2, by="auc").layers
    assert sorted(auc[[LAYERS.index(n) for n in top]].tolist()) == sorted(
        auc.topk(2).values.tolist()
    )
    with pytest.raises(
        ConfigError, match=r"by='delta' comes from memprune.layer_mem.*ranks by gap, auc"
    ):
        select_layers(gap, 2, by="delta")
    with pytest.raises(ConfigError, match="not a layer ranking"):
        select_layers(memprune.unit_mem(f, Subset(digits, range(8)), n_views=1), 2)
    other = tiny_resnet()
    with torch.no_grad():
        other.conv1.weight.mul_(2)
    with pytest.raises(ConfigError, match="computed on an encoder with other weights"):
        select_layers(gap, 2, encoder=other)


def test_unitmem_profile_averages_the_units_each_layer_owns(digits):
    f = tiny_resnet()
    scores = memprune.unit_mem(f, Subset(digits, range(32)), n_views=1)
    p = unitmem_profile(scores, f)
    assert p.layers == LAYERS and p.rankings == ("unitmem", "unitmem_frac")
    owned = {"maxpool": ["act1"], "layer2.1": ["layer2.1.act1", "layer2.1.act2"]}
    for layer, sites in owned.items():
        units = torch.cat([scores[s]["score"].double() for s in sites])
        i = LAYERS.index(layer)
        assert p.ranking("unitmem")[i] == pytest.approx(float(units.mean()))
        assert p.ranking("unitmem_frac")[i] == pytest.approx(float((units > 0.5).double().mean()))
        assert p.counts[i] == len(units)
    assert select_layers(p, 1).layers == [LAYERS[int(p.ranking("unitmem").argmax())]]


def test_auto_rgn_is_the_relative_gradient_norm_of_each_layer(digits):
    """Checked against a direct computation: one full-batch gradient of the same loss."""
    from memprune.probe import extract_features
    from memprune.tuning._rankings import _fit_head

    f, train = tiny_resnet(), Subset(digits, range(60))
    rgn = auto_rgn(f, train, batch_size=16, head_steps=20)
    assert isinstance(rgn, LayerValues) and rgn.layers == LAYERS
    assert (rgn.ranking("rgn") > 0).all()
    feats = extract_features(f, train, progress=False)
    mean, std = feats.features.mean(0), feats.features.std(0).clamp_min(1e-6)
    head = _fit_head((feats.features - mean) / std, feats.labels, 20, seed=0)
    images = torch.stack([train[i][0] for i in range(len(train))])
    mu, sd = (torch.tensor(v).view(1, 3, 1, 1) for v in memprune.encoders.normalization(f))
    loss = F.cross_entropy(head((f((images - mu) / sd) - mean) / std), feats.labels)
    owner = layer_parameters(f, LAYERS)
    for layer in ("maxpool", "layer3.0"):
        params = [p for n, p in f.named_parameters() if owner.get(n) == layer]
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        want = (
            torch.cat([g.flatten() for g in grads]).norm()
            / torch.cat([p.detach().flatten() for p in params]).norm()
        )
        assert rgn.ranking("rgn")[LAYERS.index(layer)] == pytest.approx(float(want), rel=1e-3)


def test_compare_finetuning_runs_every_rule_at_the_same_budget():
    train = Subset(memprune.load_dataset("digits-shift", "train"), range(0, 1400, 14))
    test = Subset(memprune.load_dataset("digits-shift", "test"), range(0, 360, 6))
    f = tiny_resnet()
    delta = planted_layermem([0.1, 0.15, 0.4, 0.45, 0.5, 0.9, 0.95, 0.96, 0.97])
    values = torch.linspace(0, 1, len(LAYERS), dtype=torch.float64)
    flat = LayerValues(LAYERS, {"unitmem": values, "rgn": values.flip(0)}, torch.ones(9), {})
    rows, runs = compare_finetuning(
        f, {"delta": delta, "unitmem": flat, "rgn": flat}, train, test, ks=[1],
        strategies=["top", "last"], seeds=[0, 1], baseline=lambda enc, seed: 0.5,
        log=lambda *_: None, epochs=1, batch_size=64,
    )  # fmt: skip
    assert [r["strategy"] for r in rows] == ["linear probe", "top delta", "top unitmem",
                                             "top rgn", "last"]  # fmt: skip
    layers = {r["strategy"]: r["layers"] for r in rows}
    assert layers["top delta"] == "layer3.0" and layers["top unitmem"] == "layer4.1"
    assert layers["top rgn"] == "maxpool" and layers["last"] == "layer4.1"
    assert all(r["seeds"] == 2 for r in rows) and len(runs) == 8
    short = LayerValues(LAYERS[:-1], {"gap": values[:-1]}, torch.ones(8), {})
    with pytest.raises(ConfigError, match="rank other layers"):
        compare_finetuning(f, {"delta": delta, "gap": short}, train, test, [1], ["top"])
