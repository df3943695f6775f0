"""What structured pruning buys, measured side by side in one run (issue 6).

For each model and ratio, units are removed by magnitude (layer scope, output width kept; ViTs:
MLP neurons and, in a second row, attention heads too), then the unpruned and the pruned
encoder run the same batch alternately. Prints parameters and MACs after / before (torch-pruning's
counter) and the latency ratio pruned / unpruned (best of the repeats, and the median of the
per-pair ratios). Zeroing weights would leave every ratio at 1.0.

Usage: python benchmarks/prune_speed.py [--device cuda] [--large] [--quick] [--batch 64]
"""

from __future__ import annotations

import argparse

import torch
from _common import describe, make_model, side_by_side, timed

import memprune
from memprune.encoders import resolve_device


def forward(model, x, device, reps: int):
    def run():
        with torch.inference_mode():
            for _ in range(reps):
                model(x)

    return lambda: timed(run, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--large", action="store_true", help="resnet50 / vit_small at 224 px")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    device = resolve_device(args.device)
    keys = ["resnet50@224", "vit_small@224"] if args.large else ["resnet18@32", "vit_tiny@32"]
    repeats, reps = (3, 1) if args.quick else (9, 3)
    print(describe(device), f"batch {args.batch}, {repeats} x {reps} forward passes per timing")
    header = f"{'model':<14}{'pruned':<22}{'params':>8}{'MACs':>8}{'latency best':>14}{'median':>8}"
    print(header + "\n" + "-" * len(header))
    for key in keys:
        model, size = make_model(key)
        model = model.to(device).eval()
        x = torch.randn(args.batch, 3, size, size, device=device)
        variants = [(r, False) for r in (0.3, 0.5)]
        if "vit" in key:
            variants += [(r, True) for r in (0.3, 0.5)]
        for ratio, heads in variants:
            pruned, report = memprune.prune(
                model, ratio=ratio, strategy="magnitude", heads=heads, latency_batch=None
            )
            base, ours = forward(model, x, device, reps), forward(pruned, x, device, reps)
            best_a, best_b, _, median = side_by_side(base, ours, repeats)
            what = f"{ratio:.0%} units" + (" + heads" if heads else "")
            p = report.params[1] / report.params[0]
            m = report.macs[1] / report.macs[0]
            print(
                f"{key:<14}{what:<22}{p:>8.3f}{m:>8.3f}{best_b / best_a:>14.3f}{1 / median:>8.3f}"
            )
    print("\nratios are pruned / unpruned: lower is smaller / faster")


if __name__ == "__main__":
    main()
