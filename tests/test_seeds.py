"""Recipes over several seeds: each seed's loop, and the intervals and verdicts over seeds."""

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from memprune.errors import ConfigError
from memprune.recipes import RecipeError, load_recipe, run_recipe, validate
from memprune.recipes._findings import FINETUNE_CLAIM, PRUNE_CLAIM
from memprune.recipes._seeds import (
    both_ways,
    combine_seeds,
    comparisons,
    headline_values,
    interval,
    over_seeds,
    paired_claims,
    seed_recipe,
)

ROOT = Path(__file__).resolve().parents[1]

#: The demo reduced to a one-epoch pair, SSLMem, CKA and the kNN probe (seconds per seed).
SMALL = [
    "encoder.pretrain.epochs=1", "encoder.pretrain.batch_size=64", "encoder.supervised.epochs=1",
    "scores.unitmem.enabled=false", "scores.classmem.enabled=false", "scores.sslmem.pairs=1",
    "scores.layermem.enabled=false", "actions.prune.enabled=false",
    "actions.finetune.enabled=false", "evaluation.linear=false", "data.shared=0.2",
    "data.canaries=null",
]  # fmt: skip


def test_seed_recipe_draws_everything_anew_and_seed_0_is_the_single_run():
    base = load_recipe(ROOT / "recipes" / "digits-resnet.yaml", ["seeds=[0, 1, 2]"])
    single = load_recipe(ROOT / "recipes" / "digits-resnet.yaml", ["seed=0"])
    zero = seed_recipe(base, 0).to_dict()
    assert zero == single.to_dict()
    one = seed_recipe(base, 1)
    assert one.seed == 1 and one.seeds is None
    assert one.data.split_seed == base.data.split_seed + 1
    assert one.actions.finetune.seeds == [1000, 1001, 1002]
    assert one.actions.prune.seeds == [1000, 1001, 1002]
    assert base.seeds == [0, 1, 2] and base.actions.prune.seeds == [0, 1, 2]  # not changed
    for bad, message in (([], "must list distinct"), ([1, 1], "must list distinct"),
                         ([-1], ">= 0")):  # fmt: skip
        with pytest.raises(RecipeError, match=message):
            validate({"seeds": bad})


def test_interval_is_students_t():
    mean, half = interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302652729911275 / math.sqrt(3))
    assert interval([0.5]) == (0.5, None)


def test_comparisons_are_paired_within_seeds():
    # b is a + 0.01 in every seed while a itself varies a lot: paired, the gap is certain
    per_seed = {
        s: {"pruned lowest 50%": a, "pruned random 50%": a + 0.01,
            "fine-tuned top delta k=1": 0.9, "fine-tuned last k=1": 0.9 + d}
        for s, (a, d) in enumerate([(0.2, 0.05), (0.6, -0.05), (0.9, 0.0)])
    }  # fmt: skip
    rows, comps = over_seeds(per_seed)
    assert [r["label"] for r in rows][:2] == ["pruned lowest 50%", "pruned random 50%"]
    by = {(c["a"], c["b"]): c for c in comps}
    low = by[("pruned lowest 50%", "pruned random 50%")]
    assert low["mean"] == pytest.approx(-0.01) and low["verdict"] == "exceeds the spread"
    top = by[("fine-tuned top delta k=1", "fine-tuned last k=1")]
    assert top["mean"] == pytest.approx(0.0, abs=1e-12) and top["verdict"] == "within the spread"
    one = over_seeds({0: per_seed[0]})[1]
    assert {c["verdict"] for c in one} == {"one seed: no spread"}


def test_comparisons_only_between_numbers_the_run_has():
    labels = ["pruned lowest 30%", "pruned random 30%", "fine-tuned top delta k=2",
              "fine-tuned last k=2", "fine-tuned all"]  # fmt: skip
    assert comparisons(labels) == [
        ("pruned lowest 30%", "pruned random 30%"),
        ("fine-tuned top delta k=2", "fine-tuned last k=2"),
        ("fine-tuned top delta k=2", "fine-tuned all"),
    ]


def test_claims_hold_over_seeds_only_when_every_seed_agrees():
    assert combine_seeds(["holds"] * 3) == "holds"
    assert combine_seeds(["holds", "holds", "inconclusive"]) == "inconclusive"
    assert combine_seeds(["does not hold"] * 2) == "does not hold"
    assert combine_seeds(["holds", "does not hold"]) == "inconclusive"
    assert combine_seeds(["not evaluated"] * 3) == "not evaluated"


