import copy
import math
import warnings

import pytest
import torch
import torch_pruning as tp

import memprune
from memprune import UnitMemResult, find_sites, load_pruned, prune, save_pruned
from memprune.encoders import normalization
from memprune.errors import ConfigError, SiteError
from memprune.pruning import UnitMemImportance

from .conftest import tiny_resnet, tiny_vit

FAST = dict(latency_batch=None)  # latency is measured by benchmarks/prune_speed.py


def planted(model, seed=0, size=None, only=None):
    """A UnitMemResult of ``model`` whose scores are a seeded permutation per site (of the
    sites ``only(site)`` keeps, when given)."""
    g = torch.Generator().manual_seed(seed)
    sites = [s for s in find_sites(model, "units", input_size=size) if only is None or only(s)]
    fields = {}
    for s in sites:
        score = torch.randperm(s.n_units, generator=g).float() / s.n_units
        zero = torch.zeros(s.n_units)
        fields[s.name] = dict(score=score, argmax=zero.long(), mu_max=zero, mu_rest=zero,
                              dead=zero.bool())  # fmt: skip
    meta = {
        "kind": "unitmem",
        "model": model.pretrained_cfg["architecture"],
        "sites": {
            s.name: {"module": s.module, "role": s.role, "units": s.n_units, "source": s.source}
            for s in sites
        },
    }
    return UnitMemResult(fields, meta)


def randomize_norms(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model


def group(report, name):
    return next(g for g in report.groups if g["name"] == name)


def kept(report, name):
    g = group(report, name)
    removed = set(g["removed"])
    return [i for i in range(g["before"]) if i not in removed]


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_shapes_params_and_macs_shrink_by_the_ratio(ratio):
    model = tiny_resnet()
    pruned, report = prune(model, ratio=ratio, strategy="random", **FAST)
    for g in report.groups:
        expect = g["before"] - math.floor(ratio * g["before"]) if g["pruned"] else g["before"]
        assert g["after"] == expect, g
    assert pruned.layer1[0].conv1.out_channels == group(report, "layer1.0.bn1")["after"]
    assert pruned.layer1[0].bn1.num_features == pruned.layer1[0].conv2.in_channels
    assert pruned.layer3[1].conv1.out_channels == 32 - math.floor(ratio * 32)
    assert report.params[1] < report.params[0] and report.macs[1] < report.macs[0]
    n_params = sum(p.numel() for p in pruned.parameters())
    assert report.params[1] == n_params
    # most MACs sit in convs whose in and out channels both shrink: close to (1 - ratio)^2
    assert report.macs[1] / report.macs[0] < 1 - ratio / 2
    assert model.layer1[0].conv1.out_channels == 8  # the input encoder is untouched


@pytest.mark.parametrize("strategy", ["lowest", "highest"])
def test_score_strategies_remove_exactly_the_planted_units(strategy):
    model = tiny_resnet()
    scores = planted(model)
    _, report = prune(model, scores, ratio=0.5, strategy=strategy, **FAST)
    s = scores["layer2.0.act1"]["score"]
    order = torch.argsort(s, descending=strategy == "highest")
    assert group(report, "layer2.0.bn1")["removed"] == sorted(order[:8].tolist())
    # coupled residual sites are ranked by their mean score
    stage = group(report, "layer2.0.downsample.1")
    assert stage["sites"] == ["layer2.0.act2", "layer2.1.act2"]
    mean = (scores["layer2.0.act2"]["score"] + scores["layer2.1.act2"]["score"]) / 2
    order = torch.argsort(mean, descending=strategy == "highest")
    assert stage["removed"] == sorted(order[:8].tolist())


def test_random_is_seeded_and_coherent():
    model = randomize_norms(tiny_resnet())
    a, ra = prune(model, ratio=0.5, strategy="random", seed=1, **FAST)
    _, rb = prune(model, ratio=0.5, strategy="random", seed=1, **FAST)
    _, rc = prune(model, ratio=0.5, strategy="random", seed=2, **FAST)
    assert ra.groups == rb.groups and ra.groups != rc.groups
    out, inp = kept(ra, "layer1.0.bn1"), kept(ra, "bn1")  # conv1's output / input channels
    blk, ref = a.layer1[0], model.layer1[0]
    # one unit's conv weight, norm entries and the next conv's input go together
    assert torch.equal(blk.conv1.weight, ref.conv1.weight[out][:, inp])
    for attr in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(blk.bn1, attr), getattr(ref.bn1, attr)[out])
    stage = kept(ra, "layer1.0.downsample.1")
    assert torch.equal(blk.conv2.weight, ref.conv2.weight[stage][:, out])


