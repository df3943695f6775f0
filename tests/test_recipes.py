import json
import shutil
from pathlib import Path

import pytest

from memprune.cli import main
from memprune.errors import ConfigError
from memprune.recipes import RecipeError, load_recipe, render_report, run_recipe, validate
from memprune.recipes import _run as runner

ROOT = Path(__file__).resolve().parents[1]

#: The checkpoint recipe, shortened for CI (its checkpoint and splits: a shortened demo run).
CKPT_TINY = [
    "seeds=null", "scores.unitmem.views=2", "scores.unitmem.n_points=200",
    "scores.classmem.views=1", "scores.membergap.pairs=2", "scores.membergap.n_boot=100",
    "actions.prune.ratios=[0.5]",
    "actions.prune.strategies=[lowest]", "actions.prune.latency_batch=null",
    "actions.finetune.epochs=1", "actions.finetune.seeds=[0]", "actions.finetune.k=[1]",
    "actions.finetune.strategies=[top,last]", "evaluation.knn=false", "evaluation.cs=[1.0]",
]  # fmt: skip

#: The demo recipe, shortened for CI.
TINY = [
    "encoder.pretrain.epochs=2", "encoder.pretrain.batch_size=64", "encoder.supervised.epochs=1",
    "scores.unitmem.views=2", "scores.unitmem.n_points=300", "scores.classmem.views=1",
    "scores.sslmem.pairs=2", "scores.layermem.pairs=2", "actions.prune.ratios=[0.5]",
    "actions.prune.strategies=[lowest,random]", "actions.prune.latency_batch=null",
    "actions.prune.seeds=[0]", "actions.prune.recover.steps=2", "actions.finetune.epochs=1",
    "actions.finetune.seeds=[0]", "actions.finetune.k=[1]",
    "actions.finetune.strategies=[top,last]", "evaluation.knn=false", "evaluation.cs=[1.0]",
    "data.canaries={n: 20, kind: noise, n_typical: 8, views: 1, pairs: 1, seeds: [0]}",
]  # fmt: skip


def test_every_shipped_recipe_validates():
    names = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
    assert names == ["cifar10-resnet18.yaml", "digits-canaries.yaml", "digits-checkpoint.yaml",
                     "digits-pruning.yaml", "digits-resnet.yaml", "digits-shifts.yaml",
                     "digits-vit.yaml", "stl10-vit.yaml"]  # fmt: skip
    from memprune.recipes._schema import RANKED_BY
    from memprune.tuning import BY

    assert set(RANKED_BY) == set(BY)  # every layer ranking knows the stage it needs
    for name in names:
        recipe = load_recipe(ROOT / "recipes" / name)
        assert recipe.name == name.removesuffix(".yaml")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"scores": {"unitmem": {"veiws": 3}}}, r"scores\.unitmem\.veiws: unknown key; allowed"),
        ({"datta": {}}, r"datta: unknown key; allowed here: name, seed"),
        ({"seed": "zero"}, r"seed: expected int, got 'zero'"),
        ({"actions": {"prune": {"ratios": [0.2, 1.0]}}}, r"actions\.prune\.ratios\[1\]: 1\.0"),
        ({"actions": {"prune": {"strategies": ["lowest", "smallest"]}}},
         r"strategies\[1\]: 'smallest' is not allowed; use one of 'lowest'"),
        ({"scores": {"unitmem": {"views": 0}}}, r"scores\.unitmem\.views: 0 is below the minimum"),
        ({"actions": {"prune": {"recover": {"method": "finetune"}}}},
         r"actions\.prune\.recover\.method: 'finetune' is not allowed; use one of 'distill'"),
        ({"encoder": {"pretrain": None}}, r"encoder: give encoder\.pretrain .* or"),
        ({"encoder": {"img_size": True}}, r"encoder\.img_size: expected int"),
        ({"evaluation": {"linear": "yes"}}, r"evaluation\.linear: expected true or false"),
        ({"evaluation": {"cs": [1.0, 0]}}, r"evaluation\.cs\[1\]: 0 must be above 0"),
        ({"encoder": {"pretrain": None, "checkpoint": "w.safetensors"}},
         r"scores\.sslmem: needs the reference encoder g"),
        ({"actions": {"finetune": {"by": ["delta", "gap"]}}},
         r"actions\.finetune\.by\[1\]: 'gap' ranks layers by scores\.membergap; enable it"),
        ({"encoder": {"pretrain": None, "checkpoint": "w"}, "data": {"members": {"part": "f"}},
          "scores": {"sslmem": {"enabled": False}, "layermem": {"enabled": False}}},
         r"data\.members\.part: names a set of a splits\.json; give data\.members\.indices"),
        ({"encoder": {"pretrain": None, "checkpoint": "w"},
          "scores": {"sslmem": {"enabled": False}, "layermem": {"enabled": False},
                     "membergap": {"enabled": True}}},
         r"data\.members: scores\.membergap needs the points f was trained on"),
        ({"data": {"members": {"split": "valid"}}}, r"data\.members\.split: 'valid' is not"),
    ],
)  # fmt: skip
def test_bad_recipes_name_the_key(data, message):
    with pytest.raises(RecipeError, match=message):
        validate(data)


