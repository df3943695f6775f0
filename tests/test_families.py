"""Every family the README claims trains and fine-tunes: SimCLR, supervised and selective
fine-tuning on one small member of each (heads are sized by a dry forward pass, since timm's
num_features is not always the output width: MobileNetV3's is its head_hidden_size)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Subset

from memprune import finetune, load_encoder
from memprune.encoders import feature_dim
from memprune.train import pretrain_simclr, train_supervised
from memprune.tuning import layer_modules, layer_parameters

FAMILIES = {
    "resnet18": {"channels": (8, 16, 32, 64)},
    "mobilenetv3_small_050": {},
    "efficientnet_b0": {},
    "convnext_atto": {},
    "regnetx_002": {},
    "vit_tiny_patch16_224": {
        "img_size": 32,
        "patch_size": 8,
        "depth": 2,
        "embed_dim": 32,
        "num_heads": 2,
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_pretrain_supervised_and_finetune(name, digits, tmp_path):
    kw = dict(FAMILIES[name])
    data = Subset(digits, range(8))
    run = dict(epochs=1, batch_size=4, progress=False, img_size=kw.pop("img_size", 32), **kw)
    simclr = pretrain_simclr(name, data, out_dir=tmp_path / "simclr", proj_dim=8, **run)
    sup = train_supervised(name, data, out_dir=tmp_path / "sup", **run)
    encoder = load_encoder(checkpoint=tmp_path / "simclr")
    assert feature_dim(encoder) == feature_dim(sup.encoder) == feature_dim(simclr.encoder)
    last = list(layer_modules(encoder, size=(3, 32, 32)))[-1]
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    result = finetune(encoder, [last], data, data, data, epochs=1, batch_size=4, progress=False)
    # the chosen (last) layer trained, and nothing outside its modules changed
    owned = layer_parameters(encoder, [last], size=(3, 32, 32))
    assert sorted(owned) == sorted(result.trained) and owned
    modules = {name.rsplit(".", 1)[0] for name in owned}
    changed = {k for k, v in result.encoder.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.rsplit(".", 1)[0] in modules for k in changed), sorted(changed)
