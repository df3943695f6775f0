import pytest
import torch
import torch.nn.functional as F

from memprune import find_sites
from memprune.errors import SiteError
from memprune.hooks import capture


def test_resnet_units_equal_own_forward_with_residuals(resnet):
    """Captured act2 (after the residual addition, in-place ReLU) equals a manual computation."""
    x = torch.rand(4, 3, 32, 32)
    sites = find_sites(resnet, "units") + find_sites(resnet, "layers")
    with torch.no_grad(), capture(resnet, sites) as acts:
        out = resnet(x)
    with torch.no_grad():
        r = resnet
        stem = r.maxpool(F.relu(r.bn1(r.conv1(x))))
        b = r.layer1[0]
        h = F.relu(b.bn1(b.conv1(stem)))
        act2 = F.relu(b.bn2(b.conv2(h)) + b.downsample(stem))
    torch.testing.assert_close(acts["layer1.0.act1"], h.mean((2, 3)))
    torch.testing.assert_close(acts["layer1.0.act2"], act2.mean((2, 3)))
    torch.testing.assert_close(acts["layer1.0"], act2.flatten(1))
    torch.testing.assert_close(acts["maxpool"], stem.flatten(1))
    # the last block, pooled, is the model's own output (global average pool)
    last = acts["layer4.1"].view(4, 64, -1).mean(-1)
    torch.testing.assert_close(last, out)


def test_vit_units_and_layers_equal_own_forward(vit):
    x = torch.rand(3, 3, 32, 32)
    sites = find_sites(vit, "units") + find_sites(vit, "layers")
    with torch.no_grad(), capture(vit, sites, signed="abs", representation="flatten") as acts:
        out = vit(x)
    with torch.no_grad():
        b0 = vit.blocks[0]
        tokens = vit.patch_embed(x)
        tokens = vit._pos_embed(tokens)
        attn = b0.attn(b0.norm1(tokens))
        after_attn = tokens + attn
        hidden = b0.mlp.act(b0.mlp.fc1(b0.norm2(after_attn)))
        after_mlp = after_attn + b0.mlp(b0.norm2(after_attn))
    torch.testing.assert_close(acts["blocks.0.attn.proj"], attn.abs().mean(1))
    torch.testing.assert_close(acts["blocks.0.mlp.act"], hidden.abs().mean(1))
    torch.testing.assert_close(acts["blocks.0:after_attn"], after_attn.flatten(1))
    torch.testing.assert_close(acts["blocks.0:after_mlp"], after_mlp.flatten(1))
    last = acts["blocks.1:after_mlp"].view(3, 17, 32)
    torch.testing.assert_close(vit.norm(last)[:, 0], out)
    with torch.no_grad(), capture(vit, sites[:2], signed="relu") as acts:
        vit(x)
    torch.testing.assert_close(acts["blocks.0.attn.proj"], attn.relu().mean(1))


def test_pool_and_cls_representations(vit, resnet):
    x = torch.rand(2, 3, 32, 32)
    layers = find_sites(vit, "layers")
    with torch.no_grad(), capture(vit, layers, representation="cls") as cls:
        vit(x)
    with torch.no_grad(), capture(vit, layers, representation="pool") as pool:
        vit(x)
    with torch.no_grad(), capture(vit, layers) as flat:
        vit(x)
    full = flat["blocks.1:after_mlp"].view(2, 17, 32)
    torch.testing.assert_close(cls["blocks.1:after_mlp"], full[:, 0])
    torch.testing.assert_close(pool["blocks.1:after_mlp"], full.mean(1))
    with (
        pytest.raises(SiteError, match="cls"),
        capture(resnet, find_sites(resnet, "layers"), representation="cls"),
    ):
        resnet(x)


def test_hooks_removed_after_exception(resnet):
    sites = find_sites(resnet, "units") + find_sites(resnet, "layers")

    def count():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in resnet.modules())

    assert count() == 0
    with pytest.raises(RuntimeError), capture(resnet, sites):
        resnet(torch.rand(1, 5, 32, 32))  # wrong channel count: the forward pass raises
    assert count() == 0
    with (
        pytest.raises(SiteError, match="not in ResNet: nothing"),
        capture(resnet, [sites[0].__class__("x", "nothing", "units", "conv", 1)]),
    ):
        pass
    assert count() == 0
