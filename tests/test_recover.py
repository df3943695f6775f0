import json

import pytest
import torch
import torch.nn.functional as F

from memprune import load_encoder, prune
from memprune.data import seeded_subset
from memprune.encoders import normalization
from memprune.errors import ConfigError, SiteError
from memprune.pruning import recover
from memprune.pruning._recover import RECOVERY_FILE
from memprune.train._common import LAST, load_checkpoint

from .conftest import tiny_resnet, tiny_vit

FAST = dict(latency_batch=None)


@pytest.fixture(scope="module")
def small(digits):
    return seeded_subset(digits, 128, seed=0)


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _normalized(model, x):
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in normalization(model))
    return (x - mean) / std


def _batch(data, n=64):
    return torch.stack([data[i][0] for i in range(n)])


def _teacher(data):
    """A random tiny ResNet whose BatchNorm statistics are those of ``data`` (timm's initial
    running statistics would make its eval-mode features unlike its training-mode ones)."""
    teacher = tiny_resnet(img_size=32).train()
    for m in teacher.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average: one pass sets the statistics
    with torch.no_grad():
        teacher(_normalized(teacher, _batch(data, len(data))))
    return teacher.eval()


def _cosine(student, teacher, x):
    """The held-out distillation target: mean cosine of the two encoders' features."""
    x = _normalized(teacher, x)
    with torch.no_grad():
        return F.cosine_similarity(student.eval()(x), teacher(x), dim=1).mean().item()


def test_distillation_brings_the_pruned_encoder_back_to_the_teacher(small, digits):
    teacher = _teacher(small)
    pruned, _ = prune(teacher, ratio=0.5, strategy="magnitude", **FAST)
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    held_out = _batch(seeded_subset(digits, 64, seed=1))  # not the training points
    start = _cosine(pruned, teacher, held_out)
    out = recover(pruned, teacher, data=small, epochs=4, batch_size=32, lr=3e-3, progress=False)
    end = _cosine(out.encoder, teacher, held_out)
    # measured over seeds 0-4 (models and recovery): +0.12 to +0.22 (0.24-0.37 -> 0.41-0.53)
    assert end > start + 0.05, (start, end)
    assert out.history[-1] < out.history[0]
    assert same_tensors(before, pruned.state_dict())  # the pruned encoder is left alone
    assert not out.encoder.training


def test_steps_budget_and_resume_and_saved_encoder_loads(small, tmp_path):
    teacher = tiny_resnet(img_size=32).eval()
    pruned, _ = prune(teacher, ratio=0.3, strategy="random", **FAST)
    # 128 points / 32 = 4 batches an epoch: 6 steps are one full epoch and half of the next
    out = recover(pruned, teacher, data=small, steps=6, batch_size=32, out_dir=tmp_path / "r",
                  augment={"scale": [0.5, 1.0]}, progress=False)  # fmt: skip
    state = load_checkpoint(tmp_path / "r" / LAST)
    assert len(out.history) == 2
    assert all(s["step"] == 6 for s in state["optimizer"]["state"].values())
    loaded = load_encoder(checkpoint=tmp_path / "r")
    x = _batch(small, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), out.encoder(x))
    saved = json.loads((tmp_path / "r" / RECOVERY_FILE).read_text())
    assert saved["augment"] == {"preset": "crop_flip", "scale": [0.5, 1.0]}  # the method's preset
    again = recover(pruned, teacher, data=small, steps=6, batch_size=32, out_dir=tmp_path / "r",
                    augment={"scale": [0.5, 1.0]}, progress=False)  # fmt: skip
    # finished: read back, not retrained
    assert same_tensors(again.encoder.state_dict(), out.encoder.state_dict())


def test_distillation_maps_pruned_widths_of_the_output_and_of_sites(small):
    teacher = tiny_vit().eval()
    pruned, _ = prune(teacher, ratio=0.5, strategy="magnitude", keep_output_width=False, **FAST)
    assert pruned(torch.zeros(1, 3, 32, 32)).shape[1] < teacher(torch.zeros(1, 3, 32, 32)).shape[1]
    out = recover(pruned, teacher, data=small, epochs=3, batch_size=32, sites=["blocks.0"],
                  loss="mse", progress=False, seed=0)  # fmt: skip
    # the student moves toward the teacher: over model seeds 0-4 the third epoch's MSE was
    # 0.48-0.73 of the first's
    assert len(out.history) == 3 and out.history[-1] < 0.85 * out.history[0]
    with torch.no_grad():  # the maps are gone: the encoder keeps its pruned width
        assert (
            out.encoder(torch.zeros(1, 3, 32, 32)).shape == pruned(torch.zeros(1, 3, 32, 32)).shape
        )


@pytest.mark.parametrize("method", ["supervised", "simclr"])
def test_label_and_ssl_recovery_train_every_layer(small, method):
    pruned, _ = prune(tiny_resnet(img_size=32), ratio=0.3, strategy="random", **FAST)
    out = recover(pruned, data=small, method=method, steps=2, batch_size=32, progress=False)
    changed = [k for k, v in out.encoder.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, pruned.state_dict()[k])]  # fmt: skip
    assert any(k.startswith("conv1") for k in changed) and any(
        k.startswith("layer4") for k in changed
    )


def test_bad_recovery_options_name_the_fix(small):
    model = tiny_resnet(img_size=32)
    with pytest.raises(ConfigError, match="teacher="):
        recover(model, data=small)
    with pytest.raises(ConfigError, match="recovery method"):
        recover(model, model, data=small, method="finetune")
    with pytest.raises(ConfigError, match="distillation targets"):
        recover(model, data=small, method="supervised", sites=["layer1"])
    with pytest.raises(SiteError, match="not modules"):
        recover(model, model, data=small, sites=["block9"], steps=1)
    with pytest.raises(ConfigError, match="steps"):
        recover(model, model, data=small, steps=0)
