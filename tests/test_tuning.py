import pytest
import torch
from torch.utils.data import Subset

import memprune
from memprune import finetune, finetune_units, select_layers
from memprune.errors import ConfigError, SiteError
from memprune.tuning import layer_modules

from .conftest import LAYERS, planted_layermem, tiny_resnet


@pytest.fixture(scope="module")
def small(digits_shift_small):
    return digits_shift_small


@pytest.fixture(scope="module")
def digits_shift_small():
    train = memprune.load_dataset("digits-shift", "train")
    test = memprune.load_dataset("digits-shift", "test")
    return Subset(train, range(0, 1400, 7)), Subset(test, range(0, 360, 4))


def test_select_layers_strategies():
    lm = [0.1, 0.15, 0.4, 0.45, 0.5, 0.9, 0.95, 0.96, 0.97]  # delta: 0.1 .05 .25 .05 .05 .4 ...
    result = planted_layermem(lm)
    top = select_layers(result, 2)
    assert top.layers == ["layer1.1", "layer3.0"]  # the two largest ΔLayerMem, forward order
    assert top.values["layer3.0"] == pytest.approx(0.4)
    assert select_layers(result, 2, by="layermem").layers == ["layer4.0", "layer4.1"]
    assert select_layers(result, 3, strategy="last").layers == LAYERS[-3:]
    assert select_layers(result, 3, strategy="first").layers == LAYERS[:3]
    assert select_layers(result, 1, strategy="all").layers == LAYERS
    r1 = select_layers(result, 3, strategy="random", seed=1).layers
    assert r1 == select_layers(result, 3, strategy="random", seed=1).layers
    others = {tuple(select_layers(result, 3, strategy="random", seed=s).layers) for s in range(6)}
    assert len(others) > 1 and all(len(set(o)) == 3 for o in others)
    with_params = select_layers(result, 1, strategy="last", encoder=tiny_resnet(img_size=32))
    assert "layer4.1.conv1.weight" in with_params.parameters
    assert set(with_params.parameters.values()) == {"layer4.1"}
    with pytest.raises(ConfigError, match=r"k must be an int in \[1, 9\]"):
        select_layers(result, 10)
    with pytest.raises(ConfigError, match="strategy"):
        select_layers(result, 1, strategy="best")


def test_layers_own_disjoint_modules():
    owned = layer_modules(tiny_resnet(img_size=32))
    assert owned["maxpool"] == ["conv1", "bn1", "act1", "maxpool"]
    flat = [m for mods in owned.values() for m in mods]
    assert len(flat) == len(set(flat)) and "layer1" not in flat  # containers of others: no


def test_only_chosen_layers_change(small):
    train, test = small
    encoder = tiny_resnet(img_size=32)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    r = finetune(encoder, ["layer2.0"], train, None, test, epochs=2, batch_size=32, progress=False)
    after = r.encoder.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("layer2.0.") for k in changed)
    # inside the chosen layer the norm trains (statistics move); all else is bit-identical
    assert "layer2.0.bn1.running_mean" in changed and "layer2.0.conv1.weight" in changed
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in before.items())  # a copy
    assert r.trained == sorted(n for n, _ in encoder.named_parameters() if n.startswith("layer2.0"))
    assert len(r.val_accuracy) == 2 and 1 <= r.best_epoch <= 2 and 0 <= r.accuracy <= 1
    assert not r.encoder.training and not any(p.requires_grad for p in r.encoder.parameters())


def test_head_only_is_a_probe_and_bad_layers_are_refused(small):
    train, test = small
    encoder = tiny_resnet(img_size=32)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    r = finetune(encoder, [], train, None, test, epochs=1, batch_size=32, progress=False)
    assert all(torch.equal(v, r.encoder.state_dict()[k]) for k, v in before.items())
    assert r.trained == []
    with pytest.raises(SiteError, match=r"\['layer9.0'\] are not layer sites .* layer1.0"):
        finetune(encoder, ["layer9.0"], train, None, test, epochs=1, progress=False)


def test_finetune_units_keeps_every_other_unit_bit_identical(small):
    train, test = small
    # timm zero-initializes each block's last norm, which would block every gradient into the
    # residual branch of an untrained encoder
    encoder = tiny_resnet(img_size=32, zero_init_last=False)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    chosen = [1, 5]
    r = finetune_units(encoder, {"layer3.0.act1": chosen}, train, None, test, epochs=2,
                       batch_size=32, lr=1e-2, progress=False)  # fmt: skip
    after = r.encoder.state_dict()
    for key in ("layer3.0.conv1.weight", "layer3.0.bn1.weight", "layer3.0.bn1.bias"):
        rest = [i for i in range(32) if i not in chosen]
        assert torch.equal(after[key][rest], before[key][rest]), key
        assert not torch.equal(after[key][chosen], before[key][chosen]), key
    others = [k for k in before if not k.startswith(("layer3.0.conv1.weight", "layer3.0.bn1.w",
                                                     "layer3.0.bn1.b"))]  # fmt: skip
    assert all(torch.equal(before[k], after[k]) for k in others)  # norm statistics included
    with pytest.raises(SiteError, match="not unit sites"):
        finetune_units(encoder, {"layer3.0.conv1": [0]}, train, None, test, progress=False)
