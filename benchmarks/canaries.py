"""The canary study: which canaries the demo can audit (docs/method.md §10).

Trains the demo's pair (recipes/digits-resnet.yaml: 60 epochs, its split and augmentation) with
canaries of each kind and count, and prints per run the included-minus-excluded SSLMem
difference in standard errors, the output membership AUC, the first separable layer, UnitMem's
top-decile share of included canaries against chance, and the ablation drops (canary units
against random ones). The demo's canaries were chosen from this table. Slow: about two minutes
a run on 2 CPU cores.

    python benchmarks/canaries.py
    python benchmarks/canaries.py --kinds pattern --n 40 80 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from memprune.recipes import load_recipe, run_recipe

ROOT = Path(__file__).resolve().parents[1]
#: Everything but the pretraining and the canary audit is off.
ONLY_CANARIES = [
    "encoder.supervised.enabled=false", "scores.unitmem.enabled=false",
    "scores.classmem.enabled=false", "scores.sslmem.enabled=false",
    "scores.layermem.enabled=false", "scores.cka.enabled=false", "actions.prune.enabled=false",
    "actions.finetune.enabled=false", "evaluation.linear=false", "evaluation.knn=false",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=["pattern", "mix", "noise"])
    parser.add_argument("--n", nargs="+", type=int, default=[40])
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--set", nargs="*", default=[], help="more recipe keys (KEY=VALUE)")
    args = parser.parse_args()
    print(
        "| kind | n | seed | included | SSLMem diff | SE | z | AUC | separable | top share |"
        " chance | canary drop | random drop | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in args.kinds:
        for n in args.n:
            for seed in args.seeds:
                canaries = (
                    f"data.canaries={{n: {n}, kind: {kind}, strength: {args.strength},"
                    " n_typical: 100, views: 5, pairs: 10, seeds: [0, 1, 2]}"
                )
                keys = [*ONLY_CANARIES, canaries, f"seed={seed}", *args.set]
                recipe = load_recipe(ROOT / "recipes" / "digits-resnet.yaml", keys)
                start = time.perf_counter()
                with tempfile.TemporaryDirectory() as d:
                    run = run_recipe(recipe, Path(d) / "run", log=lambda line: None)
                    c = json.loads((run / "metrics.json").read_text())["canaries"]
                z = c["sslmem_diff"] / c["sslmem_se"]
                print(
                    f"| {kind} | {n} | {seed} | {c['n_included']} | {c['sslmem_diff']:+.4f} |"
                    f" {c['sslmem_se']:.4f} | {z:+.1f} | {c['output_auc']:.3f} |"
                    f" {c['separable_layer']} | {c['top_share']:.3f} | {c['chance']:.3f} |"
                    f" {c['canary_drop']:+.4f} | {c['random_drop']:+.4f} |"
                    f" {time.perf_counter() - start:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