def test_set_overrides_and_cli_errors(tmp_path, capsys):
    recipe = load_recipe(ROOT / "recipes" / "digits-resnet.yaml", ["actions.prune.ratios=[0.3]"])
    assert recipe.actions.prune.ratios == [0.3] and recipe.encoder.timm["channels"][0] == 8
    with pytest.raises(RecipeError, match="write KEY=VALUE"):
        load_recipe(None, ["actions.prune.ratios"])
    out = tmp_path / "never"
    assert main(["run", str(ROOT / "recipes/digits-resnet.yaml"), "--set",
                 "actions.prune.scope=everywhere", "--out", str(out)]) == 2  # fmt: skip
    assert "actions.prune.scope: 'everywhere' is not allowed" in capsys.readouterr().err
    assert not out.exists()  # rejected before any work


def _comparable(metrics: dict) -> dict:
    """Metrics without wall-clock times (they differ between any two runs)."""
    text = json.dumps(metrics, sort_keys=True)
    data = json.loads(text)

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "seconds"}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return strip(data)


@pytest.mark.slow
def test_demo_recipe_end_to_end_and_resume_after_a_crash(tmp_path, monkeypatch):
    recipe = load_recipe(ROOT / "recipes" / "digits-resnet.yaml", TINY)
    whole = run_recipe(recipe, tmp_path / "whole", log=lambda m: None)
    report = (whole / "report.md").read_text()
    named = ["## Headline findings", "## Probes", "## UnitMem per site", "## LayerMem per",
             "## Pruning", "## Fine-tuning", "layermem/layermem.png", "SSLMem: candidates",
             "unitmem/unitmem_per_site.png", "classmem/classmem_vs_unitmem.png",
             "prune/tradeoff.png", "finetune/comparison.png",
             "## The papers' findings, checked on this run", "## What each pruned encoder forgets",
             "## Privacy-utility front", "pruning forgets atypical examples first"]  # fmt: skip
    for title in named:
        assert title in report, title
    claims = report.split("## The papers' findings")[1].split("\n## ")[0]
    assert claims.count("- **") == 11 and "**not evaluated**: in ViTs" in claims  # a ResNet
    assert "**not evaluated**: pruning forgets" not in claims  # judged on the run's flips
    verdicts = json.loads((whole / "prune" / "done.json").read_text())["verdicts"]
    assert verdicts and all("test set's noise" in v for v in verdicts if " wins " in v)
    privacy = (whole / "prune" / "privacy.csv").read_text().splitlines()
    assert privacy[0].startswith("strategy,ratio") and "canary_auc" in privacy[0]
    assert len(privacy) == 1 + 1 + 2 * 2  # unpruned; lowest and random, with and without distill
    for name in ("recipe.yaml", "environment.json", "metrics.json", "metrics.csv"):
        assert (whole / name).is_file()
    env = json.loads((whole / "environment.json").read_text())
    assert env["versions"]["torch"] and "revision" in env["git"]
    # every stage's done.json reads back as its typed result, and writes back the same
    from memprune.recipes import STAGES, read_metrics

    for name, metrics in read_metrics(whole).items():
        result = STAGES[name].load(metrics)
        assert isinstance(result, STAGES[name].result)
        assert result.to_dict() == {k: v for k, v in metrics.items() if k != "seconds"}, name

    # a run killed in the middle of the prune stage, then resumed. The stages before prune are
    # the finished run's (copied: recomputing them would only repeat the first run), the run
    # then crashes inside prune, leaving a half-written file behind
    crashed = tmp_path / "crashed"
    shutil.copytree(whole, crashed)
    for name in ("prune", "finetune", "metrics.json", "metrics.csv", "report.md"):
        path = crashed / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    import dataclasses

    from memprune.recipes import STAGES

    real = STAGES["prune"]

    def killed(ctx, out):
        (out / "models").mkdir()
        (out / "models" / "half-written").write_text("partial")
        raise KeyboardInterrupt

    monkeypatch.setitem(STAGES, "prune", dataclasses.replace(real, run=killed))
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, crashed, resume=True, log=lambda m: None)
    assert not (crashed / "prune" / "done.json").exists()
    with pytest.raises(ConfigError, match="--resume"):
        run_recipe(recipe, crashed, log=lambda m: None)  # not overwritten silently
    assert main(["report", str(crashed)]) == 0  # a report of an interrupted run says so
    assert (
        "**Incomplete run**: the stages prune, finetune did not finish"
        in (crashed / "report.md").read_text()
    )
    monkeypatch.setitem(STAGES, "prune", real)
    log = []
    run_recipe(recipe, crashed, resume=True, log=log.append)
    assert "[1/11] pretrain: done earlier, skipped" in log
    assert not (crashed / "prune" / "models" / "half-written").exists()
    a = json.loads((whole / "metrics.json").read_text())
    b = json.loads((crashed / "metrics.json").read_text())
    assert _comparable(a) == _comparable(b)

    # a different recipe cannot resume this run; --force starts over; report re-renders
    other = load_recipe(ROOT / "recipes" / "digits-resnet.yaml", [*TINY, "seed=1"])
    with pytest.raises(ConfigError, match="another recipe"):
        run_recipe(other, crashed, resume=True, log=lambda m: None)
    (whole / "report.md").unlink()
    assert main(["report", str(whole)]) == 0
    assert (whole / "report.md").read_text() == report
    render_report(whole)

    # the loop from one checkpoint, no reference encoder: the shortened demo run's f
    pretrain = whole / "pretrain"
    paths = [f"encoder.checkpoint={pretrain / 'f'}", f"data.members.indices={pretrain}/splits.json",
             f"data.nonmembers.indices={pretrain}/splits.json"]  # fmt: skip
    ckpt = load_recipe(ROOT / "recipes" / "digits-checkpoint.yaml", [*CKPT_TINY, *paths])
    run = run_recipe(ckpt, tmp_path / "ckpt", log=lambda m: None)
    report = (run / "report.md").read_text()
    for title in ["## Member gap per layer", "Member gap (f alone", "membergap/membergap.png",
                  "## Layer rankings the fine-tuning rules used", "top gap − last"]:  # fmt: skip
        assert title in report, title
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"unitmem", "classmem", "membergap", "evaluate", "prune", "finetune"}
    rules = [r["strategy"] for r in metrics["finetune"]["rows"]]
    assert rules == ["linear probe", "top gap", "top unitmem", "top rgn", "last"]
    gap = json.loads((run / "membergap" / "membergap.json").read_text())
    assert gap["meta"]["n_members"] == gap["meta"]["n_nonmembers"] == 287  # candidates, extras
    missing = load_recipe(ROOT / "recipes" / "digits-checkpoint.yaml",
                          [*paths, f"encoder.checkpoint={tmp_path / 'absent'}"])  # fmt: skip
    with pytest.raises(ConfigError, match="run `memprune run recipes/digits-resnet.yaml`"):
        run_recipe(missing, tmp_path / "never", log=lambda m: None)
    assert not (tmp_path / "never").exists()