def test_vit_mlp_and_heads_pruning_equals_zeroing_their_outputs():
    model = tiny_vit()
    pruned, report = prune(model, ratio=0.5, strategy="random", heads=True, **FAST)
    ref = copy.deepcopy(model)
    for b, blk in enumerate(ref.blocks):
        mlp = group(report, f"blocks.{b}.mlp.fc1")
        blk.mlp.fc2.weight.data[:, mlp["removed"]] = 0  # a removed neuron never reaches fc2
        heads = group(report, f"blocks.{b}.attn")
        assert (heads["before"], heads["after"]) == (2, 1)
        for h in heads["removed"]:
            d = blk.attn.head_dim
            blk.attn.proj.weight.data[:, h * d : (h + 1) * d] = 0
    attn = pruned.blocks[0].attn
    assert (attn.num_heads, attn.attn_dim, attn.qkv.out_features) == (1, 16, 48)
    assert pruned.blocks[0].mlp.fc1.out_features == 64
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), ref(x), atol=1e-5, rtol=1e-5)
        attn.fused_attn = not attn.fused_attn  # both attention paths run after pruning
        torch.testing.assert_close(pruned(x), ref(x), atol=1e-5, rtol=1e-5)


def test_output_width_kept_unless_asked():
    model = tiny_resnet()
    x = torch.randn(2, 3, 32, 32)
    kept_model, report = prune(model, ratio=0.5, strategy="magnitude", **FAST)
    assert kept_model(x).shape == (2, 64)
    assert [g["name"] for g in report.groups if g["output"]] == ["layer4.0.downsample.1"]
    assert not group(report, "layer4.0.downsample.1")["pruned"]
    narrow, _ = prune(model, ratio=0.5, strategy="magnitude", keep_output_width=False, **FAST)
    assert narrow(x).shape == (2, 32)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize(
    "name, kw",
    [
        ("resnet18", dict(channels=(8, 16, 32, 64))),
        ("mobilenetv3_small_050", {}),
        ("efficientnet_b0", {}),
        ("convnext_atto", {}),
        ("regnetx_002", {}),  # grouped convolutions: whole conv groups
        ("vit_tiny_patch16_224", dict(patch_size=8, depth=2, embed_dim=32, num_heads=2)),
    ],
)
def test_pruned_model_runs_and_save_load_is_exact(tmp_path, name, kw, ratio):
    """Every family at 30% and 50%; a ViT loses MLP neurons, heads and embedding width."""
    torch.manual_seed(0)
    model = memprune.load_encoder(name, img_size=32, **kw)
    vit = "vit" in name
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every group of every family is pruned
        pruned, report = prune(model, ratio=ratio, strategy="magnitude", heads=vit,
                               keep_output_width=not vit, **FAST)  # fmt: skip
    assert report.params[1] < report.params[0]
    assert all(g["pruned"] or g["output"] for g in report.groups)
    if vit:
        assert pruned.blocks[0].mlp.fc1.in_features < model.blocks[0].mlp.fc1.in_features
    save_pruned(pruned, tmp_path / "p")
    loaded = load_pruned(tmp_path / "p")
    via_encoder = memprune.load_encoder(checkpoint=tmp_path / "p")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = pruned(x)
        assert torch.equal(loaded(x), y) and torch.equal(via_encoder(x), y)
    assert normalization(loaded) == normalization(model)
    with pytest.raises(ConfigError, match="already holds"):
        save_pruned(pruned, tmp_path / "p")


