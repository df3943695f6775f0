"""What a new user's trial found (a checkpoint made at its own image size, scores that belong
to another encoder): each verb works at the size the checkpoint records, with no flag, and
says which size it used."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from memprune.cli import main

SIZE = 48  # neither the 32 px of the built-in data nor timm's 224
TINY = ["--timm", "channels=[8,16,32,64]"]


def _folder(root, n=16):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(3):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                pixels = (rng.random((SIZE, SIZE, 3)) * 80 + 60 * c).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")
    return root


@pytest.mark.slow
def test_every_verb_works_at_the_size_the_checkpoint_records(tmp_path, capsys):
    data = str(_folder(tmp_path / "folder"))
    pre = tmp_path / "pre"
    assert main(["pretrain", "--model", "resnet18", *TINY, "--img-size", str(SIZE), "--data",
                 data, "--epochs", "1", "--batch-size", "16", "--no-pair", "--out",
                 str(pre)]) == 0  # fmt: skip
    assert json.loads((pre / "card.json").read_text())["img_size"] == SIZE
    capsys.readouterr()
    note = f"input size: {SIZE} px, from what the encoder's checkpoint records"

    units = tmp_path / "units"
    assert main(["score", "units", "--checkpoint", str(pre), "--data", data, "--views", "1",
                 "--out", str(units)]) == 0  # fmt: skip
    assert note in capsys.readouterr().out
    shape = json.loads((units / "unitmem.json").read_text())["meta"]["sites"]["act1"]["shape"]
    assert shape == [64, SIZE // 2, SIZE // 2]  # the stem conv halves the input

    pruned = tmp_path / "pruned"
    assert main(["prune", "--checkpoint", str(pre), "--data", data, "--ratio", "0.5",
                 "--strategy", "lowest", "--scores", str(units), "--recover", "distill",
                 "--recover-epochs", "1", "--recover-batch-size", "16", "--latency-batch", "0",
                 "--out", str(pruned)]) == 0  # fmt: skip
    assert note in capsys.readouterr().out
    import torch_pruning as tp

    from memprune import load_encoder

    f = load_encoder(checkpoint=pre)
    macs, _ = tp.utils.count_ops_and_params(f, torch.zeros(1, 3, SIZE, SIZE))
    table = json.loads((pruned / "results.json").read_text())["table"]
    assert table[0]["macs"] == macs  # measured at the checkpoint's size, as everything else

    probe = tmp_path / "probe"
    recovered = pruned / "models" / "lowest_0.5_distill"
    assert main(["probe", "--checkpoint", str(pre), str(recovered), "--data", data,
                 "--out", str(probe)]) == 0  # fmt: skip
    assert note in capsys.readouterr().out
    # one preprocessing per encoder everywhere: the probe verb and the sweep agree on f
    probed = json.loads((probe / "probe.json").read_text())
    swept = json.loads((pruned / "results.json").read_text())
    assert probed["preprocessing"] == swept["preprocessing"]
    assert "eval preprocessing (timm)" in probed["preprocessing"]
    assert probed["encoders"][0]["linear"]["accuracy"] == table[0]["accuracy"]
    recovered_row = next(r for r in swept["runs"] if r["recovery"] == "distill")
    assert probed["encoders"][1]["linear"]["accuracy"] == recovered_row["accuracy"]

    tuned = tmp_path / "tuned"
    assert main(["finetune", "--f", str(pre), "--unit-scores", str(units), "--by", "unitmem",
                 "--data", data, "--k", "1", "--strategy", "top", "last", "--epochs", "1",
                 "--batch-size", "16", "--seeds", "0", "--out", str(tuned)]) == 0  # fmt: skip
    assert note in capsys.readouterr().out


@pytest.mark.slow
def test_a_vit_checkpoint_is_scored_and_pruned_at_its_own_size(tmp_path, capsys):
    """A ViT's patch grid fixes its input size: every verb must use the recorded one (at 32
    px the patch embedding refuses the images)."""
    data = str(_folder(tmp_path / "folder", n=8))
    pre = tmp_path / "pre"
    vit = ["--model", "vit_tiny_patch16_224", "--timm", "patch_size=16", "depth=1",
           "embed_dim=32", "num_heads=2"]  # fmt: skip
    assert main(["pretrain", *vit, "--img-size", str(SIZE), "--data", data, "--epochs", "1",
                 "--batch-size", "16", "--no-pair", "--out", str(pre)]) == 0  # fmt: skip
    capsys.readouterr()
    units = tmp_path / "units"
    assert main(["score", "units", "--checkpoint", str(pre), "--data", data, "--views", "1",
                 "--out", str(units)]) == 0  # fmt: skip
    assert f"input size: {SIZE} px" in capsys.readouterr().out
    sites = json.loads((units / "unitmem.json").read_text())["meta"]["sites"]
    assert sites["blocks.0.mlp.act"]["shape"][0] == (SIZE // 16) ** 2 + 1  # patches + class
    assert main(["prune", "--checkpoint", str(pre), "--data", data, "--ratio", "0.5",
                 "--strategy", "lowest", "random", "--scores", str(units), "--heads",
                 "--latency-batch", "0", "--out", str(tmp_path / "pruned")]) == 0  # fmt: skip
    # the probe verb and the sweep preprocess alike (timm's eval crop of a ViT) and agree
    lowest = str(tmp_path / "pruned" / "models" / "lowest_0.5")
    assert main(["probe", "--checkpoint", str(pre), lowest, "--data", data, "--no-knn",
                 "--out", str(tmp_path / "probe")]) == 0  # fmt: skip
    probed = json.loads((tmp_path / "probe" / "probe.json").read_text())
    swept = json.loads((tmp_path / "pruned" / "results.json").read_text())
    assert probed["preprocessing"] == swept["preprocessing"]
    assert [e["linear"]["accuracy"] for e in probed["encoders"]] == [
        swept["table"][0]["accuracy"], swept["runs"][0]["accuracy"]]  # fmt: skip


def test_force_leaves_nothing_of_the_previous_output(tmp_path):
    out = tmp_path / "out"
    prune = ["prune", *TINY, "--latency-batch", "0", "--out", str(out)]
    assert main([*prune, "--strategy", "magnitude", "--ratio", "0.5"]) == 0
    assert (out / "models" / "magnitude_0.5").is_dir()
    assert main([*prune, "--strategy", "random", "--ratio", "0.3", "--force"]) == 0
    assert sorted(p.name for p in (out / "models").iterdir()) == ["random_0.3"]
    mine = tmp_path / "mine"  # a folder memprune did not write: --force removes none of it
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main([*prune[:-1], str(mine), "--strategy", "random", "--ratio", "0.3", "--force"]) == 0
    assert (mine / "notes.txt").read_text() == "keep"


def test_small_and_unbalanced_data_are_probed_fine_tuned_and_pruned(tmp_path):
    """A class with one image (no stratified split: a plain one), and four images with one C
    and no kNN (nothing to choose, no validation split needed)."""
    from .test_errors import _split_folder, _weights

    one = _split_folder(tmp_path / "one", {"a": 1, "b": 6, "c": 6})
    assert main(["probe", *TINY, "--data", one, "--out", str(tmp_path / "p1")]) == 0
    f = str(_weights(tmp_path / "f.safetensors"))
    assert main(["finetune", "--model", "resnet18", *TINY, "--f", f, "--data", one, "--k", "1",
                 "--strategy", "last", "--epochs", "1", "--seeds", "0", "--batch-size", "4",
                 "--out", str(tmp_path / "ft")]) == 0  # fmt: skip
    tiny = _split_folder(tmp_path / "tiny", {"a": 2, "b": 2})
    assert main(["probe", *TINY, "--data", tiny, "--cs", "1.0", "--no-knn",
                 "--out", str(tmp_path / "p2")]) == 0  # fmt: skip
    assert main(["prune", *TINY, "--data", tiny, "--cs", "1.0", "--strategy", "random",
                 "--ratio", "0.3", "--latency-batch", "0",
                 "--out", str(tmp_path / "pr")]) == 0  # fmt: skip


def test_image_folders_read_what_a_user_puts_in_them(tmp_path):
    """16-bit PNGs keep their brightness, a hidden folder is no class, GIFs are read, other
    files are named in a warning; mixed sizes without a resize and grayscale tensors through
    the API are refused in one line."""
    from memprune import load_dataset
    from memprune.errors import DataError, DataWarning

    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    wide = np.full((8, 8), 0.305 * 65535, dtype=np.uint16)  # a 16-bit grey of 0.305
    Image.fromarray(wide).save(root / "a" / "grey16.png")
    Image.new("RGB", (8, 8), (200, 10, 10)).convert("P").save(root / "b" / "red.gif")
    (root / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".ipynb_checkpoints" / "x.png")
    (root / "b" / "notes.txt").write_text("not an image")
    with pytest.warns(DataWarning, match="1 files are not read.*notes.txt"):
        data = load_dataset(str(root), "train")
    assert data.classes == ["a", "b"] and len(data) == 2
    grey = data[0][0]
    assert grey.shape == (3, 8, 8) and abs(float(grey.mean()) - 0.305) < 0.01
    assert abs(float(data[1][0][0].mean()) - 200 / 255) < 0.02  # the GIF's red channel

    Image.new("RGB", (10, 10)).save(root / "a" / "bigger.png")
    with pytest.warns(DataWarning):
        mixed = load_dataset(str(root), "train")
    with pytest.raises(DataError, match=r"is \(8, 8\) but the folder's first image is \(10, 10\)"):
        [mixed[i] for i in range(len(mixed))]
    with pytest.warns(DataWarning):
        assert load_dataset(str(root), "train", img_size=8)[0][0].shape == (3, 8, 8)

    from torch.utils.data import TensorDataset

    import memprune
    from memprune.data import IndexedDataset

    gray = IndexedDataset(TensorDataset(torch.rand(6, 1, 32, 32), torch.arange(6) % 2))
    model = memprune.load_encoder("resnet18", channels=(8, 16, 32, 64))
    with pytest.raises(DataError, match=r"is \(1, 32, 32\): the encoders take RGB images"):
        memprune.unit_mem(model, gray, n_views=1, sites="layer4.*")


def test_interruptions_full_disks_and_edited_files_end_in_one_line(tmp_path, capsys, monkeypatch):
    import errno

    import memprune
    from memprune.errors import CheckpointError, ConfigError, OutputError
    from memprune.pruning import export_encoder, load_pruned, prune, save_pruned

    from .test_errors import _touch

    units = ["score", "units", *TINY, "--max-points", "16", "--views", "1",
             "--out", str(tmp_path / "u")]  # fmt: skip
    import memprune.recipes._run as runner

    real = runner.run_stage

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_stage", interrupted)
    assert main(units) == 130
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "interrupted; the finished parts are kept" in err
    monkeypatch.setattr(runner, "run_stage", real)
    assert main(units) == 0  # the same command finishes the interrupted output

    import memprune._io as io

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match="the disk is full"):
        io.atomic_write(tmp_path / "x.bin", full)
    assert list(tmp_path.glob(".x.bin*")) == []  # no temporary file left

    model = memprune.load_encoder("resnet18", channels=(8, 16, 32, 64))
    with pytest.raises(ConfigError, match="is a file: export_encoder writes a directory"):
        export_encoder(model, _touch(tmp_path / "file"))
    pruned, _ = prune(model, None, 0.5, "random", latency_batch=None)
    save_pruned(pruned, tmp_path / "p")
    spec = json.loads((tmp_path / "p" / "pruned.json").read_text())
    conv = next(n for n, a in spec["structure"].items() if "out_channels" in a)
    spec["structure"][conv]["out_channels"] += 3  # declared wider than its weights
    (tmp_path / "p" / "pruned.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match=rf"declares {conv}\.out_channels = \d+ but its"):
        load_pruned(tmp_path / "p")


def test_fine_tuning_without_room_for_a_validation_split_says_so(tmp_path, capsys):
    """32 points of 10 classes: a stratified fifth (7 points) cannot hold every class."""
    from .test_errors import _split_folder, _weights

    data = _split_folder(tmp_path / "imgs", {f"c{i}": (4 if i < 2 else 3) for i in range(10)})
    f = str(_weights(tmp_path / "f.safetensors"))
    code = main(["finetune", "--model", "resnet18", *TINY, "--f", f, "--data", data, "--k", "1",
                 "--strategy", "last", "--epochs", "1", "--seeds", "0", "--batch-size", "4",
                 "--cs", "1.0", "--out", str(tmp_path / "ft")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "fine-tuning keeps its best epoch on a validation split of 0.2 of its 32" in err
    assert not (tmp_path / "ft").exists()


def test_a_full_disk_reported_by_safetensors_is_one_line():
    """safetensors wraps the OS error in its own exception: its code is read from the text."""
    from memprune._io import _refused

    class SafetensorError(Exception):  # the name safetensors' Rust error carries
        pass

    err = SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
    assert "file size limit" in _refused(err)
    err = SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
    assert "the disk is full" in _refused(err)
    assert _refused(SafetensorError("header too large")) is None
