import pytest
import torch
from torch import nn

from memprune import find_sites, load_encoder
from memprune.errors import SiteError


def names(sites):
    return [s.name for s in sites]


def test_resnet_sites(resnet):
    units = find_sites(resnet, "units")
    assert names(units)[:3] == ["act1", "layer1.0.act1", "layer1.0.act2"]
    assert len(units) == 17 and units[-1].name == "layer4.1.act2" and units[-1].n_units == 64
    layers = find_sites(resnet, "layers")
    assert names(layers) == ["maxpool"] + [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert [s.role for s in layers[:2]] == ["stem", "block"]


@pytest.mark.parametrize(
    "model_name, first_units, first_layers",
    [
        ("mobilenetv3_small_050", ["bn1.act", "blocks.0.0.bn1.act"], ["bn1", "blocks.0.0"]),
        ("convnext_atto", ["stages.0.blocks.0.mlp.act"], ["stem", "stages.0.blocks.0"]),
    ],
)
def test_other_cnn_families(model_name, first_units, first_layers):
    model = load_encoder(model_name)
    units = find_sites(model, "units", input_size=(3, 32, 32))
    layers = find_sites(model, "layers", input_size=(3, 32, 32))
    assert names(units)[: len(first_units)] == first_units
    assert names(layers)[: len(first_layers)] == first_layers
    # squeeze-excite gates and activations after a conv without norm are not units
    assert not any(".se." in n for n in names(units))


def test_vit_sites(vit):
    units = find_sites(vit, "units")
    assert names(units) == [
        "blocks.0.attn:heads",
        "blocks.0.attn.proj",
        "blocks.0.mlp.act",
        "blocks.1.attn:heads",
        "blocks.1.attn.proj",
        "blocks.1.mlp.act",
    ]
    assert [s.n_units for s in units] == [32, 32, 128, 32, 32, 128]
    assert [s.source for s in units[:3]] == ["blocks.0.attn.proj"] * 2 + ["blocks.0.mlp.fc1"]
    heads = units[0]
    assert (heads.module, heads.point, heads.role) == ("blocks.0.attn.proj", "input", "heads")
    layers = find_sites(vit, "layers")
    assert names(layers) == [
        "blocks.0:after_attn",
        "blocks.0:after_mlp",
        "blocks.1:after_attn",
        "blocks.1:after_mlp",
    ]
    assert layers[0].module == "blocks.0.norm2" and layers[0].point == "input"


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU())
        self.relu = nn.ReLU()
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = self.features(x).mean((2, 3))
        return self.relu(self.relu(self.head(x)))  # self.relu runs twice


def test_plain_module_with_patterns():
    model = Plain()
    sites = find_sites(model, "units", include=["features.1", "features.3", "head"])
    assert [(s.name, s.n_units, s.channel_axis) for s in sites] == [
        ("features.1", 4, 1),
        ("features.3", 6, 1),
        ("head", 5, 1),
    ]
    with pytest.raises(SiteError, match="'layer9.*' matches no units site"):
        find_sites(model, "units", include=["layer9.*"])
    with pytest.raises(SiteError, match="ran 2 times"):
        find_sites(model, "units", include=["relu"])
    with pytest.raises(SiteError, match="include="):
        find_sites(model, "units")


def test_patterns_filter_auto_sites(resnet):
    sites = find_sites(resnet, "units", include="layer4.*", exclude="*.act1")
    assert names(sites) == ["layer4.0.act2", "layer4.1.act2"]


@pytest.mark.parametrize("name, kw", [
    ("swin_tiny_patch4_window7_224",
     dict(window_size=2, depths=(1, 1, 1, 1), embed_dim=24, num_heads=(1, 1, 2, 2))),
    ("maxvit_nano_rw_256", {}), ("tiny_vit_5m_224", {}), ("mobilevit_xxs", {}),
])  # fmt: skip
def test_windowed_sites_fold_each_images_windows_back_into_its_row(name, kw):
    """Windowed attention (Swin, MaxViT, TinyViT) and unfolded patches (MobileViT) run a
    window per batch row: a site's reduced activation of an image is the same alone as in a
    batch with others (windows of different images are never mixed), one row per image."""
    from memprune import load_encoder
    from memprune.hooks import capture

    model = load_encoder(name, img_size=64, **kw)
    sites = find_sites(model, "units") + find_sites(model, "layers")
    windowed = [s for s in sites if s.windows > 1]
    assert windowed, "no windowed site found"
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), capture(model, sites) as together:
        model(x)
        together = {k: v.clone() for k, v in together.items()}
    for i in range(3):
        with torch.inference_mode(), capture(model, sites) as alone:
            model(x[i : i + 1])
            for s in windowed:
                assert alone[s.name].shape[0] == 1
                torch.testing.assert_close(alone[s.name][0], together[s.name][i],
                                           rtol=1e-4, atol=1e-5)  # fmt: skip


def test_layer_sites_when_the_first_blocks_sit_in_a_list_that_never_runs():
    """Twins keeps its first blocks in a ModuleList (`pos_block`) that is never called as a
    whole: the stem is found by the first block's own position (it was a KeyError)."""
    model = load_encoder("twins_svt_small", img_size=64, depths=(1, 1, 1, 1))
    layers = find_sites(model, "layers")
    assert "blocks.0.0:after_attn" in [s.name for s in layers]
