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