def test_grouped_convolutions_lose_whole_groups_ranked_by_their_mean_score():
    torch.manual_seed(0)
    model = memprune.load_encoder("regnetx_002", img_size=32)
    scores = planted(model)
    conv = model.s1.b1.conv2.conv  # 24 channels in 3 groups of 8, in and out
    for site in ("s1.b1.conv1.bn.act", "s1.b1.conv2.bn.act"):  # both sides of the conv
        score = scores.sites[site]["score"]
        score[:] = torch.linspace(0.5, 1.0, 24)
        score[8:16] = 0.1  # the middle group has the lowest mean...
        score[0] = 0.0  # ...though the single lowest unit sits in the first
    pruned, report = prune(model, scores, ratio=0.5, strategy="lowest", **FAST)
    g = group(report, "s1.b1.conv2.conv")
    assert (g["kind"], g["before"], g["after"], g["removed"]) == ("convgroups", 3, 2, [1])
    assert g["sites"] == ["s1.b1.conv1.bn.act", "s1.b1.conv2.bn.act"]
    small = pruned.s1.b1.conv2.conv
    keep = torch.cat([torch.arange(0, 8), torch.arange(16, 24)])
    assert (small.groups, small.in_channels, small.out_channels) == (2, 16, 16)
    assert torch.equal(small.weight, conv.weight[keep])  # each kept group's slice, whole
    assert pruned.s1.b1.conv1.conv.out_channels == 16 and pruned.s1.b1.conv3.conv.in_channels == 16
    assert type(small) is torch.nn.Conv2d and type(conv) is torch.nn.Conv2d  # marks undone
    a = torch.randn(2, 24, 16, 16)
    with torch.no_grad():  # the kept groups compute what they computed before
        torch.testing.assert_close(small(a[:, keep]), conv(a)[:, keep])


def test_unitmem_importance_in_a_plain_metapruner_loop():
    model = randomize_norms(tiny_resnet())
    scores = planted(model)
    example = torch.zeros(1, 3, 32, 32)
    pruner = tp.pruner.MetaPruner(
        model, example, UnitMemImportance(scores, "lowest"), pruning_ratio=0.5,
        ignored_layers=[model.layer4],
    )  # fmt: skip
    stats = model.layer2[0].bn1.running_mean.clone()
    pruner.step()
    assert model.layer2[0].conv1.out_channels == 8
    lowest = torch.argsort(scores["layer2.0.act1"]["score"])[:8].tolist()
    keep = sorted(set(range(16)) - set(lowest))
    # the surviving units are exactly the 8 highest-scoring ones, their norm entries with them
    assert torch.equal(model.layer2[0].bn1.running_mean, stats[keep])
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_global_scope_respects_the_layer_cap():
    model = tiny_resnet()
    scores = planted(model)
    scores["layer3.0.act1"]["score"] -= 10  # every unit of one layer ranks lowest
    _, report = prune(model, scores, ratio=0.2, scope="global", max_layer_ratio=0.5, **FAST)
    target = group(report, "layer3.0.bn1")
    assert target["after"] == 16  # capped at half of 32
    pruned = [g for g in report.groups if g["pruned"]]
    removed = sum(g["before"] - g["after"] for g in pruned)
    assert removed == math.floor(0.2 * sum(g["before"] for g in pruned))


def test_iterative_pruning_rescores_the_shrunken_model():
    model = tiny_resnet()
    calls, trained = [], []

    def rescore(m):
        calls.append(m.layer2[0].conv1.out_channels)
        return planted(m, seed=len(calls))

    def between(m):  # the prune-recover loop: a recovery runs on the shrunken encoder
        trained.append(m.layer2[0].conv1.out_channels)
        with torch.no_grad():
            m.layer2[0].bn1.bias.add_(1.0)

    _, stepped = prune(model, planted(model), 0.5, steps=3, rescore=rescore,
                       between_steps=between, **FAST)  # fmt: skip
    _, once = prune(model, planted(model), 0.5, **FAST)
    # called between the steps only, each after the step's units are gone, rescoring after it
    assert trained == [14, 11] and calls == [14, 11]
    assert [g["after"] for g in stepped.groups] == [g["after"] for g in once.groups]
    # without rescore, the first scores follow the surviving units: same as one step
    _, follow = prune(model, planted(model), 0.5, steps=2, **FAST)
    assert follow.groups == once.groups


