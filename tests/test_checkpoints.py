"""Checkpoints as people have them: each layout is built from a timm model's own state dict
(renamed, wrapped, with the training-only parts its framework adds) and must load into an
encoder whose outputs equal the original's."""

from __future__ import annotations

import argparse
import warnings

import pytest
import torch

from memprune import CheckpointError, EncoderError, load_encoder
from memprune.errors import CheckpointWarning

from .conftest import TINY_RESNET, tiny_resnet, tiny_vit

VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)


def _randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The model with every float tensor redrawn (so teacher and student differ)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t) * 0.1 + (1.0 if t.ndim == 1 else 0.0))
    return model


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, size=32) -> None:
    x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(a.eval()(x), b.eval()(x))


def _wrap(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def _head(prefix: str, dim: int = 64) -> dict:
    return {f"{prefix}.0.weight": torch.randn(dim, dim), f"{prefix}.0.bias": torch.randn(dim)}


def test_timm_hub_directory_loads_offline_with_and_without_config(tmp_path):
    from timm.models._hub import save_for_hf

    model = _randomized(tiny_resnet(), 1)
    for safe, file in [(True, "model.safetensors"), (False, "pytorch_model.bin")]:
        d = tmp_path / file
        save_for_hf(model, str(d), safe_serialization=safe)
        assert (d / file).is_file() and (d / "config.json").is_file()
        loaded = load_encoder(checkpoint=d)  # name and channels come from config.json
        _same_outputs(model, loaded)
        assert loaded.pretrained_cfg["mean"] == list(model.pretrained_cfg["mean"])
        (d / "config.json").unlink()  # weights alone: the name must be given
        with pytest.raises(EncoderError, match="no config.json"):
            load_encoder(checkpoint=d)
        _same_outputs(model, load_encoder("resnet18", checkpoint=d, **TINY_RESNET))


def test_timm_vit_hub_directory_records_its_image_size(tmp_path):
    """timm's save_for_hf writes a ViT's img_size among its model_args (as [H, W]): it is the
    size the encoder is built at, unless the caller names another one."""
    from timm.models._hub import save_for_hf

    model = _randomized(tiny_vit(), 1)
    save_for_hf(model, str(tmp_path / "vit"), model_args={**VIT})
    loaded = load_encoder(checkpoint=tmp_path / "vit")
    assert loaded.patch_embed.img_size == (32, 32) and loaded.pretrained_cfg["input_size"][1:] == (
        32, 32)  # fmt: skip
    _same_outputs(model, loaded)
    with pytest.raises(CheckpointError, match="shape"):  # another size: other position embeddings
        load_encoder(checkpoint=tmp_path / "vit", img_size=64)


def test_dino_teacher_by_default_student_on_request(tmp_path):
    teacher, student = _randomized(tiny_vit(), 1), _randomized(tiny_vit(), 2)
    ckpt = {
        "teacher": {**_wrap(teacher.state_dict(), "backbone."), **_head("head.mlp", 32),
                    "head.last_layer.weight": torch.randn(10, 32)},
        "student": {**_wrap(student.state_dict(), "module.backbone."),
                    **_head("module.head.mlp", 32)},
        "epoch": 3,
        "args": argparse.Namespace(arch="vit_tiny", out_dim=10),  # DINO saves its args
        "dino_loss": {"center": torch.zeros(1, 10)},
    }  # fmt: skip
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    with pytest.warns(CheckpointWarning, match=r"dropped 3 keys .*: head \(3\)$"):
        got = load_encoder("vit_tiny_patch16_224", checkpoint=tmp_path / "checkpoint.pth", **VIT)
    _same_outputs(teacher, got)
    with pytest.warns(CheckpointWarning, match=r"module\.head \(2\)"):
        got = load_encoder("vit_tiny_patch16_224", checkpoint=tmp_path / "checkpoint.pth",
                           entry="student", **VIT)  # fmt: skip
    _same_outputs(student, got)
    with pytest.raises(CheckpointError, match="no entry 'ema'.*teacher.*student"):
        load_encoder("vit_tiny_patch16_224", checkpoint=tmp_path / "checkpoint.pth",
                     entry="ema", **VIT)  # fmt: skip


def test_mocov3_base_encoder_without_projector_predictor_momentum(tmp_path):
    model = _randomized(tiny_resnet(), 3)
    state = {
        **_wrap(model.state_dict(), "module.base_encoder."),
        **_head("module.base_encoder.fc"),  # MoCo v3 puts its projector in the ResNet's fc
        **_wrap(_randomized(tiny_resnet(), 4).state_dict(), "module.momentum_encoder."),
        **_head("module.predictor"),
    }
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}},
               tmp_path / "moco.pth.tar")  # fmt: skip
    with pytest.warns(CheckpointWarning) as record:
        got = load_encoder("resnet18", checkpoint=tmp_path / "moco.pth.tar", **TINY_RESNET)
    _same_outputs(model, got)
    line = str(record[0].message)
    assert "module.base_encoder.fc" in line and "module.momentum_encoder" in line
    assert "module.predictor" in line and "\n" not in line


