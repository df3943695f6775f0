"""One path from a command to a result: every computing CLI verb and the one-stage recipe a
user would write for it give the same files with the same contents (timings aside).

The recipes here are written out by hand, key by key as a user writes YAML, so that a CLI
default or flag that drifts from the recipe schema makes a file differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from memprune.cli import main
from memprune.recipes import run_recipe, validate
from memprune.report._rundir import MARKER

TINY = ["--timm", "channels=[8,16,32,64]"]
ENCODER = {"model": "resnet18", "img_size": 32, "timm": {"channels": [8, 16, 32, 64]}}
#: Keys that hold measured times, not results.
TIMED = {"seconds", "timings", "latency_ms", "latency_ratio", "latency_s", "pareto"}


def _only(**sections) -> dict:
    """A recipe that runs the named stages and no other (every stage of the schema's
    defaults switched off by hand)."""
    off = {
        "encoder": {**ENCODER, "pretrain": None, "supervised": {"enabled": False}},
        "scores": {name: {"enabled": False} for name in
                   ("unitmem", "classmem", "sslmem", "layermem", "membergap", "cka")},
        "actions": {"prune": {"enabled": False}, "finetune": {"enabled": False}},
        "evaluation": {"linear": False, "knn": False},
        "data": {},
    }  # fmt: skip
    for section, values in sections.items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(off[section].get(key), dict):
                off[section][key] = {**off[section][key], **value}
            else:
                off[section][key] = value
    return off


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in TIMED}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _files(root: Path, skip: set[str]) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file()
            and p.relative_to(root).parts[0] not in skip}  # fmt: skip


def assert_same(cli: Path, stage_dir: Path, aux: tuple[str, ...] = ()) -> None:
    """The CLI's --out holds exactly the stage directory's files, with the same contents."""
    ours = _files(cli, {MARKER, "recipe.yaml", *aux})
    theirs = _files(stage_dir, set())
    assert ours == theirs, sorted(map(str, ours ^ theirs))
    for rel in sorted(ours):
        a, b = cli / rel, stage_dir / rel
        if rel.suffix == ".json":
            assert _untimed(json.loads(a.read_text())) == _untimed(json.loads(b.read_text())), rel
        elif rel.suffix == ".safetensors":
            ta, tb = load_file(a), load_file(b)
            assert ta.keys() == tb.keys() and all((ta[k] == tb[k]).all() for k in ta), rel
        elif rel.suffix in (".md", ".csv", ".txt"):
            assert a.read_text() == b.read_text(), rel
        # plots (.png) and exported programs: present in both is what is compared


def _recipe_run(tmp: Path, name: str, data: dict) -> Path:
    return run_recipe(validate({"name": name, **data}), tmp / f"run_{name}", log=lambda m: None)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    """A pair trained by the CLI and by the recipe: the same files."""
    tmp = tmp_path_factory.mktemp("pair")
    cli = tmp / "cli"
    assert main(["pretrain", *TINY, "--shared", "32", "--candidate", "16", "--extra", "16",
                 "--epochs", "1", "--batch-size", "16", "--out", str(cli)]) == 0  # fmt: skip
    recipe = _only(data={"shared": 32, "candidate": 16, "extra": 16},
                   encoder={"pretrain": {"epochs": 1, "batch_size": 16}})  # fmt: skip
    run = _recipe_run(tmp, "pretrain", recipe)
    assert_same(cli, run / "pretrain")
    return cli


def test_score_units_and_classes(tmp_path):
    for verb, stage, views in (("units", "unitmem", 2), ("classes", "classmem", 1)):
        cli = tmp_path / verb
        argv = ["score", verb, *TINY, "--n-points", "60", "--views", str(views), "--sites",
                "layer4.*", "--seed", "3", "--out", str(cli)]  # fmt: skip
        assert main(argv) == 0
        scores = {"unitmem": {"n_points": 60, "sites": ["layer4.*"]}}
        scores[stage] = {**scores.get(stage, {}), "enabled": True, "views": views}
        recipe = _only(encoder={"random_init": True}, scores=scores)
        run = _recipe_run(tmp_path, stage, {**recipe, "seed": 3})
        assert_same(cli, run / stage)


def test_score_layers_gap_and_cka(tmp_path, pair):
    f, g, splits = str(pair / "f"), str(pair / "g"), str(pair / "splits.json")
    cli = tmp_path / "layers"
    assert main(["score", "layers", "--f", f, "--g", g, "--pairs", "2", "--top-k", "5",
                 "--out", str(cli)]) == 0  # fmt: skip
    run = _recipe_run(tmp_path, "layermem", _only(
        encoder={"checkpoint": f, "reference": g, "model": None, "img_size": None},
        scores={"layermem": {"enabled": True, "pairs": 2, "top_k": 5,
                             "points": {"indices": splits, "part": "candidate"}}}))  # fmt: skip
    assert_same(cli, run / "layermem")

    cli = tmp_path / "gap"
    assert main(["score", "layers", "--encoder", f, "--members", f"train:{splits}:candidate",
                 "--nonmembers", "test", "--pairs", "2", "--out", str(cli)]) == 0  # fmt: skip
    run = _recipe_run(tmp_path, "membergap", _only(
        encoder={"checkpoint": f, "model": None, "img_size": None},
        data={"members": {"indices": splits, "part": "candidate"},
              "nonmembers": {"split": "test"}},
        scores={"membergap": {"enabled": True, "pairs": 2}}))  # fmt: skip
    assert_same(cli, run / "membergap")

    cli = tmp_path / "cka"
    assert main(["score", "cka", "--a", f, "--b", g, "--minibatch", "60", "--out",
                 str(cli)]) == 0  # fmt: skip
    run = _recipe_run(tmp_path, "cka", _only(
        encoder={"checkpoint": f, "reference": g, "model": None, "img_size": None},
        scores={"cka": {"enabled": True, "against": "g", "minibatch": 60}}))  # fmt: skip
    assert_same(cli, run / "cka")


def test_probe_prune_and_finetune(tmp_path, pair):
    f, g = str(pair / "f"), str(pair / "g")
    cli = tmp_path / "probe"
    assert main(["probe", "--checkpoint", f, g, "--cs", "1.0", "--out", str(cli)]) == 0
    run = _recipe_run(tmp_path, "evaluate", _only(
        encoder={"checkpoint": f, "model": None, "img_size": None},
        evaluation={"linear": True, "knn": True, "encoders": [f, g], "cs": [1.0]}))  # fmt: skip
    assert_same(cli, run / "evaluate")

    cli = tmp_path / "prune"
    assert main(["prune", "--checkpoint", f, "--ratio", "0.5", "--strategy", "lowest", "random",
                 "--views", "2", "--n-points", "60", "--latency-batch", "0", "--out",
                 str(cli)]) == 0  # fmt: skip
    run = _recipe_run(tmp_path, "prune", _only(
        encoder={"checkpoint": f, "model": None, "img_size": None},
        scores={"unitmem": {"enabled": True, "views": 2, "n_points": 60}},
        actions={"prune": {"enabled": True, "ratios": [0.5], "strategies": ["lowest", "random"],
                           "latency_batch": 0}}))  # fmt: skip
    assert_same(cli, run / "prune", aux=("unitmem",))
    assert_same(cli / "unitmem", run / "unitmem")

    cli = tmp_path / "finetune"
    assert (
        main(
            [
                "finetune",
                "--f",
                f,
                "--g",
                g,
                "--pairs",
                "2",
                "--k",
                "1",
                "--strategy",
                "top",
                "last",
                "--epochs",
                "1",
                "--seeds",
                "0",
                "--out",
                str(cli),
            ]
        )
        == 0
    )
    run = _recipe_run(tmp_path, "finetune", _only(
        encoder={"checkpoint": f, "reference": g, "model": None, "img_size": None},
        scores={"layermem": {"enabled": True, "pairs": 2,
                             "points": {"indices": str(pair / "splits.json"),
                                        "part": "candidate"}}},
        actions={"finetune": {"enabled": True, "k": [1], "strategies": ["top", "last"],
                              "epochs": 1, "seeds": [0]}}))  # fmt: skip
    assert_same(cli, run / "finetune", aux=("layermem",))
    assert_same(cli / "layermem", run / "layermem")


def test_shifts(tmp_path, pair):
    f = str(pair / "f")
    cli = tmp_path / "shifts"
    assert main(["shifts", "--f", f, "--shifts", "relabel", "--k", "1", "--strategy", "last",
                 "--by", "rgn", "--seeds", "0", "1", "--epochs", "1", "--n-points", "64",
                 "--batch-size", "16", "--cs", "1.0", "--out", str(cli)]) == 0  # fmt: skip
    run = _recipe_run(tmp_path, "shifts", _only(
        encoder={"checkpoint": f, "model": None, "img_size": None},
        data={"downstream": None}, evaluation={"cs": [1.0]},
        actions={"shifts": {"enabled": True, "shifts": ["relabel"], "k": [1],
                            "strategies": ["last"], "by": ["rgn"], "seeds": [0, 1],
                            "epochs": 1, "n_points": 64, "batch_size": 16}}))  # fmt: skip
    assert_same(cli, run / "shifts")
    results = json.loads((cli / "results.json").read_text())
    assert len(results["oracle"]) == 9  # every layer of the tiny ResNet, once
    oracle = max(r["mean"] for r in results["oracle"])
    rows = {r["rule"]: r for r in results["rows"]}
    assert set(rows) == {"oracle k=1", "last", "linear probe"}
    for rule in ("last", "linear probe"):
        assert rows[rule]["regret"] == pytest.approx(oracle - rows[rule]["mean"], abs=1e-9)
    report = (run / "report.md").read_text()
    assert "Recommendation: your shift is output-level" in report
    assert "Regret of every rule against the oracle" in report


def test_a_verb_leaves_nothing_behind_for_the_next():
    """Two verbs in one process: the first one's flags do not leak into the second's recipe."""
    import argparse

    from memprune.cli import _recipe, build_parser
    from memprune.recipes import STAGES_OFF

    before = json.dumps(STAGES_OFF, sort_keys=True)
    parser = build_parser()
    # ClassMem takes its points and sites from the unitmem section, which it does not enable
    first = parser.parse_args(["score", "classes", "--sites", "layer4.*", "--out", "x"])
    second = parser.parse_args(["score", "units", "--out", "x"])
    assert isinstance(first, argparse.Namespace)
    _recipe(first, {"scores": {"classmem": {"enabled": True}}, "encoder": {"random_init": True}})
    made = _recipe(second, {"scores": {"unitmem": {"enabled": True}},
                            "encoder": {"random_init": True}})  # fmt: skip
    assert made.scores.unitmem.sites is None
    assert json.dumps(STAGES_OFF, sort_keys=True) == before