def test_bad_input_is_refused_clearly():
    model = tiny_resnet()
    for ratio in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"ratio must be a fraction in \[0, 1\)"):
            prune(model, ratio=ratio, strategy="random", **FAST)
    with pytest.raises(ConfigError, match="needs|ranks units by their scores"):
        prune(model, ratio=0.2, strategy="lowest", **FAST)
    with pytest.raises(SiteError, match="computed on a 'vit_tiny_patch16_224'"):
        prune(model, planted(tiny_vit()), ratio=0.2, **FAST)
    wider = memprune.load_encoder("resnet18", channels=(16, 16, 32, 64))
    with pytest.raises(SiteError, match="different .* model"):
        prune(model, planted(wider), ratio=0.2, **FAST)
    scores = planted(model)
    scores.sites["layer9.0.act1"] = scores.sites.pop("layer1.0.act1")
    with pytest.raises(SiteError, match="missing from this resnet18 encoder: layer9.0.act1"):
        prune(model, scores, ratio=0.2, **FAST)
    with pytest.raises(ConfigError, match="strategy"):
        prune(model, ratio=0.2, strategy="smallest", **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune(model, ratio=0.0, strategy="random", **FAST)  # a no-op is allowed and quiet


def test_the_fields_criteria_remove_the_units_they_rank_last():
    """Planted answers: network slimming removes the units whose BatchNorm scale is smallest;
    a unit with all-zero weights in every coupled layer goes first by magnitude and LAMP."""
    model = tiny_resnet()
    bn, conv, nxt = model.layer1[0].bn1, model.layer1[0].conv1, model.layer1[0].conv2
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.8, 0.1, 0.7, 0.2, 0.6, 0.3, 0.5, 0.4]))
    _, report = prune(model, ratio=0.5, strategy="bnscale", **FAST)
    assert group(report, "layer1.0.bn1")["removed"] == [1, 3, 5, 7]  # |gamma| 0.1 .. 0.4
    with torch.no_grad():
        conv.weight[6].zero_(), bn.weight[6].zero_(), bn.bias[6].zero_(), nxt.weight[:, 6].zero_()
    for strategy in ("magnitude", "lamp"):
        _, report = prune(model, ratio=0.125, strategy=strategy, **FAST)
        assert group(report, "layer1.0.bn1")["removed"] == [6], strategy
    with pytest.raises(
        ConfigError, match="'bnscale' finds nothing to score.*use magnitude or lamp"
    ):
        prune(tiny_vit(), ratio=0.5, strategy="bnscale", **FAST)
    pruned, _ = prune(tiny_vit(), ratio=0.5, strategy="lamp", **FAST)
    assert pruned.blocks[0].mlp.fc1.out_features == 64


@pytest.mark.parametrize("strategy", ["taylor", "hessian"])
def test_gradient_criteria_rank_by_weight_and_gradient(digits, strategy):
    """A unit zeroed in every coupled layer has weight x gradient (Taylor) and weight² x
    squared gradient (Hessian) 0 and goes first; the gradients are accumulated on the pruned
    copy only and cleared after."""
    from torch.utils.data import Subset

    from memprune.pruning import head_gradient_fn, ssl_gradient_fn

    model = tiny_resnet()  # (random norm statistics would leave some units dead: also 0)
    bn, conv, nxt = model.layer1[0].bn1, model.layer1[0].conv1, model.layer1[0].conv2
    with torch.no_grad():
        for m in model.modules():  # timm zero-inits each block's last scale: no gradient flows
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(1.0)
        conv.weight[2].zero_(), bn.weight[2].zero_(), bn.bias[2].zero_(), nxt.weight[:, 2].zero_()
    data = Subset(digits, range(48))
    for grads in (ssl_gradient_fn(data, batch_size=16), head_gradient_fn(data)):
        pruned, report = prune(model, ratio=0.125, strategy=strategy, gradients=grads, **FAST)
        assert group(report, "layer1.0.bn1")["removed"] == [2]
        assert all(p.grad is None for p in pruned.parameters())
        assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ConfigError, match=f"'{strategy}' ranks units by the gradient"):
        prune(model, ratio=0.5, strategy=strategy, **FAST)

    def whole(model):  # a plain function: the whole loss's gradient at once
        for _ in ssl_gradient_fn(data, batch_size=16)(model):
            pass

    if strategy == "taylor":
        _, report = prune(model, ratio=0.125, strategy=strategy, gradients=whole, **FAST)
        assert group(report, "layer1.0.bn1")["removed"] == [2]
    else:
        with pytest.raises(ConfigError, match="generator yielding after each backward"):
            prune(model, ratio=0.125, strategy=strategy, gradients=whole, **FAST)