def test_mae_model_without_decoder(tmp_path):
    model = _randomized(tiny_vit(), 5)
    decoder = {
        "decoder_embed.weight": torch.randn(16, 32),
        "decoder_norm.weight": torch.ones(16),
        "decoder_pos_embed": torch.randn(1, 17, 16),
        **_head("decoder_blocks.0.mlp.fc1", 16),
    }
    state = {**model.state_dict(), "mask_token": torch.zeros(1, 1, 16), **decoder}
    torch.save({"model": state, "args": argparse.Namespace(model="mae_vit")}, tmp_path / "mae.pth")
    with pytest.warns(CheckpointWarning, match="decoder_embed"):
        got = load_encoder("vit_tiny_patch16_224", checkpoint=tmp_path / "mae.pth", **VIT)
    _same_outputs(model, got)


@pytest.mark.parametrize("framework", ["solo-learn", "lightly"])
def test_solo_learn_and_lightly_backbone(tmp_path, framework):
    model = _randomized(tiny_resnet(), 6)
    state = _wrap(model.state_dict(), "backbone.")
    if framework == "solo-learn":  # a Lightning checkpoint
        state |= {**_head("projector"), **_wrap(model.state_dict(), "momentum_backbone."),
                  "classifier.weight": torch.randn(10, 64)}  # fmt: skip
        obj = {"state_dict": state, "epoch": 9, "hyper_parameters": {"method": "byol"}}
    else:  # model.state_dict() of a lightly model
        obj = {**state, **_head("projection_head.layers"), **_head("prediction_head.layers")}
    torch.save(obj, tmp_path / "ckpt.pt")
    with pytest.warns(CheckpointWarning):
        got = load_encoder("resnet18", checkpoint=tmp_path / "ckpt.pt", **TINY_RESNET)
    _same_outputs(model, got)


def test_torchvision_resnet_into_timm(tmp_path):
    import torchvision

    tv = _randomized(torchvision.models.resnet18(), 7)
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    with pytest.warns(CheckpointWarning, match="fc"):
        got = load_encoder("resnet18", checkpoint=tmp_path / "resnet18.pth")
    tv.fc = torch.nn.Identity()
    _same_outputs(tv, got, size=64)


