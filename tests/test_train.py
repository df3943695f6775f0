import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from memprune import load_encoder
from memprune.errors import ConfigError, EncoderError
from memprune.train import nt_xent, pretrain_pair, pretrain_simclr, train_supervised

from .conftest import TINY_RESNET

RECIPE = dict(epochs=2, batch_size=16, lr=1e-3, proj_dim=16, seed=0, progress=False, **TINY_RESNET)


def test_nt_xent_equals_the_formula():
    torch.manual_seed(0)
    z1, z2, t = torch.randn(4, 8), torch.randn(4, 8), 0.3
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z)
    losses = []
    for i in range(n):
        pos = (i + n // 2) % n
        sims = torch.stack([z[i] @ z[k] / t for k in range(n) if k != i])
        losses.append(-(z[i] @ z[pos] / t) + torch.logsumexp(sims, 0))
    torch.testing.assert_close(nt_xent(z1, z2, t), torch.stack(losses).mean())
    # identical views with far-apart points: the loss is near its floor
    far = torch.eye(4) * 10
    assert nt_xent(far, far, 0.1) < 1e-3


def test_nt_xent_leaves_other_copies_out_of_the_negatives():
    torch.manual_seed(0)
    z1, z2, t = torch.randn(4, 8), torch.randn(4, 8), 0.3
    # distinct ids change nothing
    torch.testing.assert_close(nt_xent(z1, z2, t, ids=torch.arange(4)), nt_xent(z1, z2, t))
    ids = torch.tensor([7, 3, 7, 5])  # points 0 and 2 are copies of one data point
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n, point = len(z), torch.cat([ids, ids])
    losses = []
    for i in range(n):
        pos = (i + n // 2) % n
        keep = [k for k in range(n) if k != i and (k == pos or point[k] != point[i])]
        sims = torch.stack([z[i] @ z[k] / t for k in keep])
        losses.append(-(z[i] @ z[pos] / t) + torch.logsumexp(sims, 0))
    torch.testing.assert_close(nt_xent(z1, z2, t, ids=ids), torch.stack(losses).mean())
    # two copies with identical views no longer cost anything as each other's negatives
    far = torch.eye(4) * 10
    far[2] = far[0]
    assert nt_xent(far, far, 0.1, ids=torch.tensor([0, 1, 0, 3])) < 1e-3
    assert nt_xent(far, far, 0.1) > 0.1


def test_repeated_points_get_new_views_and_the_others_keep_theirs(digits):
    from memprune.data import MultiView
    from memprune.train.simclr import _Copies

    indices = [5, 9, 5, 2, 5]
    copies = MultiView(_Copies(digits, indices), 2, "simclr", seed=3)
    plain = MultiView(Subset(digits, indices), 2, "simclr", seed=3)
    for position in (1, 3):  # named once: the same views as before, the data index as label
        torch.testing.assert_close(copies[position][0], plain[position][0])
        assert copies[position][1] == indices[position]
    torch.testing.assert_close(copies[0][0], plain[0][0])  # the first copy keeps its own
    assert not torch.equal(copies[2][0], copies[0][0])  # later copies: other views
    assert not torch.equal(copies[4][0], copies[2][0])
    assert copies[2][1] == copies[4][1] == 5  # ... of the same point


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_equals_uninterrupted(tmp_path, digits):
    data = Subset(digits, range(64))
    whole = pretrain_simclr("resnet18", data, out_dir=tmp_path / "whole", **RECIPE)

    def interrupt(epoch, history):
        if epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain_simclr("resnet18", data, out_dir=tmp_path / "cut", callback=interrupt, **RECIPE)
    assert not (tmp_path / "cut" / "card.json").exists()
    resumed = pretrain_simclr("resnet18", data, out_dir=tmp_path / "cut", **RECIPE)
    assert resumed.history == whole.history
    a, b = _weights(whole.encoder), _weights(resumed.encoder)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the card rebuilds the same encoder; a finished run is loaded, not retrained
    loaded = load_encoder(checkpoint=tmp_path / "cut")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), resumed.encoder(x))
    again = pretrain_simclr("resnet18", data, out_dir=tmp_path / "cut", **RECIPE)
    assert again.history == resumed.history


def test_training_on_views_made_in_batches(tmp_path, digits, monkeypatch):
    """SimCLR with the views made in batches on the device (what CUDA does) trains on the
    same views up to float rounding: the first epoch's loss agrees closely."""
    import memprune.train._common as common
    from memprune.data import loop_views

    data, recipe = Subset(digits, range(32)), {**RECIPE, "epochs": 1}
    host = pretrain_simclr("resnet18", data, out_dir=tmp_path / "host", **recipe)
    made_on = []

    def on_device(views, device, _place):
        made_on.append(device.type)
        return loop_views(views, device, "device")

    monkeypatch.setattr(common, "loop_views", on_device)
    made = pretrain_simclr("resnet18", data, out_dir=tmp_path / "made", **recipe)
    assert made_on == ["cpu"] and made.history == pytest.approx(host.history, rel=1e-4)