def test_action_claims_over_seeds_rest_on_the_paired_differences():
    # highest-UnitMem pruning costs 2 points more than lowest and random in every seed, under a
    # common variation of 30 points; recovered rows and magnitude are not part of the claim
    per_seed = {
        s: {"pruned lowest 50%": a, "pruned random 50%": a - 0.001 * s,
            "pruned highest 50%": a - 0.02, "pruned magnitude 50%": a + 0.5,
            "pruned lowest 50%, distill": a - 0.5, "pruned random 50%, distill": a,
            "pruned highest 50%, distill": a + 0.5,
            "fine-tuned top delta k=1": 0.9 + d, "fine-tuned last k=1": 0.9}
        for s, (a, d) in enumerate([(0.3, 0.05), (0.6, -0.05), (0.45, 0.01)])
    }  # fmt: skip
    claims = paired_claims(over_seeds(per_seed)[1])
    verdict, figure = claims[PRUNE_CLAIM]
    assert verdict == "holds" and "distill" not in figure and "magnitude" not in figure
    assert figure.count("over 3 seeds") == 2
    assert claims[FINETUNE_CLAIM][0] == "inconclusive"  # +0.3 points, spread 5 points
    flipped = {s: {**v, "pruned highest 50%": v["pruned lowest 50%"] + 0.02}
               for s, v in per_seed.items()}  # fmt: skip
    assert paired_claims(over_seeds(flipped)[1])[PRUNE_CLAIM][0] == "does not hold"
    assert paired_claims(over_seeds({0: per_seed[0]})[1]) == {}  # one seed: judged per seed
    # holding in every seed's run decides unless the paired differences contradict it
    assert both_ways("holds", "inconclusive") == "holds"
    assert both_ways("inconclusive", "does not hold") == "does not hold"
    assert both_ways("holds", "does not hold") == "inconclusive"
    assert both_ways("inconclusive", "inconclusive") == "inconclusive"
    assert both_ways("not evaluated", "inconclusive") == "not evaluated"


def test_two_seed_run_reports_intervals_and_seed_0_equals_the_single_run(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "digits-resnet.yaml", [*SMALL, "seeds=[0, 1]"])
    run = run_recipe(recipe, tmp_path / "two", log=lambda m: None)
    single = run_recipe(load_recipe(ROOT / "recipes" / "digits-resnet.yaml", SMALL),
                        tmp_path / "one", log=lambda m: None)  # fmt: skip
    for part in ("candidate", "extra"):
        a = load_file(run / f"seed_0/sslmem/sslmem_{part}.safetensors")
        b = load_file(single / f"sslmem/sslmem_{part}.safetensors")
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    s1 = load_file(run / "seed_1/sslmem/sslmem_candidate.safetensors")
    assert not s1["score"].equal(load_file(single / "sslmem/sslmem_candidate.safetensors")["score"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["seeds"] == [0, 1]
    sslmem = next(r for r in metrics["headlines"] if r["label"] == "SSLMem, candidates")
    per = [metrics["per_seed"][s]["sslmem"]["candidate"]["mean"] for s in ("0", "1")]
    assert sslmem["values"] == per and sslmem["mean"] == pytest.approx(sum(per) / 2)
    report = (run / "report.md").read_text()
    lines = report.splitlines()
    assert any(line.startswith("| SSLMem, candidates ") and "| SSLMem, extras " in line
               for line in lines)  # fmt: skip
    for text in ("## Headline numbers over 2 seeds", "## Comparisons, paired over seeds",
                 "## The papers' findings, over seeds",
                 "[seed_1](seed_1/report.md)", "CKA f vs supervised"):  # fmt: skip
        assert text in report, text
    assert (run / "seed_1" / "report.md").is_file()
    assert headline_values(metrics["per_seed"]["1"])["SSLMem, extras"] == pytest.approx(
        metrics["per_seed"]["1"]["sslmem"]["extra"]["mean"])  # fmt: skip
    # resuming finds every seed done; a changed recipe is refused
    log = []
    run_recipe(recipe, run, resume=True, log=log.append)
    assert sum("done earlier" in m for m in log) == 2 * 5  # 5 stages in each of 2 seeds
    with pytest.raises(ConfigError, match="another recipe"):
        run_recipe(load_recipe(ROOT / "recipes" / "digits-resnet.yaml", [*SMALL, "seeds=[0]"]),
                   run, resume=True, log=lambda m: None)  # fmt: skip
