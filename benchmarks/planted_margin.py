"""Measure the margin of the slow statistical memorization test over many pair seeds.

The test in tests/test_sslmem.py trains a SimCLR pair f / g on the toy data (docs/method.md §8)
and asserts that the paired difference "mean SSLMem of the candidates minus mean SSLMem of the
extras" exceeds a threshold. A training run's exact trajectory depends on the machine and the
thread count, so the threshold must hold for *any* seed: this script trains the same pair for
seeds 0..N-1 (one thread, deterministic algorithms, as the test does) and prints the mean, the
standard deviation and mean - 4 SD of the difference, from which the test's threshold is set.

    python benchmarks/planted_margin.py --seeds 10

Measured (2 cores, 1 thread, seeds 0-9): +0.353 +0.337 +0.333 +0.343 +0.458 +0.347 +0.415 +0.464
+0.420 +0.440; mean +0.391, SD 0.053, mean - 4 SD +0.178. The test asserts > 0.15. Smaller
budgets gave a worse mean/SD ratio: 64 points with a shared half and 40 epochs, mean +0.292,
SD 0.090 (mean - 4 SD below 0); 128 points with a shared half, mean +0.235, SD 0.058.

``--canaries`` measures the same for canaries (docs/method.md §8b): the mean SSLMem of the
included minus the excluded canaries of a toy pair (f on the candidates and the included
canaries, g on the extras). Measured (2 cores, 1 thread): 64 ``pattern`` canaries, each once
per epoch: mean +0.051, SD 0.067, min -0.056 over seeds 0-9 (32 beside a shared half: mean
+0.071, SD 0.091), too weak to assert. Repeating each included canary raises it: 4 times,
+0.183 / +0.225 / +0.069 (seeds 0-2); 8 times (the settings below, 8 view pairs), mean +0.233,
SD 0.082, min +0.117 over seeds 0-10; with the data seed fixed at 0 and only the training
seed varied (what another machine's trajectory changes), mean +0.206, SD 0.070, min +0.119
over 10 seeds. 16 times: +0.302 / +0.490 / +0.103; 8 times for 120 epochs: +0.186 / +0.367 /
+0.145; temperature 0.2: +0.147 / +0.340 / +0.215. mean - 4 SD stays below 0 in every
setting (the spread between trajectories grows with the mean), so
tests/test_canaries.py asserts +0.05, 2.2 SD below the mean of the training seeds. Since a
repeated canary's copies draw their own views and are not each other's negatives (before,
they shared one pair of views per epoch and pushed it apart), 8 times over data and training
seeds 0-10: mean +0.264, SD 0.089, min +0.140 (+0.05 is now 2.4 SD below the mean).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from memprune import load_dataset, ssl_mem
from memprune.train import pretrain_pair

#: The pair the test trains (tests/test_sslmem.py, TOY_PAIR); change both together. f trains on
#: the 64 candidates only, g on the 64 extras only.
TOY = dict(size=128, dim=48, snr=1.0, redraw=0.3)
PAIR = dict(shared=0.0, candidate=0.5, extra=0.5, epochs=60, lr=1e-2, batch_size=32,
            proj_dim=32, img_size=8, progress=False, channels=[8, 16, 32, 64])  # fmt: skip


#: Views per point when scoring.
VIEWS = 4


def paired_difference(seed: int, out_dir: str, toy: dict = TOY, pair: dict = PAIR,
                      views: int = VIEWS) -> float:  # fmt: skip
    """Mean SSLMem of the candidates minus that of the extras for the pair trained at ``seed``."""
    toy = load_dataset("toy", "train", seed=seed, **toy)
    f, g, splits = pretrain_pair("resnet18", toy, out_dir, seed=seed, split_seed=seed,
                                 augment=toy.augment, **pair)  # fmt: skip
    means = [
        ssl_mem(f.encoder, g.encoder, toy, getattr(splits, part), n_pairs=views,
                augment=toy.augment, seed=seed, progress=False).score.mean().item()
        for part in ("candidate", "extra")
    ]  # fmt: skip
    return means[0] - means[1]


#: The canary pair measured by ``--canaries``: f trains on the candidates plus the included
#: canaries, g on the extras; 64 pattern canaries, each included by a coin.
CANARY_TOY = dict(size=128, dim=48, snr=1.0, redraw=0.3)
CANARY_PAIR = dict(shared=0.0, candidate=0.5, extra=0.5, epochs=60, lr=1e-2, batch_size=32,
                   proj_dim=32, img_size=8, progress=False, channels=[8, 16, 32, 64])  # fmt: skip
CANARIES = dict(n=64, kind="pattern", repeat=8)
#: View pairs per canary when scoring them.
CANARY_VIEWS = 8


def canary_difference(seed: int, out_dir: str, views: int = CANARY_VIEWS, canaries: dict = CANARIES,
                      toy: dict = CANARY_TOY, pair: dict = CANARY_PAIR) -> float:  # fmt: skip
    """Mean SSLMem of the included canaries minus that of the excluded ones, for the toy pair
    trained at ``seed`` with canaries (their images and coins drawn by ``seed``)."""
    from memprune.data import WithCanaries, make_canaries, make_splits

    toy_data = load_dataset("toy", "train", seed=seed, **toy)
    n = canaries["n"]
    data = WithCanaries(toy_data, make_canaries(toy_data, n, canaries["kind"], seed=seed))
    train = {k: v for k, v in pair.items() if k not in ("shared", "candidate", "extra")}
    splits = make_splits(len(data), pair["shared"], pair["candidate"], pair["extra"], seed=seed,
                         canaries=n, repeat=canaries.get("repeat", 1))  # fmt: skip
    f, g, splits = pretrain_pair("resnet18", data, out_dir, splits=splits, seed=seed,
                                 augment=toy_data.augment, **train)  # fmt: skip
    means = [
        ssl_mem(f.encoder, g.encoder, data, idx, n_pairs=views, augment=toy_data.augment, seed=seed,
                progress=False).score.mean().item()
        for idx in (splits.included, splits.excluded)
    ]  # fmt: skip
    return means[0] - means[1]


def supervised_margins(seed: int, out_dir: str, epochs: int = 4) -> tuple[float, float]:
    """The two margins tests/test_train.py asserts on, for one seed: the drop of the training
    loss over 4 epochs with true labels, and how far the random-label loss ends above it."""
    from memprune.train import train_supervised

    data = load_dataset("digits", "train")
    indices = sorted(torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
                     [:256].tolist())  # fmt: skip
    run = dict(epochs=epochs, batch_size=32, lr=1e-2, seed=seed, progress=False,
               channels=(8, 16, 32, 64))  # fmt: skip
    true = train_supervised("resnet18", data, indices, out_dir=f"{out_dir}/true", **run)
    rand = train_supervised("resnet18", data, indices, out_dir=f"{out_dir}/rand",
                            random_labels=True, **run)  # fmt: skip
    return true.history[0] - true.history[-1], rand.history[-1] - true.history[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=TOY["size"], help="toy points")
    parser.add_argument("--epochs", type=int, default=PAIR["epochs"])
    parser.add_argument(
        "--views",
        type=int,
        default=None,
        help=f"view pairs per point (default {VIEWS}, {CANARY_VIEWS} for canaries)",
    )
    parser.add_argument("--shared", type=float, default=PAIR["shared"], help="shared fraction")
    parser.add_argument("--supervised", action="store_true",
                        help="measure test_train's supervised margins instead")  # fmt: skip
    parser.add_argument("--supervised-epochs", type=int, default=4)
    parser.add_argument(
        "--canaries",
        action="store_true",
        help="measure test_canaries' included - excluded margin instead",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=CANARIES["repeat"],
        help="with --canaries: times each included canary is trained on",
    )
    parser.add_argument("--kind", default=CANARIES["kind"], help="with --canaries: the kind")
    parser.add_argument("--n", type=int, default=CANARIES["n"], help="with --canaries: how many")
    args = parser.parse_args()
    if args.supervised:
        torch.set_num_threads(args.threads)
        rows = []
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as tmp:
                rows.append(supervised_margins(seed, tmp, args.supervised_epochs))
            print(f"seed {seed}: loss drop {rows[-1][0]:+.4f}, random - true {rows[-1][1]:+.4f}",
                  flush=True)  # fmt: skip
        for i, name in enumerate(("loss drop", "random - true")):
            vals = [r[i] for r in rows]
            print(f"{name}: mean {statistics.mean(vals):+.4f}, SD {statistics.stdev(vals):.4f},"
                  f" min {min(vals):+.4f}")  # fmt: skip
        return
    toy, pair = {**TOY, "size": args.size}, {**PAIR, "epochs": args.epochs}
    if args.shared != PAIR["shared"]:  # the rest is split evenly between candidates and extras
        half = (1 - args.shared) / 2
        pair.update(shared=args.shared, candidate=half, extra=half)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    diffs = []
    for seed in range(args.seeds):
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            if args.canaries:
                canaries = dict(n=args.n, kind=args.kind, repeat=args.repeat)
                diffs.append(canary_difference(seed, tmp, args.views or CANARY_VIEWS, canaries))
            else:
                diffs.append(paired_difference(seed, tmp, toy, pair, args.views or VIEWS))
        print(f"seed {seed}: {diffs[-1]:+.4f} ({time.perf_counter() - start:.1f} s)", flush=True)
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    print(f"{len(diffs)} seeds, {args.threads} thread(s): mean {mean:+.4f}, SD {sd:.4f},"
          f" min {min(diffs):+.4f}, mean - 4 SD {mean - 4 * sd:+.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