@pytest.mark.parametrize("kind", ["resnet", "vit_mlp"])
def test_metapruner_with_unitmem_importance_removes_what_prune_lowest_removes(kind):
    """One mapping from site scores to channel importance: torch-pruning's own MetaPruner
    driven by UnitMemImportance and prune(strategy="lowest") leave identical encoders, weight
    for weight, on a ResNet (residual groups included) and on a ViT's MLPs."""
    model = randomize_norms(tiny_resnet()) if kind == "resnet" else tiny_vit()
    scores, g = planted(model), torch.Generator().manual_seed(3)
    for fields in scores.sites.values():  # continuous scores: no ties between channel means
        fields["score"] = torch.rand(len(fields["score"]), generator=g)
    if kind == "vit_mlp":  # the MLP hidden units alone
        mlp = [name for name in scores.sites if ".mlp." in name]
        assert mlp
        scores = UnitMemResult(
            {n: scores[n] for n in mlp},
            {**scores.meta, "sites": {n: scores.meta["sites"][n] for n in mlp}},
        )
    ours, report = prune(model, scores, 0.5, "lowest", keep_output_width=False, **FAST)
    theirs = copy.deepcopy(model)
    example = torch.zeros(1, 3, 32, 32)
    pruner = tp.pruner.MetaPruner(theirs, example, UnitMemImportance(scores, "lowest"),
                                  pruning_ratio=0.5, ignored_layers=[])  # fmt: skip
    pruner.step()
    assert all(g["pruned"] and g["after"] == g["before"] // 2 for g in report.groups)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape and torch.equal(a[key], b[key]), key
    # the orders differ: highest-first keeps other channels (the test can fail)
    other, _ = prune(model, scores, 0.5, "highest", keep_output_width=False, **FAST)
    assert any(
        not torch.equal(a[k], v) for k, v in other.state_dict().items() if a[k].shape == v.shape
    )


def test_groups_torch_pruning_cannot_remove_are_left_out_and_the_rest_pruned():
    """Where torch-pruning's graph misses a coupling (Swin's channel-last norms after window
    attention), removing that group breaks the model: each group is tried on a copy, the ones
    that break are left unpruned with the reason (and a warning), the others are pruned, and
    the result runs with its output width."""
    tiny = dict(img_size=64, window_size=2, depths=(1, 1, 1, 1), embed_dim=24,
                num_heads=(1, 1, 2, 2))  # fmt: skip
    swin = memprune.load_encoder("swin_tiny_patch4_window7_224", **tiny)
    with pytest.warns(UserWarning, match="left unpruned"):
        small, report = prune(swin, None, 0.3, "random", **FAST)
    broken = {g["name"]: g["blocked"] for g in report.groups if g["blocked"]}
    assert broken and all("breaks the model" in why for why in broken.values())
    assert all(".attn.proj" in name for name in broken)  # the residual stream of a stage
    mlps = [g for g in report.groups if g["name"].endswith("mlp.fc1")]
    assert mlps and all(g["pruned"] and g["after"] < g["before"] for g in mlps)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert small(x).shape == swin(x).shape


class _StoredSplit(torch.nn.Module):
    """conv -> split by a stored width -> two convs: torch-pruning cannot update ``half``."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn0, self.act0 = torch.nn.BatchNorm2d(8), torch.nn.ReLU()
        self.conv = torch.nn.Conv2d(8, 12, 1)
        self.bn1, self.act1 = torch.nn.BatchNorm2d(12), torch.nn.ReLU()
        self.half = 6
        self.a, self.b = torch.nn.Conv2d(6, 4, 1), torch.nn.Conv2d(6, 4, 1)
        self.pretrained_cfg = {"architecture": "stored_split", "input_size": (3, 8, 8)}

    def forward(self, x):
        x = self.act1(self.bn1(self.conv(self.act0(self.bn0(self.stem(x))))))
        a, b = x.split(self.half, dim=1)
        return torch.cat([self.a(a), self.b(b)], 1).mean((2, 3))


def test_a_group_whose_removal_breaks_the_model_is_named_and_the_rest_pruned():
    model = _StoredSplit().eval()
    with pytest.warns(UserWarning, match="bn1: ValueError"):
        small, report = prune(model, None, 0.5, "random", **FAST)
    assert group(report, "bn0")["after"] == 4  # pruned
    assert (
        group(report, "bn1")["after"] == 12
        and "breaks the model" in group(report, "bn1")["blocked"]
    )
    assert small(torch.randn(2, 3, 8, 8)).shape == (2, 8)


def test_a_model_with_nothing_prunable_is_refused_with_the_reasons():
    model = _StoredSplit().eval()
    scores = planted(model, only=lambda s: s.name == "act1")
    with (
        pytest.warns(UserWarning),
        pytest.raises(SiteError, match="no units group .*breaks the model"),
    ):
        prune(model, scores, 0.5, "lowest", **FAST)


def test_densenet_concatenations_are_pruned_through_their_parts():
    """A DenseNet norm reads the concatenation of every earlier layer's output: its group
    overlaps theirs, so it is left alone and the layers' own groups are pruned; the model
    runs and keeps its width (torch-pruning refused the whole model before)."""
    model = memprune.load_encoder("densenet121", img_size=32)
    small, report = prune(model, None, 0.3, "random", **FAST)
    overlap = [g for g in report.groups if "concatenation" in g["blocked"]]
    assert overlap and all("norm" in g["name"] for g in overlap)
    assert sum(g["pruned"] for g in report.groups) > 50
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert small(x).shape == model(x).shape
    assert report.params[1] < 0.8 * report.params[0]


def test_an_architecture_torch_pruning_cannot_trace_is_refused_clearly():
    model = memprune.load_encoder("dpn68", img_size=32)
    with pytest.raises(SiteError, match="torch-pruning cannot trace the channel dependencies"):
        prune(model, None, 0.3, "random", **FAST)


def test_gated_mlp_units_go_with_their_gate_and_equal_zeroing_them():
    """EVA-02's GluMlp: ``fc1`` makes value and gate halves; unit j is rows j and j + n/2
    and column j of fc2. Pruning must equal zeroing those columns of fc2."""
    torch.manual_seed(0)
    model = memprune.load_encoder("eva02_tiny_patch14_224", img_size=28, depth=1, embed_dim=48,
                                  num_heads=2)  # fmt: skip
    pruned, report = prune(model, planted(model), 0.5, "lowest", **FAST)
    mlp = group(report, "blocks.0.mlp.fc1")
    hidden = model.blocks[0].mlp.fc2.in_features
    assert (mlp["before"], mlp["after"]) == (hidden, hidden - hidden // 2)
    fc1 = pruned.blocks[0].mlp.fc1
    assert fc1.out_features == 2 * (hidden - hidden // 2) == fc1.weight.shape[0]
    ref = copy.deepcopy(model)
    ref.blocks[0].mlp.fc2.weight.data[:, mlp["removed"]] = 0
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), ref(x), atol=1e-5, rtol=1e-5)


def _heads_only(model):
    return planted(model, only=lambda s: s.role == "heads")


def _roundtrip(model, tmp_path):
    save_pruned(model, tmp_path / "enc")
    return load_pruned(tmp_path / "enc").eval()


#: One small member of each attention family: windows, head-major rows, separate q / v biases,
#: rotary embeddings, talking heads, gated positional attention, cross-covariance attention.
HEAD_FAMILIES = {
    "swin_tiny_patch4_window7_224": dict(img_size=64, window_size=2, depths=(1, 1, 1, 1),
                                         embed_dim=24, num_heads=(2, 2, 2, 2)),
    "tiny_vit_5m_224": dict(img_size=64),
    "maxvit_nano_rw_256": dict(img_size=64, depths=(1, 1, 1, 1)),
    "beit_base_patch16_224": dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=4),
    "eva02_tiny_patch14_224": dict(img_size=28, depth=2, embed_dim=32, num_heads=4),
    "cait_xxs24_224": dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=4),
    "convit_tiny": dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=4,
                        local_up_to_layer=1),
    "xcit_nano_12_p16_224": dict(img_size=32, depth=2, embed_dim=32, num_heads=4),
}  # fmt: skip


@pytest.mark.parametrize("name", HEAD_FAMILIES)
def test_removing_heads_equals_masking_them_in_every_attention_family(name, tmp_path):
    """Removing heads equals masking their columns of proj (and, for talking heads, their
    mixing columns), for every family; save -> load gives the same outputs."""
    torch.manual_seed(0)
    model = memprune.load_encoder(name, **HEAD_FAMILIES[name])
    pruned, report = prune(model, _heads_only(model), 0.5, "lowest", heads=True, **FAST)
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    heads = [g for g in report.groups if g["pruned"]]
    assert heads and all(g["kind"] == "heads" and g["after"] < g["before"] for g in heads)
    for g in heads:
        attn = modules[g["name"]]
        d = attn.proj.weight.shape[1] // attn.num_heads
        for h in g["removed"]:
            attn.proj.weight.data[:, h * d : (h + 1) * d] = 0
            for mix in ("proj_l", "proj_w"):
                if hasattr(attn, mix):
                    getattr(attn, mix).weight.data[:, h] = 0
    size = HEAD_FAMILIES[name]["img_size"]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), ref(x), atol=1e-4, rtol=1e-4)
        assert torch.equal(_roundtrip(pruned, tmp_path)(x), pruned(x))


@pytest.mark.parametrize(
    "name",
    [
        "beit_base_patch16_224",
        "eva02_tiny_patch14_224",
        "cait_xxs24_224",
        "convit_tiny",
        "xcit_nano_12_p16_224",
    ],
)
def test_the_forward_for_fewer_heads_equals_timms_with_all_heads(name):
    """memprune's forward for an attention that lost heads, run on modules with all their
    heads, equals timm's own forward."""
    from memprune.attention import has_pruned_forward, use_pruned_forward

    torch.manual_seed(0)
    kw = HEAD_FAMILIES[name]
    model = memprune.load_encoder(name, **kw).eval()
    swapped = copy.deepcopy(model)
    swaps = [m for m in swapped.modules() if has_pruned_forward(m)]
    for m in swaps:
        use_pruned_forward(m)
    assert swaps and all(type(m).__name__.startswith("Pruned") for m in swaps)
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"])
    with torch.no_grad():
        torch.testing.assert_close(swapped(x), model(x), atol=1e-5, rtol=1e-5)


def test_heads_of_attention_that_reshapes_by_its_input_width_are_refused_with_why():
    """Twins' locally grouped attention takes a head's width from its input width and has no
    forward for fewer heads here: heads=True says so instead of a traceback."""
    model = memprune.load_encoder("twins_svt_small", img_size=64, depths=(1, 1, 1, 1))
    why = "heads of LocallyGroupedAttn cannot be removed: its forward"
    with pytest.raises(SiteError, match=why):
        prune(model, _heads_only(model), 0.5, "lowest", heads=True, **FAST)


class _DepthwiseMultiplier(torch.nn.Module):
    """conv -> depthwise conv with two outputs per input channel -> 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn0, self.act0 = torch.nn.BatchNorm2d(8), torch.nn.ReLU()
        self.dw = torch.nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.bn1, self.act1 = torch.nn.BatchNorm2d(16), torch.nn.ReLU()
        self.head = torch.nn.Conv2d(16, 6, 1)
        self.pretrained_cfg = {"architecture": "dw_multiplier", "input_size": (3, 8, 8)}

    def forward(self, x):
        x = self.act1(self.bn1(self.dw(self.act0(self.bn0(self.stem(x))))))
        return self.head(x).mean((2, 3))


def test_a_depthwise_conv_with_a_channel_multiplier_loses_whole_groups():
    """Input channel k of a depthwise conv with two outputs per channel feeds outputs 2k and
    2k + 1: removing k removes both (torch-pruning's depthwise rule assumes out = in)."""
    model = randomize_norms(_DepthwiseMultiplier()).eval()
    small, report = prune(model, None, 0.5, "random", **FAST)
    g = group(report, "dw")
    assert (g["kind"], g["before"], g["after"]) == ("convgroups", 8, 4)
    assert (small.dw.groups, small.dw.in_channels, small.dw.out_channels) == (4, 4, 8)
    ref = copy.deepcopy(model)
    for k in g["removed"]:
        ref.head.weight.data[:, 2 * k : 2 * k + 2] = 0
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref(x), atol=1e-5, rtol=1e-5)


def test_a_mixed_conv_keeps_its_splits_through_pruning_and_save_load(tmp_path):
    """MixNet's MixedConv2d splits its input by a stored list of widths: refreshed after
    pruning and restored by load_pruned."""
    model = memprune.load_encoder("mixnet_s", img_size=32)
    small, report = prune(model, None, 0.3, "random", **FAST)
    mixed = [m for m in small.modules() if type(m).__name__ == "MixedConv2d"]
    assert all(sum(m.splits) == m.in_channels == sum(c.in_channels for c in m.values())
               for m in mixed)  # fmt: skip
    assert report.params[1] < report.params[0]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(_roundtrip(small, tmp_path)(x), small.eval()(x))


def test_forward_only_criteria_activation_and_fpgm(digits):
    """``activation``: a unit that is 0 on every input goes first, and the means are
    accumulated over every batch (torch-pruning's own hook keeps only the last, where a unit
    active only in the first batch would look dead); ``fpgm`` prunes through the same groups."""
    from torch.utils.data import Subset

    from memprune.pruning import ssl_gradient_fn
    from memprune.pruning._prune import _activations

    model = tiny_resnet()
    bn, conv, nxt = model.layer1[0].bn1, model.layer1[0].conv1, model.layer1[0].conv2
    with torch.no_grad():
        conv.weight[5].zero_(), bn.bias[5].fill_(-1.0)  # never active after the ReLU
    data = Subset(digits, range(48))
    feed = ssl_gradient_fn(data, batch_size=16)
    pruned, report = prune(model, ratio=0.125, strategy="activation", gradients=feed, **FAST)
    assert group(report, "layer1.0.bn1")["removed"] == [5]
    assert not any(hasattr(m, "_importance") for m in pruned.modules())
    with pytest.raises(ConfigError, match="'activation' ranks units by their mean activation"):
        prune(model, ratio=0.5, strategy="activation", **FAST)

    first, second = torch.zeros(4, 3, 32, 32), torch.zeros(4, 3, 32, 32)
    first[:, 0], second[:, 1] = 1.0, 2.0  # channel 0 only in the first batch, 1 in the second

    def two_batches(m):
        for x in (first, second):
            m(x).sum().backward()
            yield

    _activations(model, two_batches)
    stem = model.conv1._importance  # the stem conv reads the input's channels
    assert torch.allclose(stem, torch.tensor([0.5, 1.0, 0.0]))

    # FPGM (on |w|, as torch-pruning computes it): a filter at the centre of its layer's
    # filters, on both sides of the group, is the most replaceable and goes first
    model = tiny_resnet()
    conv, nxt = model.layer1[0].conv1, model.layer1[0].conv2
    with torch.no_grad():
        conv.weight[3] = conv.weight.abs().mean(0)
        nxt.weight[:, 3] = nxt.weight.abs().mean(1)
    pruned, report = prune(model, ratio=0.125, strategy="fpgm", **FAST)
    assert group(report, "layer1.0.bn1")["removed"] == [3]
    assert pruned(torch.zeros(2, 3, 32, 32)).shape == model(torch.zeros(2, 3, 32, 32)).shape
