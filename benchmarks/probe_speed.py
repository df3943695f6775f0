"""Probe speed, measured side by side in one run (issue 5).

Prints:
1. feature extraction throughput (``extract_features``) vs the bare forward pass over the
   same images and batch size, per model;
2. the torch linear probe vs scikit-learn's LogisticRegression on the same features (the
   same C grid, validation split and refit): time and test accuracy.

Usage: python benchmarks/probe_speed.py [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from _common import describe, make_model, random_data, side_by_side, timed
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from memprune.engine import Normalizer, resolve_normalize
from memprune.probe import LinearProbe, extract_features


def bare(model, data, batch_size, device) -> float:
    norm = Normalizer(resolve_normalize(model, "auto"), device)
    model.to(device).eval()

    def run():
        with torch.inference_mode():
            for image, _, _ in DataLoader(data, batch_size=batch_size):
                model(norm(image.to(device)))

    return timed(run, device)


def extracted(model, data, batch_size, device) -> float:
    kw = dict(chunk_size=batch_size, device=device, progress=False)
    return timed(lambda: extract_features(model, data, **kw), device)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    print(describe(device))
    for key in ("resnet18@32", "vit_tiny@32"):
        model, size = make_model(key)
        n = 256 if args.quick else (4096 if key.startswith("resnet") else 1024)
        data = random_data(n, size)
        t_bare, t_ours, ratio, paired = side_by_side(
            partial(bare, model, data, 256, device),
            partial(extracted, model, data, 256, device),
            args.repeats,
        )
        print(f"\n[{key}] N={n}, batch 256")
        print(f"  bare forward      {n / t_bare:9.1f} img/s")
        print(f"  extract_features  {n / t_ours:9.1f} img/s   ratio {ratio:.3f} best-of,"
              f" {paired:.3f} median of pairs")  # fmt: skip

    x, y = load_digits(return_X_y=True)
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y)
    tr, te = slice(0, 1437), slice(1437, None)
    print("\nlinear probe on the same features (sklearn digits 8x8 pixels, 1437 train / 360 test,"
          " C grid of 6, 20% validation, refit):")  # fmt: skip
    for backend in ("torch", "sklearn"):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            probe = LinearProbe(backend).fit(x[tr].to(device), y[tr].to(device))
            times.append(time.perf_counter() - start)
        acc = probe.score(x[te].to(device), y[te].to(device))
        print(
            f"  {backend:8s} fit {min(times):6.2f} s   test accuracy {acc:.4f}   C = {probe.C_:g}"
        )


if __name__ == "__main__":
    main()