def test_bad_layouts_are_errors_and_strict_false_reports(tmp_path):
    model = _randomized(tiny_resnet(), 8)
    torch.save(_wrap(model.state_dict(), "net."), tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no weights of a VisionTransformer"):  # other model
        load_encoder("vit_tiny_patch16_224", checkpoint=tmp_path / "other.pth", **VIT)
    state = model.state_dict()
    state.pop("layer1.0.conv1.weight")
    state["layer9.extra.weight"] = torch.zeros(3)  # neither the encoder's nor a head's
    torch.save(state, tmp_path / "broken.pth")
    expected = r"missing keys: layer1\.0\.conv1\.weight.*unexpected keys: layer9\.extra\.weight"
    with pytest.raises(CheckpointError, match=expected):
        load_encoder("resnet18", checkpoint=tmp_path / "broken.pth", **TINY_RESNET)
    with pytest.warns(CheckpointWarning, match="strict=False"):
        got = load_encoder("resnet18", checkpoint=tmp_path / "broken.pth", strict=False,
                           **TINY_RESNET)  # fmt: skip
    assert torch.equal(got.layer4[0].conv1.weight, model.layer4[0].conv1.weight)
    with pytest.raises(CheckpointError, match="shape mismatches"):  # another width
        load_encoder("resnet18", checkpoint=tmp_path / "broken.pth",
                     channels=(16, 16, 32, 64))  # fmt: skip
    # strict=False on a checkpoint of which little fits: refused, not a random encoder
    few = {k: v for k, v in model.state_dict().items() if k.startswith(("conv1.", "bn1."))}
    torch.save({**few, "layer9.extra.weight": torch.zeros(3)}, tmp_path / "few.pth")
    with pytest.raises(CheckpointError, match=r"only 5\.1% of the encoder's weights"):
        load_encoder("resnet18", checkpoint=tmp_path / "few.pth", strict=False, **TINY_RESNET)
    # a file that holds no state dict says what it holds and what to pass
    torch.save({"epoch": 3, "weights": {"a": 1}, "note": "x"}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"holds a mapping of 'epoch' \(int\).*--entry"):
        load_encoder("resnet18", checkpoint=tmp_path / "odd.pth", **TINY_RESNET)


def test_another_image_size_is_an_error_naming_the_position_embedding(tmp_path):
    torch.save(tiny_vit().state_dict(), tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatches: pos_embed .*img_size"):
        load_encoder(
            "vit_tiny_patch16_224", checkpoint=tmp_path / "vit.pth", **{**VIT, "img_size": 64}
        )


def test_moco_v3_vit_small_has_12_heads_and_imagenet_normalization(tmp_path):
    """MoCo v3 records `arch: vit_small`, a 12-head ViT-S (timm's and DINO's have 6): the
    weights fit a 6-head model shape for shape, so the head count is warned about, and the
    ImageNet statistics it trains with replace timm's 0.5 / 0.5, recorded where results go."""
    import warnings

    import memprune

    dims = dict(img_size=32, patch_size=8, depth=1, embed_dim=48)
    moco = _randomized(load_encoder("vit_small_patch16_224", num_heads=12, **dims), 3)
    ckpt = {"epoch": 100, "arch": "vit_small", "optimizer": {}, "state_dict": {
        **_wrap(moco.state_dict(), "module.base_encoder."),
        **_wrap(_head("head.fc", 48), "module.predictor.")}}  # fmt: skip
    torch.save(ckpt, tmp_path / "moco.pth.tar")
    with pytest.warns(CheckpointWarning, match=r"MoCo v3's vit_small has 12 attention heads"):
        six = load_encoder("vit_small_patch16_224", checkpoint=tmp_path / "moco.pth.tar", **dims)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert not torch.allclose(six(x), moco(x), atol=1e-3)  # what the warning is about
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        twelve = load_encoder("vit_small_patch16_224", checkpoint=tmp_path / "moco.pth.tar",
                              num_heads=12, **dims)  # fmt: skip
    assert not [w for w in caught if "heads" in str(w.message)]
    _same_outputs(moco, twelve)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert memprune.encoders.normalization(twelve) == imagenet
    assert [str(w.message) for w in caught if "ImageNet mean/std" in str(w.message)]
    data = torch.utils.data.Subset(memprune.load_dataset(), range(4))
    meta = memprune.unit_mem(twelve, data, n_views=1).meta["normalization"]
    assert meta == {"mean": list(imagenet[0]), "std": list(imagenet[1]),
                    "source": "MoCo v3 checkpoint (the ImageNet mean/std)"}  # fmt: skip
    # chosen by the caller: used and recorded as given
    given = load_encoder("vit_small_patch16_224", checkpoint=tmp_path / "moco.pth.tar",
                         num_heads=12, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2),
                         **dims)  # fmt: skip
    assert memprune.encoders.normalization(given) == ((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    more = torch.utils.data.Subset(memprune.load_dataset(), range(100))
    probe = memprune.linear_probe(given, more, more, Cs=[1.0])
    assert probe.meta["normalization"]["source"] == "given"


@pytest.mark.parametrize("layout", ["tutorial", "parameters", "benchmark", "dino benchmark"])
def test_lightly_layouts(tmp_path, layout):
    """lightly's own layouts: its tutorials' backbone `nn.Sequential(*list(resnet.children())
    [:-1])` (weights named by child index) saved in a model or as {"resnet18_parameters": ...},
    and its benchmark Lightning modules (an online classifier, a loss with a buffer; DINO: a
    teacher and a student copy of the backbone)."""
    import torchvision

    tv = _randomized(torchvision.models.resnet18(), 9)
    sequential = torch.nn.Sequential(*list(tv.children())[:-1])
    if layout == "tutorial":
        obj = {**_wrap(sequential.state_dict(), "backbone."),
               **_head("projection_head.layers", 512)}  # fmt: skip
    elif layout == "parameters":
        obj = {"resnet18_parameters": sequential.state_dict()}
    else:
        own = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
        extra = {
            "online_classifier.classification_head.weight": torch.randn(10, 512),
            "criterion.center": torch.zeros(1, 64),
            **_head("projection_head.layers", 512),
        }
        if layout == "benchmark":
            state = {**_wrap(own, "backbone."), **extra}
        else:
            student = {k: torch.randn_like(v) if v.is_floating_point() else v
                       for k, v in own.items()}  # fmt: skip
            state = {**_wrap(student, "student_backbone."), **_wrap(own, "teacher_backbone."),
                     **_head("student_projection_head.layers", 512), **extra}  # fmt: skip
        obj = {"state_dict": state, "epoch": 1, "global_step": 10}
    torch.save(obj, tmp_path / "lightly.ckpt")
    with pytest.warns(CheckpointWarning) as caught:
        got = load_encoder("resnet18", checkpoint=tmp_path / "lightly.ckpt")
    tv.fc = torch.nn.Identity()
    _same_outputs(tv, got, size=64)
    said = " ".join(str(w.message) for w in caught)
    if layout in ("tutorial", "parameters"):
        assert "children of a torchvision ResNet" in said
    if layout == "dino benchmark":
        assert "student_backbone (" in said  # the student copy is dropped, not unexpected


def test_solo_learn_cifar_stem_is_read_as_such_and_survives_pruning(tmp_path):
    """solo-learn's CIFAR ResNets have a 3x3 conv1 (stride 1, padding 2) and no max-pool:
    such a checkpoint builds timm's ResNet with that stem (cifar_stem=True), says so, gives
    the original's outputs, and the stem survives pruning, saving and loading."""
    import torchvision

    from memprune import prune
    from memprune.pruning import load_pruned, save_pruned

    solo = _randomized(torchvision.models.resnet18(), 11)
    solo.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
    solo.maxpool, solo.fc = torch.nn.Identity(), torch.nn.Identity()
    state = {**_wrap(solo.state_dict(), "backbone."), **_head("projector", 512)}
    torch.save({"state_dict": state, "epoch": 1}, tmp_path / "solo.ckpt")
    with pytest.warns(CheckpointWarning, match="CIFAR stem of solo-learn"):
        got = load_encoder("resnet18", checkpoint=tmp_path / "solo.ckpt")
    _same_outputs(solo, got)
    assert got.pretrained_cfg["memprune_build"]["timm_kwargs"]["cifar_stem"] is True
    pruned, _ = prune(got, None, 0.5, "random", latency_batch=None)
    save_pruned(pruned, tmp_path / "pruned")
    again = load_pruned(tmp_path / "pruned")
    assert again.conv1.kernel_size == (3, 3) and isinstance(again.maxpool, torch.nn.Identity)
    _same_outputs(pruned, again)


def test_solo_learn_config_gives_the_head_count_and_the_data_sets_normalization(tmp_path):
    """solo-learn's Lightning checkpoint records its config (method, backbone, data set): a
    mocov3 vit_small has 12 heads (warned about on a 6-head encoder), and CIFAR-10's
    statistics are used and recorded."""
    import memprune

    dims = dict(img_size=32, patch_size=8, depth=1, embed_dim=48)
    solo = _randomized(load_encoder("vit_small_patch16_224", num_heads=12, **dims), 5)
    cfg = {"method": "mocov3", "backbone": {"name": "vit_small"},
           "data": {"dataset": "cifar10"}}  # fmt: skip
    ckpt = {"epoch": 1, "state_dict": _wrap(solo.state_dict(), "backbone."),
            "hyper_parameters": {"cfg": cfg}}  # fmt: skip
    torch.save(ckpt, tmp_path / "solo.ckpt")
    with pytest.warns(CheckpointWarning, match="solo-learn's mocov3:vit_small has 12 attention"):
        load_encoder("vit_small_patch16_224", checkpoint=tmp_path / "solo.ckpt", **dims)
    twelve = load_encoder("vit_small_patch16_224", checkpoint=tmp_path / "solo.ckpt",
                          num_heads=12, **dims)  # fmt: skip
    _same_outputs(solo, twelve)
    cifar = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert memprune.encoders.normalization(twelve) == cifar
    cfg["method"] = "simclr"  # solo-learn's own ViT-S for other methods: 6 heads, as timm's
    torch.save(ckpt, tmp_path / "simclr.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_encoder("vit_small_patch16_224", checkpoint=tmp_path / "simclr.ckpt", **dims)
    assert not [w for w in caught if "heads" in str(w.message)]
