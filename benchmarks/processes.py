"""The whole demo recipe on 2 processes against 1, training included: agreement in distribution.

Training on W processes takes the same batches and steps as on one, with the negatives and
(``sync_bn``) the BatchNorm statistics of the global batch, so its first steps agree to float
precision (tests/test_train.py); over many epochs summation order makes the weights drift
apart, and a trained encoder on W processes is another draw of the same training. What W
processes reproduce of a whole run is then the distribution of every metric over seeds.

This script runs the shortened demo recipe (the suite's ``TINY`` settings, ``sync_bn: true``
and 1 thread per process) for each seed on 1 process and, under torchrun with gloo, on 2; per
numeric metric it compares the two groups' means with the Welch standard error over the
seeds. The stated tolerance (docs/scale.md) is ``|mean_2 - mean_1| <= 3 SE``, with SE floored
at 1e-6 so that metrics fixed by the data (a data set's size) must be equal. It prints how many
metrics the tolerance covers, how many it holds for, and the worst ones.

    python benchmarks/processes.py --seeds 0 1 2 3     # about 5 minutes on 2 cores

Measured (2 cores, seeds 0-3): 253 numeric metrics, 253 within 3 SE of the 1-process mean
(the largest 2.4 SE, a canary-ablation accuracy), 88 equal on every seed. Before minibatch CKA
dealt its minibatches whole to the processes, 45 were outside: every fold of the CKA-by-depth
claim read 0 on 2 processes (a fold of 64 points left each process 32, under one minibatch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_recipes import TINY, _comparable  # noqa: E402
from tests.test_recipes_mp import _flat  # noqa: E402

#: 2-process training synchronizes BatchNorm, as docs/scale.md advises for agreement.
SETTINGS = [*TINY, "encoder.pretrain.sync_bn=true"]


def _run(seed: int, processes: int, out: Path) -> dict:
    sets = [token for item in [*SETTINGS, f"seed={seed}"] for token in ("--set", item)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m"]
    if processes > 1:
        base += ["torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                 str(29500 + seed), "-m"]  # fmt: skip
    cmd = [*base, "memprune.cli", "run", str(ROOT / "recipes" / "digits-resnet.yaml"), *sets,
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-3000:])
    return _flat(_comparable(json.loads((out / "metrics.json").read_text())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--tolerance", type=float, default=3.0, help="in standard errors")
    parser.add_argument("--show", type=int, default=15, help="the metrics shown, worst first")
    args = parser.parse_args()
    runs: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as d:
        for seed in args.seeds:
            for w in (1, 2):
                runs[w].append(_run(seed, w, Path(d) / f"w{w}-s{seed}"))
                print(f"seed {seed}, {w} process(es): done", flush=True)
    keys = sorted(set.intersection(*(set(r) for rs in runs.values() for r in rs)))
    numeric = [k for k in keys if all(isinstance(r[k], (int, float)) and not isinstance(
        r[k], bool) and math.isfinite(r[k]) for rs in runs.values() for r in rs)]  # fmt: skip
    rows = []
    for k in numeric:
        a, b = ([r[k] for r in runs[w]] for w in (1, 2))
        se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
        z = abs(statistics.fmean(b) - statistics.fmean(a)) / max(se, 1e-6)
        rows.append((z, k, statistics.fmean(a), statistics.fmean(b), se))
    held = sum(z <= args.tolerance for z, *_ in rows)
    exact = sum(z == 0 for z, *_ in rows)
    print(f"\n{len(rows)} numeric metrics over seeds {args.seeds}: {held} within"
          f" {args.tolerance:g} SE of the 1-process mean ({exact} equal on every seed);"
          f" {len(rows) - held} outside")  # fmt: skip
    outside: dict[str, int] = {}
    for z, k, *_ in rows:
        if z > args.tolerance:
            stage = k.split(".")[0].split("[")[0]
            outside[stage] = outside.get(stage, 0) + 1
    print("outside, by stage: " + (", ".join(f"{k} {v}" for k, v in outside.items()) or "none"))
    print("\n| metric | 1 process | 2 processes | SE | z |\n|---|---|---|---|---|")
    for z, k, a, b, se in sorted(rows, reverse=True)[: args.show]:
        print(f"| {k} | {a:.4f} | {b:.4f} | {se:.4f} | {z:.1f} |")


if __name__ == "__main__":
    main()
