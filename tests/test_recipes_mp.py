"""`memprune run` on two processes against one (its own file, so that a parallel test run can
give it a worker of its own beside the other end-to-end recipe test)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from memprune.recipes import load_recipe, run_recipe

from .conftest import ROOT
from .test_recipes import TINY, _comparable


def _flat(node, prefix="", out=None) -> dict:
    """``{"prune.rows[0].accuracy": value, ...}`` of nested metrics."""
    out = {} if out is None else out
    if isinstance(node, dict):
        for k, v in node.items():
            _flat(v, f"{prefix}.{k}" if prefix else k, out)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _flat(v, f"{prefix}[{i}]", out)
    else:
        out[prefix] = node
    return out


@pytest.mark.slow
def test_demo_recipe_on_two_processes_equals_one(tmp_path):
    """`memprune run` under torchrun (2 CPU processes, gloo) against one process on the same
    trained encoders: every score, probe and pruning structure agrees; only what is trained
    inside a stage (the distilled encoders, the fine-tuned ones) may differ: the same batches
    and steps, but BatchNorm normalizes each process's half of a batch (docs/scale.md)."""
    two = tmp_path / "two"
    sets = [token for item in TINY for token in ("--set", item)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29000 + os.getpid() % 500), "-m", "memprune.cli", "run",
           str(ROOT / "recipes" / "digits-resnet.yaml"), *sets, "--out", str(two)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("headline findings:") == 1  # the main process alone reports
    assert json.loads((two / "environment.json").read_text())["processes"] == 2
    assert not [p for p in two.rglob(".*.tmp")]  # no writer left a temporary file behind

    # one process resumes a copy holding only the two-process run's trained encoders
    one = tmp_path / "one"
    one.mkdir()
    for name in ("recipe.yaml", "pretrain", "supervised"):
        src = two / name
        shutil.copytree(src, one / name) if src.is_dir() else shutil.copy(src, one / name)
    log = []
    run_recipe(load_recipe(one / "recipe.yaml"), one, resume=True, log=log.append)
    assert "[1/11] pretrain: done earlier, skipped" in log
    a = _flat(_comparable(json.loads((two / "metrics.json").read_text())))
    b = _flat(_comparable(json.loads((one / "metrics.json").read_text())))
    assert a.keys() == b.keys()
    trained = {k for k in a if k.startswith("finetune.rows") and k != "finetune.rows[0].mean"}
    rows = json.loads((two / "metrics.json").read_text())["prune"]["rows"]
    trained |= {f"prune.rows[{i}].{key}" for i, r in enumerate(rows) if r["recovery"] != "none"
                for key in ("accuracy", "std")}  # fmt: skip
    trained |= {k for k in a if k.endswith(".pareto")}  # fronts move with those accuracies
    # the per-criterion forgetting summary averages over the distilled encoders too (the
    # unrecovered encoders' flips agree: checked in forgetting.csv by test_cli's counts)
    trained |= {k for k in a if k.startswith("prune.forgetting")}
    # the privacy rows of the distilled settings move with them, and the front with those
    recovered = {k.rsplit(".", 1)[0] for k in a if k.startswith("prune.privacy")
                 and k.endswith(".recovery") and a[k] != "none"}  # fmt: skip
    trained |= {k for k in a if k.startswith("prune.privacy")
                and (k.rsplit(".", 1)[0] in recovered or k.endswith(".front"))}  # fmt: skip
    trained |= {k for k in a if k.startswith("prune.verdicts") and (" after " in a[k]
                or "+ " in a[k])}  # verdicts on the recovered encoders  # fmt: skip
    for key in sorted(a.keys() - trained):
        if isinstance(a[key], float):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
        else:
            assert a[key] == b[key], key
    structure = ("params", "macs", "strategy", "ratio")
    for r2, r1 in zip(rows, json.loads((one / "metrics.json").read_text())["prune"]["rows"]):
        assert {k: r2.get(k) for k in structure} == {k: r1.get(k) for k in structure}
    for stage in ("unitmem", "layermem"):  # the saved scores themselves, not only the metrics
        for f in (two / stage).glob("*.safetensors"):
            x, y = load_file(str(f)), load_file(str(one / stage / f.name))
            for k in x:
                torch.testing.assert_close(x[k], y[k], rtol=1e-5, atol=1e-6)
