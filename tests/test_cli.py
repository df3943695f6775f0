import json
import re

from memprune.cli import main
from memprune.report._rundir import MARKER

from .conftest import kill_when, same_tensors, unfinished


def test_sites_command_prints_table(capsys):
    assert main(["sites", "--views", "2", "--points", "3"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.act1  units   conv   64     64x8x8" in out
    assert "6 points" not in out and "3 points x 2 views" in out
    assert "17 unit sites (3904 units), 9 layer sites" in out


def test_cli_errors_are_one_line(capsys):
    assert main(["sites", "--model", "resnt18"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "closest timm names: resnet18" in err


def test_score_units_and_classes_write_results(tmp_path, capsys):
    from memprune import ClassMemResult, UnitMemResult

    out = tmp_path / "units"
    args = ["--views", "2", "--max-points", "40", "--sites", "layer4.*", "--out", str(out)]
    assert main(["score", "units", *args]) == 0
    for name in (
        "unitmem.safetensors",
        "unitmem.json",
        "summary.md",
        "summary.csv",
        "unitmem_per_site.png",
    ):
        assert (out / name).is_file(), name
    result = UnitMemResult.load(out / "unitmem")
    assert list(result.sites) == [
        "layer4.0.act1",
        "layer4.0.act2",
        "layer4.1.act1",
        "layer4.1.act2",
    ]
    assert result.meta["n_points"] == 40 and result.meta["model"] == "resnet18"
    assert "layer4.0.act1" in capsys.readouterr().out
    # an existing run directory is not overwritten without --force
    assert main(["score", "units", *args]) == 2
    assert "--force" in capsys.readouterr().err
    # kill -9 while writing (the scores are there, the tables and the plot not yet), rerun the
    # same command: it finishes the run, with the uninterrupted run's results
    cut = [*args[:-1], str(tmp_path / "cut")]
    kill_when(["score", "units", *cut], lambda: (tmp_path / "cut/unitmem.safetensors").is_file())
    assert unfinished(tmp_path / "cut")
    assert main(["score", "units", *cut]) == 0
    assert same_tensors(out / "unitmem.safetensors", tmp_path / "cut/unitmem.safetensors")
    assert (out / "summary.csv").read_text() == (tmp_path / "cut/summary.csv").read_text()
    assert not unfinished(tmp_path / "cut")
    assert main(["score", "classes", "--max-points", "60", "--out", str(tmp_path / "c")]) == 0
    assert ClassMemResult.load(tmp_path / "c" / "classmem_f").kind == "classmem"


def test_pretrain_pair_then_score_layers(tmp_path, capsys):
    from memprune import LayerMemResult, Splits

    run = tmp_path / "pair"
    tiny = ["--timm", "channels=[8,16,32,64]"]
    args = ["pretrain", "--pair", "--shared", "32", "--candidate", "16", "--extra", "16",
            "--epochs", "1", "--batch-size", "16", "--out", str(run), *tiny]  # fmt: skip
    assert main(args) == 0
    assert "f: " in capsys.readouterr().out
    for part in ("f/card.json", "f/encoder.safetensors", "g/card.json", "splits.json"):
        assert (run / part).is_file(), part
    assert main(args) == 2  # an existing run is not overwritten
    assert "--force" in capsys.readouterr().err
    out = tmp_path / "layers"
    cmd = ["score", "layers", "--f", str(run / "f"), "--g", str(run / "g"), "--pairs", "2",
           "--top-k", "5", "--out", str(out)]  # fmt: skip
    assert main(cmd) == 0
    for name in (
        "layermem.safetensors",
        "layermem.md",
        "layermem.csv",
        "layermem.png",
        "consistency.png",
    ):
        assert (out / name).is_file(), name
    result = LayerMemResult.load(out / "layermem")
    assert result.indices.tolist() == Splits.load(run / "splits.json").candidate
    assert result.layers[0] == "maxpool" and result.layers[-1] == "output"
    assert "LayerMem_top5" in capsys.readouterr().out
    # one encoder, no reference: the member gap of f's candidates against the extras
    gap = tmp_path / "gap"
    splits = run / "splits.json"
    cmd = ["score", "layers", "--encoder", str(run / "f"), "--members", f"train:{splits}:candidate",
           "--nonmembers", f"train:{splits}:extra", "--pairs", "2", "--out", str(gap)]  # fmt: skip
    assert main(cmd) == 0
    from memprune.scores import MemberGapResult

    r = MemberGapResult.load(gap / "membergap")
    assert r.member_indices.tolist() == Splits.load(splits).candidate
    assert r.nonmember_indices.tolist() == Splits.load(splits).extra
    assert (gap / "membergap.png").is_file() and "auc" in capsys.readouterr().out
    both = [*cmd[:-1], str(tmp_path / "both"), "--f", str(run / "f")]
    assert main(both) == 2 and "either --f and --g" in capsys.readouterr().err
    same = [*cmd[:-1], str(tmp_path / "same")]
    same[same.index("--nonmembers") + 1] = f"train:{splits}:f"  # f's points include candidates
    assert main(same) == 2 and "share 16 points" in capsys.readouterr().err
    assert not (tmp_path / "both").exists() and not (tmp_path / "same").exists()


def test_probe_command(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from memprune import linear_probe, load_dataset, load_encoder

    out = tmp_path / "probe"
    args = ["probe", "--timm", "channels=[8,16,32,64]", "--knn", "--out", str(out)]
    assert main(args) == 0
    result = json.loads((out / "probe.json").read_text())["encoders"][0]
    # the accuracy is the library's probe of the same (seeded) random init
    torch.manual_seed(0)
    same = load_encoder("resnet18", channels=(8, 16, 32, 64))
    digits = [load_dataset("digits", split) for split in ("train", "test")]
    assert result["linear"]["accuracy"] == linear_probe(same, *digits, seed=0).accuracy
    assert result["knn"]["k"] in (10, 20, 100, 200)
    assert len(result["linear"]["confusion"]) == 10
    assert (out / "confusion_linear.png").is_file() and (out / "confusion_knn.png").is_file()
    assert "sklearn" in capsys.readouterr().out  # the backend "auto" chose on the CPU
    # several encoders: one table, one row each, the same numbers as probing each alone
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = load_encoder("resnet18", channels=(8, 16, 32, 64), zero_init_last=False)
        paths.append(str(tmp_path / f"w{seed}.safetensors"))
        save_file(model.state_dict(), paths[-1])
    both = ["probe", "--timm", "channels=[8,16,32,64]", "zero_init_last=false", "--checkpoint"]
    assert main([*both, *paths, "--out", str(tmp_path / "both")]) == 0
    rows = (tmp_path / "both" / "probe.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith(paths[0]) and rows[2].startswith(paths[1])
    assert main([*both, paths[1], "--out", str(tmp_path / "one")]) == 0
    alone = json.loads((tmp_path / "one" / "probe.json").read_text())["encoders"][0]
    together = json.loads((tmp_path / "both" / "probe.json").read_text())["encoders"][1]
    assert alone["linear"]["accuracy"] == together["linear"]["accuracy"]
    # features on disk (--store): read in chunks, the same accuracy (torch backend both ways)
    disk = [*both, paths[1], "--backend", "torch", "--store", str(tmp_path / "store")]
    assert main([*disk, "--out", str(tmp_path / "disk")]) == 0
    assert main([*both, paths[1], "--backend", "torch", "--out", str(tmp_path / "ram")]) == 0
    on_disk, in_ram = (json.loads((tmp_path / d / "probe.json").read_text())["encoders"][0]
                       for d in ("disk", "ram"))  # fmt: skip
    assert on_disk["linear"]["store"] and on_disk["linear"]["C"] == in_ram["linear"]["C"]
    assert on_disk["linear"]["accuracy"] == in_ram["linear"]["accuracy"]
    assert len(list((tmp_path / "store").glob("*.features.npy"))) == 2


def test_prune_command_compares_strategies(tmp_path, capsys):
    from memprune import load_encoder

    out = tmp_path / "prune"
    tiny = ["--timm", "channels=[8,16,32,64]", "--data", "digits", "--ratio", "0.5"]
    args = [*tiny, "--strategy", "lowest", "random", "--views", "2", "--max-points", "200",
            "--latency-batch", "8"]  # fmt: skip
    assert main(["prune", *args, "--forgetting", "--out", str(out)]) == 0
    for name in (
        "results.json",
        "comparison.md",
        "comparison.csv",
        "tradeoff.png",
        "unitmem/unitmem.json",
        "forgetting.md",
        "pies.md",
    ):
        assert (out / name).is_file(), name
    # what each pruned encoder forgets, from the saved per-example outcomes
    from safetensors.torch import load_file

    per = load_file(out / "forgetting.safetensors")
    names = json.loads((out / "forgetting.json").read_text())["encoders"]
    assert names[0] == "unpruned" and per["correct"].shape == (len(names), 360)
    with open(out / "forgetting.csv") as fh:
        rows = list(__import__("csv").DictReader(fh))
    for row in rows:
        right, now = per["correct"][0].bool(), per["correct"][names.index(row["model"])].bool()
        assert int(row["forgotten"]) == int((right & ~now).sum()), row
    report = json.loads((out / "results.json").read_text())
    assert all("test set's noise" in v for v in report["verdicts"] if " wins " in v)
    assert [(r["strategy"], r["ratio"]) for r in report["table"]] == [
        ("none", 0.0), ("lowest", 0.5), ("random", 0.5)
    ]  # fmt: skip
    assert all(r["latency_ms"] > 0 for r in report["table"])
    # each row is the probe of its encoder: the unpruned one, and the saved pruned ones
    import torch

    from memprune import linear_probe, load_dataset

    torch.manual_seed(0)
    unpruned = load_encoder("resnet18", channels=(8, 16, 32, 64))
    digits = [load_dataset("digits", split) for split in ("train", "test")]
    assert report["table"][0]["accuracy"] == linear_probe(unpruned, *digits, seed=0).accuracy
    lowest = load_encoder(checkpoint=out / "models" / "lowest_0.5")
    assert report["table"][1]["accuracy"] == linear_probe(lowest, *digits, seed=0).accuracy
    lowest = report["runs"][0]
    assert lowest["params"][1] < lowest["params"][0]
    pruned = load_encoder(checkpoint=out / "models" / "lowest_0.5")
    assert pruned.layer2[0].conv1.out_channels == 8
    # saved scores are reused: the same units go
    # ... and recovered over two seeds, exported beside the safetensors
    again = tmp_path / "again"
    reuse = [
        *tiny,
        "--strategy",
        "lowest",
        "--scores",
        str(out),
        "--latency-batch",
        "0",
        "--recover",
        "distill",
        "--recover-steps",
        "2",
        "--seeds",
        "0",
        "1",
        "--export",
    ]
    assert main(["prune", *reuse, "--out", str(again)]) == 0
    report2 = json.loads((again / "results.json").read_text())
    rerun = report2["runs"][0]
    assert rerun["groups"] == lowest["groups"] and "latency_ms" not in rerun
    recovered = report2["table"][-1]
    assert (recovered["recovery"], recovered["seeds"]) == ("distill", 2)
    assert (again / "models/lowest_0.5/encoder.pt2").is_file()
    assert (again / "models/lowest_0.5_distill_s1/encoder.safetensors").is_file()
    assert any("lowest + distill" in line for line in report2["verdicts"])
    # a pruned encoder is probed like any other
    probe = [
        "probe",
        "--checkpoint",
        str(out / "models" / "lowest_0.5"),
        "--out",
        str(tmp_path / "p"),
    ]
    assert main(probe) == 0
    assert "lowest_0.5" in capsys.readouterr().out
    assert main(["prune", *tiny, "--strategy", "random", "--out", str(out)]) == 2
    # kill -9 in the middle of the sweep (one pruned encoder saved), rerun the same command
    cut = tmp_path / "cut"
    kill_when(["prune", *args, "--out", str(cut)],
              lambda: (cut / "models/lowest_0.5/pruned.json").is_file())  # fmt: skip
    assert unfinished(cut) and not (cut / "results.json").exists()
    assert main(["prune", *args, "--out", str(cut)]) == 0
    assert _without_latency(json.loads((cut / "results.json").read_text())) == _without_latency(
        report
    )
    for model in ("lowest_0.5", "random_0.5"):
        assert same_tensors(out / "models" / model / "encoder.safetensors",
                            cut / "models" / model / "encoder.safetensors")  # fmt: skip


def _without_latency(report: dict) -> dict:
    """A pruning report without its measured latencies (the rest is deterministic)."""
    drop = ("latency_ms", "latency_ratio", "latency_s", "pareto")  # the front depends on latency
    strip = lambda row: {k: v for k, v in row.items() if k not in drop}  # noqa: E731
    return {key: [strip(r) for r in report[key]] for key in ("table", "runs")}


def test_finetune_command_compares_strategies(tmp_path, capsys):
    from safetensors.torch import save_file

    from .conftest import planted_layermem, tiny_resnet

    weights = tmp_path / "f.safetensors"
    save_file(tiny_resnet(img_size=32).state_dict(), str(weights))
    scores = planted_layermem([0.1, 0.15, 0.4, 0.45, 0.5, 0.9, 0.95, 0.96, 0.97])
    scores.save(tmp_path / "layers" / "layermem")
    out = tmp_path / "ft"
    args = ["finetune", "--f", str(weights), "--model", "resnet18", "--img-size", "32",
            "--timm", "channels=[8,16,32,64]", "--layer-scores", str(tmp_path / "layers"),
            "--k", "1", "--strategy", "top", "last", "--by", "delta", "--epochs", "1",
            "--seeds", "0", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "results.json").read_text())
    table = [(r["strategy"], r["k"], r["layers"], r["seeds"]) for r in report["table"]]
    assert table == [("linear probe", 0, "", 1), ("top delta", 1, "layer3.0", 1),
                     ("last", 1, "layer4.1", 1)]  # fmt: skip
    assert set(report["layer_values"]) == {"delta"}
    # one seed: each row of the table is its run's accuracy
    assert len(report["runs"]) == 2
    means = {(r["strategy"], r["k"]): r["mean"] for r in report["table"]}
    assert all(means[(r["strategy"], r["k"])] == r["accuracy"] for r in report["runs"])
    for name in ("comparison.md", "comparison.csv", "comparison.png"):
        assert (out / name).is_file()
    assert "top delta k=1" in capsys.readouterr().out
    gap = [*args[:-1], str(tmp_path / "gap")]
    gap[gap.index("--by") + 1] = "gap"  # LayerMem scores offer delta and layermem, not gap
    assert main(gap) == 2 and "'gap' ranks layers by scores.membergap" in capsys.readouterr().err
    # kill -9 once the comparison is done and its files are being written, rerun
    cut = tmp_path / "cut"
    kill_when([*args[:-1], str(cut)], lambda: (cut / MARKER).is_file())
    assert unfinished(cut)
    assert main([*args[:-1], str(cut)]) == 0
    assert (out / "comparison.csv").read_text() == (cut / "comparison.csv").read_text()
    bad = [*args[:-1], str(tmp_path / "bad")]
    bad[bad.index("--k") + 1] = "12"
    assert main(bad) == 2
    assert "k must be an int in [1, 9]" in capsys.readouterr().err


def test_every_option_has_help_and_its_default_once():
    import argparse

    from memprune.cli import build_parser

    def parsers(p, prefix=()):
        yield prefix, p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    yield from parsers(sub, (*prefix, name))

    for prefix, parser in parsers(build_parser()):
        text = parser.format_help().split("\noptions:\n", 1)[1]
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, (prefix, action.option_strings)
            if action.default not in (None, False):
                found = re.search(rf"\n  {re.escape(action.option_strings[0])}[ \n]", "\n" + text)
                block = ("\n" + text)[found.end() :].split("\n  -", 1)[0]
                assert block.count("default") == 1, (prefix, action.option_strings, block)


def test_a_pruned_vit_directory_needs_no_model_flags(tmp_path, capsys):
    from memprune.pruning import prune, save_pruned

    from .conftest import tiny_vit

    pruned, _ = prune(tiny_vit(), None, 0.5, "random", latency_batch=None)
    save_pruned(pruned, tmp_path / "vit")
    out = tmp_path / "probe"
    assert main(["probe", "--checkpoint", str(tmp_path / "vit"), "--out", str(out)]) == 0
    result = json.loads((out / "probe.json").read_text())
    assert result["encoders"][0]["model"] == "vit_tiny_patch16_224"
    assert result["classes"] == [str(c) for c in range(10)]


def test_mean_and_std_flags_set_the_normalization_and_are_recorded(tmp_path):
    from memprune import UnitMemResult

    out = tmp_path / "units"
    args = [
        "score",
        "units",
        "--timm",
        "channels=[8,16,32,64]",
        "--n-points",
        "20",
        "--views",
        "1",
        "--mean",
        "0.5",
        "0.5",
        "0.5",
        "--std",
        "0.25",
        "0.25",
        "0.25",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    meta = UnitMemResult.load(out / "unitmem").meta["normalization"]
    assert meta == {"mean": [0.5] * 3, "std": [0.25] * 3, "source": "given"}
    without_std = [*args[:-6], "--out", str(tmp_path / "bad")]
    assert main(without_std) == 2 and not (tmp_path / "bad").exists()


def test_img_size_resizes_the_built_in_data_and_a_wrong_size_is_named(tmp_path):
    import pytest
    import torch

    import memprune
    from memprune import UnitMemResult
    from memprune.errors import ConfigError

    out = tmp_path / "vit"
    args = ["score", "units", "--model", "vit_tiny_patch16_224", "--img-size", "48", "--timm",
            "depth=1", "--n-points", "6", "--views", "1", "--out", str(out)]  # fmt: skip
    assert main(args) == 0  # the digits are upsampled to the ViT's 48 px
    meta = UnitMemResult.load(out / "unitmem").meta
    assert meta["sites"]["blocks.0.mlp.act"]["shape"][0] == 10  # 3x3 patches + class token
    vit = memprune.load_encoder("vit_tiny_patch16_224", depth=1)  # built for 224 px
    digits = torch.utils.data.Subset(memprune.load_dataset(), range(4))
    with pytest.raises(ConfigError, match=r"takes 224x224 images .* got 32x32: .*--img-size 224"):
        memprune.unit_mem(vit, digits, n_views=1)
    assert memprune.load_dataset("digits", img_size=48)[0][0].shape == (3, 48, 48)


def test_img_size_resizes_the_toy_data_and_keeps_its_augmentation(tmp_path):
    """The toy images ([3, s, 2s]) are resized by repeating pixels, so the augmentation reads
    the same patches back: a redraw keeps the signal patch and changes the noise patch."""
    import pytest
    import torch

    import memprune
    from memprune.errors import ConfigError

    small, big = memprune.load_dataset("toy"), memprune.load_dataset("toy", img_size=32)
    image, label, _ = big[3]
    assert image.shape == (3, 32, 32) and label == small[3][1]
    assert torch.equal(image[:, ::8, ::4], small[3][0])  # 4 x 8 pixels, each repeated
    g = torch.Generator().manual_seed(0)
    view = big.augment(image, g)
    g.manual_seed(0)
    assert torch.equal(view[:, ::8, ::4], small.augment(small[3][0], g))
    with pytest.raises(ConfigError, match="multiple of 8"):
        memprune.load_dataset("toy", img_size=30)
    out = tmp_path / "toy-vit"
    args = ["score", "units", "--data", "toy", "--model", "vit_tiny_patch16_224",
            "--img-size", "32", "--timm", "depth=1", "--n-points", "6", "--views", "1",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