def test_a_run_saved_before_a_new_recipe_key_still_resumes(tmp_path):
    """A recipe saved before ``precision`` / ``data.transform`` existed resumes when what runs
    is the same (on the CPU ``auto`` is fp32; digits ignore the transform), and not otherwise."""
    import yaml

    recipe = load_recipe(ROOT / "recipes" / "digits-resnet.yaml")
    run = tmp_path / "run"
    run.mkdir()
    old = recipe.to_dict()
    del old["precision"], old["data"]["transform"]
    old["encoder"]["pretrain"]["mixed_precision"] = "no"  # the old default, written out
    (run / "recipe.yaml").write_text(yaml.safe_dump(old))
    assert runner._check_run(run, recipe, resume=True, force=False) is False
    changed = load_recipe(ROOT / "recipes" / "digits-resnet.yaml", ["precision=bf16"])
    with pytest.raises(ConfigError, match="sections precision differ"):
        runner._check_run(run, changed, resume=True, force=False)
    # a folder data set resized before: the encoder's eval transform would change the images
    old["data"]["name"] = str(tmp_path)
    (run / "recipe.yaml").write_text(yaml.safe_dump(old))
    folder = load_recipe(ROOT / "recipes" / "digits-resnet.yaml", [f"data.name={tmp_path}"])
    with pytest.raises(ConfigError, match="sections data differ"):
        runner._check_run(run, folder, resume=True, force=False)
    resized = load_recipe(ROOT / "recipes" / "digits-resnet.yaml",
                          [f"data.name={tmp_path}", "data.transform=resize"])  # fmt: skip
    assert runner._check_run(run, resized, resume=True, force=False) is False
