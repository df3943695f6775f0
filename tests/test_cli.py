from memprune.cli import main


def test_sites_command_prints_table(capsys):
    assert main(["sites", "--views", "2", "--batch-size", "3"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.act1  units   conv   64     64x8x8" in out
    assert "6 points" not in out and "3 points x 2 views" in out
    assert "17 unit sites (3904 units), 9 layer sites" in out


def test_cli_errors_are_one_line(capsys):
    assert main(["sites", "--model", "resnt18"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "closest timm names: resnet18" in err


def test_score_units_and_classes_write_results(tmp_path, capsys):
    from memprune import UnitMemResult

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
    assert main(["score", "classes", "--max-points", "60", "--out", str(tmp_path / "c")]) == 0
    assert UnitMemResult.load(tmp_path / "c" / "classmem").kind == "classmem"
