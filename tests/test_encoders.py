import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from memprune import load_encoder
from memprune.encoders import input_size, normalization
from memprune.errors import CheckpointError, CheckpointWarning, EncoderError

from .conftest import TINY_RESNET, tiny_resnet, tiny_vit


def test_unknown_model_suggests_names():
    with pytest.raises(EncoderError, match="closest timm names: resnet18"):
        load_encoder("resnet-18")


def test_encoder_is_eval_and_prelogits(resnet, vit):
    assert not resnet.training and not vit.training
    assert resnet(torch.rand(2, 3, 32, 32)).shape == (2, 64)
    assert vit(torch.rand(2, 3, 32, 32)).shape == (2, 32)
    assert input_size(vit) == (3, 32, 32)
    assert input_size(load_encoder("resnet18", img_size=48, **TINY_RESNET)) == (3, 48, 48)


def _same_outputs(a, b):
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_checkpoint_round_trips(tmp_path, resnet):
    state = resnet.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    other = load_encoder("resnet18", checkpoint=tmp_path / "w.safetensors", **TINY_RESNET)
    assert _same_outputs(resnet, other)
    # nested, prefixed, with a classifier head: unwrapped, stripped, head dropped
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    wrapped["state_dict"]["module.fc.weight"] = torch.zeros(10, 64)
    torch.save(wrapped, tmp_path / "w.pt")
    with pytest.warns(CheckpointWarning, match=r"module\.fc \(1\)"):
        other = load_encoder("resnet18", checkpoint=tmp_path / "w.pt", **TINY_RESNET)
    assert _same_outputs(resnet, other)


def test_checkpoint_mismatch_lists_keys(tmp_path, resnet):
    state = dict(resnet.state_dict())
    state.pop("conv1.weight")
    state["layer9.extra.weight"] = torch.zeros(3, 3)  # neither the encoder's nor a head's
    state["bn1.bias"] = torch.zeros(5)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_encoder("resnet18", checkpoint=tmp_path / "bad.pt", **TINY_RESNET)
    msg = str(err.value)
    assert "missing keys: conv1.weight" in msg
    assert "unexpected keys: layer9.extra.weight" in msg
    assert "bn1.bias (5,) vs model (64,)" in msg


def test_pickled_module_needs_trust(tmp_path, resnet):
    torch.save(resnet, tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        load_encoder("resnet18", checkpoint=tmp_path / "module.pt", **TINY_RESNET)
    trusted = load_encoder(
        "resnet18", checkpoint=tmp_path / "module.pt", trust_pickle=True, **TINY_RESNET
    )
    assert _same_outputs(resnet, trusted)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_encoder("resnet18", checkpoint=tmp_path / "nope.pt")


def test_vit_checkpoint_round_trip(tmp_path, vit):
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    other = tiny_vit(checkpoint=tmp_path / "vit.pth")
    assert _same_outputs(vit, other)


def test_normalization():
    assert normalization(tiny_resnet()) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert normalization(tiny_vit()) == ((0.5,) * 3, (0.5,) * 3)
    assert normalization(nn.Conv2d(3, 4, 3)) == ((0.0,) * 3, (1.0,) * 3)
    assert normalization(nn.Conv2d(3, 4, 3), mean=(0.1, 0.2, 0.3))[0] == (0.1, 0.2, 0.3)