def test_changed_settings_do_not_resume(tmp_path, digits):
    data = Subset(digits, range(32))

    def stop(epoch, history):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain_simclr("resnet18", data, out_dir=tmp_path, callback=stop, **RECIPE)
    with pytest.raises(ConfigError, match="other settings \\(lr\\)"):
        pretrain_simclr("resnet18", data, out_dir=tmp_path, **{**RECIPE, "lr": 0.1})


def test_pair_and_card_errors(tmp_path, digits):
    data = Subset(digits, range(80))
    recipe = {**RECIPE, "epochs": 1}
    f, g, splits = pretrain_pair(
        "resnet18", data, tmp_path, shared=32, candidate=16, extra=16, **recipe
    )
    assert (tmp_path / "splits.json").is_file()
    assert set(splits.candidate).isdisjoint(splits.extra)
    assert load_encoder(checkpoint=tmp_path / "f").num_features == 64
    with pytest.raises(EncoderError, match="holds a 'resnet18' encoder, not 'vit_tiny"):
        load_encoder("vit_tiny_patch16_224", checkpoint=tmp_path / "g")
    with pytest.raises(ConfigError, match="no encoder card"):
        load_encoder(checkpoint=tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="splits overlap"):
        from memprune import Splits

        pretrain_pair(
            "resnet18", data, tmp_path / "bad", splits=Splits(80, [1, 2], [2], [3]), **recipe
        )


#: Over 10 seeds x {1, 2} threads (benchmarks/planted_margin.py --supervised
#: --supervised-epochs 8), the loss drop with true labels was 0.78 +- 0.06-0.08 (min 0.68) and
#: the random-label loss ended 0.70 +- 0.07-0.08 above it (min 0.59); mean - 4 SD >= 0.36 and
#: 0.43. With 4 epochs the second margin was 0.31 +- 0.09: mean - 4 SD below 0, too thin.
SUPERVISED_MARGIN = 0.3


def test_supervised_learns_and_random_labels(tmp_path, digits):
    data = Subset(digits, range(256))
    recipe = {k: v for k, v in RECIPE.items() if k != "proj_dim"}
    recipe |= {"epochs": 8, "batch_size": 32, "lr": 1e-2}
    true = train_supervised("resnet18", data, out_dir=tmp_path / "true", **recipe)
    rand = train_supervised(
        "resnet18", data, out_dir=tmp_path / "rand", random_labels=True, **recipe
    )
    assert true.history[0] - true.history[-1] > SUPERVISED_MARGIN, true.history
    assert rand.history[-1] - true.history[-1] > SUPERVISED_MARGIN, (rand.history, true.history)
    assert load_encoder(checkpoint=tmp_path / "rand").num_features == 64


def _simclr_run(tmp_path, name: str, processes: int, sync: bool):
    import os
    import subprocess
    import sys

    from .conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = [str(ROOT / "tests" / "_mp_simclr.py"), str(tmp_path / name),
              "sync" if sync else "local"]  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
              str(processes), "--master_port", str(28900 + (os.getpid() % 400))]  # fmt: skip
    cmd = [*launch, *script] if processes > 1 else [sys.executable, *script]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from memprune import load_encoder
    from memprune.checkpoints import read_card

    card, _ = read_card(tmp_path / name)
    return load_encoder(checkpoint=tmp_path / name), card


@pytest.mark.slow
def test_simclr_on_two_processes_takes_one_process_steps(tmp_path):
    """The global batch split over 2 processes, negatives gathered across them and BatchNorm
    synced: the first step's loss (the first epoch's: one batch per epoch) and the next two
    equal one process's to 1e-5, and after 3 steps the weights to 1e-4 (measured: losses 2e-6,
    weights 1.9e-5, running statistics 2e-6; the summation order differs); without synced
    BatchNorm the first loss differs by 0.04 and the weights by 4e-3."""
    one, card_one = _simclr_run(tmp_path, "one", 1, sync=True)
    two, card_two = _simclr_run(tmp_path, "two", 2, sync=True)
    assert (card_one["processes"], card_one["batch_per_process"]) == (1, 32)
    assert (card_two["processes"], card_two["batch_per_process"]) == (2, 16)
    assert card_two["batch_size"] == 32 and card_two["batch_scope"] == "global"
    torch.testing.assert_close(torch.tensor(card_two["history"]),
                               torch.tensor(card_one["history"]), rtol=0, atol=1e-5)  # fmt: skip

    def drift(a, b):
        sa, sb = a.state_dict(), b.state_dict()
        return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa
                   if sa[k].is_floating_point())  # fmt: skip

    synced = drift(one, two)
    assert synced < 1e-4, synced
    local, card_local = _simclr_run(tmp_path, "local", 2, sync=False)
    assert drift(one, local) > 10 * synced
    assert abs(card_local["history"][0] - card_one["history"][0]) > 1e-3
