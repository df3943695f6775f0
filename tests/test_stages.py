"""A stage is one object: registering one module's stage is all it takes for the runner, the
resume logic, report.md and the report over seeds to use it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from memprune.errors import ConfigError
from memprune.recipes import (
    STAGES,
    Stage,
    StageResult,
    enabled_stages,
    read_metrics,
    register,
    run_recipe,
    unregister,
    validate,
)
from memprune.recipes._seeds import headline_values

OFF = {
    "encoder": {"pretrain": None, "random_init": True, "timm": {"channels": [8, 16, 32, 64]},
                "supervised": {"enabled": False}},
    "scores": {name: {"enabled": False} for name in
               ("unitmem", "classmem", "sslmem", "layermem", "membergap", "cka")},
    "actions": {"prune": {"enabled": False}, "finetune": {"enabled": False}},
    "evaluation": {"linear": False, "knn": False},
}  # fmt: skip


@dataclass
class Counted(StageResult):
    points: int
    classes: list[int]


@pytest.fixture
def counting():
    calls = []

    def run(ctx, out) -> Counted:
        calls.append(out)
        labels = sorted({int(ctx.train[i][1]) for i in range(len(ctx.train))})
        (out / "count.md").write_text(f"| points |\n|---|\n| {len(ctx.train)} |\n")
        return Counted(points=len(ctx.train), classes=labels)

    stage = Stage(
        "count", Counted, run, enabled=lambda recipe: True,
        needs=lambda recipe: [("unitmem", None)] if recipe.name == "needy" else [],
        headlines=lambda r: [f"Counted {r.points} points of {len(r.classes)} classes."],
        values=lambda r: {"points counted": r.points}, tables=(("count.md", "Counting"),),
    )  # fmt: skip
    register(stage, after="unitmem")
    yield calls
    unregister("count")


def test_a_registered_stage_runs_resumes_and_reports(tmp_path, counting):
    recipe = validate(OFF)
    assert enabled_stages(recipe) == ["count"]
    assert list(STAGES).index("count") == list(STAGES).index("unitmem") + 1
    run = run_recipe(recipe, tmp_path / "run", log=lambda m: None)
    metrics = read_metrics(run)
    assert metrics["count"]["points"] == 1437 and metrics["count"]["classes"] == list(range(10))
    assert STAGES["count"].load(metrics["count"]) == Counted(1437, list(range(10)))
    report = (run / "report.md").read_text()
    assert "- Counted 1437 points of 10 classes." in report
    assert "## Counting\n\n| points |" in report
    assert headline_values(metrics) == {"points counted": 1437}
    # resumed: the finished stage is not run again
    run_recipe(recipe, run, resume=True, log=lambda m: None)
    assert len(counting) == 1
    # what a stage needs is checked before anything runs
    with pytest.raises(ConfigError, match="the count stage needs the results of the unitmem"):
        validate({**OFF, "name": "needy"})


def test_a_stage_must_return_its_result_type(tmp_path):
    register(Stage("wrong", Counted, lambda ctx, out: {"points": 1}, enabled=lambda r: True))
    try:
        with pytest.raises(TypeError, match="returned dict, not Counted"):
            run_recipe(validate(OFF), tmp_path / "run", log=lambda m: None)
        with pytest.raises(ConfigError, match="already registered"):
            register(Stage("wrong", Counted, lambda ctx, out: None, enabled=lambda r: True))
    finally:
        unregister("wrong")


def test_a_done_json_from_before_a_key_was_renamed_still_reads():
    old = {"mean": 0.4, "frac>0.5": 0.3, "first_site": "act1", "first_mean": 0.1,
           "last_site": "layer4.1.act2", "last_mean": 0.5, "top_site": "layer3.0.act1",
           "top_mean": 0.6, "units": 100, "dead": 2, "seconds": 1.0}  # fmt: skip
    summary = STAGES["unitmem"].load(old)
    assert summary.frac_above_half == 0.3 and summary.units == 100
    assert "30.0% above 0.5" in STAGES["unitmem"].headlines(summary)[0]


def test_a_done_json_without_the_fields_a_result_now_records_is_refused_by_name():
    """A stage result grown by a field must not be read back from an older ``done.json`` with
    the field missing (a TypeError deep in the report, or worse a blank): the error says which
    fields and what to delete."""
    stage = Stage("count", Counted, lambda ctx, out: None, enabled=lambda recipe: True)
    assert stage.load({"points": 3, "classes": [0, 1], "seconds": 1.0}) == Counted(3, [0, 1])
    with pytest.raises(ConfigError, match=r"'count' stage's done.json lacks classes.*delete"):
        stage.load({"points": 3, "seconds": 1.0})
