"""kill -9 in the middle of a command, rerun the same command: the result equals an
uninterrupted run (score, prune and finetune; `memprune run` has its own test in
test_recipes.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from memprune.cli import main
from memprune.report._rundir import MARKER

from .conftest import tiny_resnet
from .test_tuning import planted_layermem

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--timm", "channels=[8,16,32,64]"]


def _kill_when(argv: list[str], ready, timeout: float = 240.0) -> None:
    """Run ``memprune ARGV`` in a subprocess and SIGKILL it as soon as ``ready()`` is true."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "memprune.cli", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"finished before the kill: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("the moment to kill never came")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def _unfinished(out: Path) -> bool:
    marker = json.loads((out / MARKER).read_text())
    return marker["finished"] is False


def _same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), a.name


@pytest.mark.slow
def test_score_killed_then_rerun_equals_uninterrupted(tmp_path):
    argv = ["score", "units", *TINY, "--views", "2", "--max-points", "120"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*argv, "--out", str(whole)]) == 0
    # killed while writing: the scores are there, the tables and the plot not yet
    _kill_when([*argv, "--out", str(cut)], lambda: (cut / "unitmem.safetensors").is_file())
    assert _unfinished(cut)
    assert main([*argv, "--out", str(cut)]) == 0  # the same command finishes the run
    _same_tensors(whole / "unitmem.safetensors", cut / "unitmem.safetensors")
    assert (whole / "summary.csv").read_text() == (cut / "summary.csv").read_text()
    assert not _unfinished(cut)
    assert main([*argv, "--out", str(cut)]) == 2  # a finished run is not overwritten


def _comparable(report: dict) -> dict:
    """A pruning report without measured latencies."""
    drop = ("latency_ms", "latency_ratio", "latency_s")
    strip = lambda row: {k: v for k, v in row.items() if k not in drop}  # noqa: E731
    return {key: [strip(r) for r in report[key]] for key in ("table", "runs")}


@pytest.mark.slow
def test_prune_killed_then_rerun_equals_uninterrupted(tmp_path):
    argv = ["prune", *TINY, "--ratio", "0.3", "0.5", "--strategy", "lowest", "random",
            "--views", "2", "--max-points", "120", "--latency-batch", "0"]  # fmt: skip
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*argv, "--out", str(whole)]) == 0
    # killed in the middle of the sweep: one pruned encoder saved, the others not yet
    _kill_when([*argv, "--out", str(cut)], lambda: (cut / "models" / "lowest_0.3" /
                                                     "pruned.json").is_file())  # fmt: skip
    assert _unfinished(cut) and not (cut / "report.json").exists()
    assert main([*argv, "--out", str(cut)]) == 0
    a = json.loads((whole / "report.json").read_text())
    b = json.loads((cut / "report.json").read_text())
    assert _comparable(a) == _comparable(b)
    for model in ("lowest_0.3", "lowest_0.5", "random_0.3", "random_0.5"):
        _same_tensors(whole / "models" / model / "encoder.safetensors",
                      cut / "models" / model / "encoder.safetensors")  # fmt: skip


@pytest.mark.slow
def test_finetune_killed_then_rerun_equals_uninterrupted(tmp_path):
    weights = tmp_path / "f.safetensors"
    save_file(tiny_resnet(img_size=32).state_dict(), str(weights))
    planted_layermem([0.1, 0.15, 0.4, 0.45, 0.5, 0.9, 0.95, 0.96, 0.97]).save(
        tmp_path / "layers" / "layermem"
    )
    argv = ["finetune", "--f", str(weights), "--model", "resnet18", "--img-size", "32", *TINY,
            "--layer-scores", str(tmp_path / "layers"), "--k", "1", "--strategy", "top",
            "--epochs", "1", "--seeds", "0"]  # fmt: skip
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*argv, "--out", str(whole)]) == 0
    # killed once the comparison is done and its files are being written
    _kill_when([*argv, "--out", str(cut)], lambda: (cut / MARKER).is_file())
    assert _unfinished(cut)
    assert main([*argv, "--out", str(cut)]) == 0
    assert (whole / "comparison.csv").read_text() == (cut / "comparison.csv").read_text()
