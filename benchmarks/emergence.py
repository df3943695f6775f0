"""Where memorization emerges: SSLMem of the candidates minus SSLMem of the extras, by
pretraining epochs and candidate-set size, on digits and on the toy data.

For every data set, candidate-set size and pair seed, one SimCLR pair f / g is trained with every
epoch's encoder kept (``keep_checkpoints``), and SSLMem (f against g, at the encoders' output)
is scored on the candidates and on the extras at the chosen epochs, f and g both taken after
the same number of epochs. So the epoch axis costs one pair per seed, not one per cell. A cell's
figure is the mean over seeds of the per-seed difference "mean SSLMem of the candidates minus
mean SSLMem of the extras", with its standard error over seeds (SD / sqrt(seeds)); the mean
within-seed standard error (the two-sample SE of a single pair's difference, over points) is
printed beside it, since a single-seed run such as ``make demo`` can only report that one.

    python benchmarks/emergence.py                  # everything, 2 processes, ~25 min on 2 cores
    python benchmarks/emergence.py --data toy       # the toy grid only, ~3 min
    python benchmarks/emergence.py --seeds 5        # two more pair seeds per cell
    python benchmarks/emergence.py --tables-only    # table and plot of what is scored so far

Each pair's rows are cached under ``--out`` (default ``runs/emergence``), so an interrupted study
continues where it stopped and a rerun with more seeds or epochs trains only what is new; the
table goes to ``benchmarks/results/emergence.md`` and the plot to ``docs/img/emergence.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _digits(augment: dict, sizes: list[float]) -> dict:
    """A digits grid with the demo's pair recipe (tiny ResNet-18 at 32 px), 10% shared."""
    pair = dict(lr=3e-3, batch_size=128, proj_dim=64, img_size=32, channels=[8, 16, 32, 64])
    return dict(data=dict(name="digits"), shared=0.1, sizes=sizes, at=[10, 20, 40, 60],
                pair=pair, augment=augment)  # fmt: skip


#: The grids. ``sizes``: candidate (= extra) fractions; ``shared``: the shared fraction, fixed;
#: ``augment``: of training and scoring alike (None: the data set's own); the pair's recipe is
#: the demo's (digits) or the planted test's (toy).
STUDIES = {
    # the old demo's augmentation (SimCLR, crops of 30-100%, colour jitter, flips)
    "digits": _digits({"scale": [0.3, 1.0]}, [0.1]),
    # weak augmentation: crops of 60-100% and flips, no colour jitter
    "digits-weak": _digits({"preset": "crop_flip", "scale": [0.6, 1.0]}, [0.05, 0.1, 0.2]),
    "toy": dict(
        data=dict(name="toy", size=256, dim=48, snr=1.0, redraw=0.3),
        shared=0.25,
        sizes=[0.0625, 0.125, 0.25],
        at=[5, 10, 20, 40, 60],
        pair=dict(lr=1e-2, batch_size=32, proj_dim=32, img_size=8, channels=[8, 16, 32, 64]),
        augment=None,  # the data set's own augmentation (redraw the noise patch)
    ),
}

#: View pairs per point when scoring (the demo's ``sslmem: {pairs: 10}``).
PAIRS = 10


def _dataset(spec: dict, seed: int):
    from memprune import load_dataset

    spec = dict(spec)
    name = spec.pop("name")
    if name == "toy":
        return load_dataset("toy", "train", seed=seed, **spec)
    return load_dataset(name, "train")


def run_pair(study: str, size: float, seed: int, out: str) -> list[dict]:
    """Train one pair (or reuse it) and score every requested epoch; returns the rows."""
    import torch

    from memprune import load_encoder, ssl_mem
    from memprune.checkpoints import read_card
    from memprune.train import pretrain_pair

    torch.set_num_threads(1)
    cfg = STUDIES[study]
    key = f"{study}-c{size:g}-s{seed}"
    cache = Path(out) / f"{key}.json"
    done = json.loads(cache.read_text()) if cache.exists() else []
    want = [e for e in cfg["at"] if e not in {r["epoch"] for r in done}]
    if not want:
        return [r for r in done if r["epoch"] in cfg["at"]]
    data = _dataset(cfg["data"], seed)
    augment = cfg["augment"] or getattr(data, "augment", None)
    run_dir = Path(out) / key
    _, _, splits = pretrain_pair(
        "resnet18", data, run_dir, shared=cfg["shared"], candidate=size, extra=size,
        split_seed=seed, seed=seed, epochs=max(cfg["at"]), augment=augment,
        keep_checkpoints=True, progress=False, **cfg["pair"],
    )  # fmt: skip

    def encoder(side: str, epoch: int):
        card, _ = read_card(run_dir / side)
        weights = run_dir / side / f"checkpoints/epoch_{epoch - 1:03d}.safetensors"
        return load_encoder(card["model"], checkpoint=weights, img_size=card.get("img_size"),
                            **card.get("timm_kwargs", {}))  # fmt: skip

    rows = list(done)
    for epoch in want:
        f, g = encoder("f", epoch), encoder("g", epoch)
        opts = dict(n_pairs=PAIRS, augment=augment, seed=seed, progress=False)
        parts = {p: ssl_mem(f, g, data, getattr(splits, p), **opts).score.double()
                 for p in ("candidate", "extra")}  # fmt: skip
        c, e = parts["candidate"], parts["extra"]
        se = math.sqrt(c.var().item() / len(c) + e.var().item() / len(e))
        rows.append(dict(study=study, shared=cfg["shared"], size=size, n_candidates=len(c),
                         n_train=len(splits.f_indices), seed=seed, epoch=epoch,
                         candidate=c.mean().item(), extra=e.mean().item(),
                         diff=c.mean().item() - e.mean().item(), se_points=se))  # fmt: skip
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, cache)
    return [r for r in rows if r["epoch"] in cfg["at"]]


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (study, size, epoch): mean difference over seeds, SE over seeds, and the
    mean within-seed SE."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["study"], r["size"], r["epoch"]), []).append(r)
    out = []
    for (study, size, epoch), rs in sorted(cells.items()):
        d = [r["diff"] for r in rs]
        se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        out.append(dict(study=study, size=size, n_candidates=rs[0]["n_candidates"],
                        n_train=rs[0]["n_train"], epoch=epoch, seeds=len(d),
                        diff=statistics.mean(d), se=se,
                        se_points=statistics.mean(r["se_points"] for r in rs),
                        per_seed=d))  # fmt: skip
    return out


def table(cells: list[dict]) -> str:
    """Markdown: per cell the mean difference, its SE and 95% t interval over seeds, and the
    mean difference in units of one pair's own (within-seed) SE, what a one-seed run sees."""
    from scipy.stats import t

    lines = [
        "| data | candidates | f trains on | epochs | seeds | candidates − extras | SE over seeds"
        " | 95% interval over seeds | in within-seed SEs | per seed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in cells:
        n = c["seeds"]
        half = float(t.ppf(0.975, n - 1)) * c["se"] if n > 1 else float("nan")
        lines.append(
            f"| {c['study']} | {c['n_candidates']} | {c['n_train']} | {c['epoch']} | {n}"
            f" | {c['diff']:+.4f} | {c['se']:.4f} | {c['diff'] - half:+.4f} to"
            f" {c['diff'] + half:+.4f} | {c['diff'] / c['se_points']:+.1f}"
            f" | {' '.join(f'{d:+.3f}' for d in c['per_seed'])} |"
        )
    return "\n".join(lines)


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import t

    studies = sorted({c["study"] for c in cells})
    cols = min(2, len(studies))
    rows = math.ceil(len(studies) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 3.9 * rows), squeeze=False)
    for ax in axes.flat[len(studies) :]:
        ax.axis("off")
    for ax, study in zip(axes.flat, studies):
        mine = [c for c in cells if c["study"] == study]
        for size in sorted({c["size"] for c in mine}):
            pts = [c for c in mine if c["size"] == size]
            label = f"{pts[0]['n_candidates']} candidates ({pts[0]['n_train']} in f)"
            x, y = [c["epoch"] for c in pts], [c["diff"] for c in pts]
            yerr = [float(t.ppf(0.975, c["seeds"] - 1)) * c["se"] if c["seeds"] > 1 else 0
                    for c in pts]  # fmt: skip
            ax.errorbar(x, y, yerr=yerr, marker="o", capsize=3, label=label)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xlabel("pretraining epochs")
        ax.set_ylabel("SSLMem: candidates − extras")
        seeds = sorted({c["seeds"] for c in mine})
        ax.set_title(f"{study} (mean, 95% t interval; {'-'.join(map(str, seeds))} pair seeds)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=[*STUDIES, "all"], default="all")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--out", default="runs/emergence")
    parser.add_argument(
        "--tables-only",
        action="store_true",
        help="train nothing: the table and plot of the pairs scored so far",
    )
    parser.add_argument("--table", default=str(HERE / "results/emergence.md"))
    parser.add_argument("--plot", default=str(HERE.parent / "docs/img/emergence.png"))
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    studies = list(STUDIES) if args.data == "all" else [args.data]
    # the largest (slowest) pairs first, so the two processes finish together
    jobs = [(s, size, seed) for s in studies for size in STUDIES[s]["sizes"]
            for seed in range(args.seeds)]  # fmt: skip
    jobs.sort(key=lambda j: (j[0] == "toy", -j[1]))
    if args.tables_only:
        jobs = []
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_pair, *job, args.out): job for job in jobs}
        for fut, job in futures.items():
            fut.result()
            print(f"done {job}", flush=True)
    # the table and plot hold every pair scored so far under --out (other --data runs too)
    rows = [r for path in sorted(Path(args.out).glob("*.json"))
            for r in json.loads(path.read_text())
            if r["study"] in STUDIES and r["epoch"] in STUDIES[r["study"]]["at"]]  # fmt: skip
    cells = summarize(rows)
    text = table(cells)
    print(text)
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    Path(args.table).write_text(
        "# Emergence study (benchmarks/emergence.py)\n\n"
        f"SSLMem of the candidates minus that of the extras; {PAIRS} view pairs per point. The"
        " interval is Student's t over the pair seeds; 'in within-seed SEs' is the mean"
        " difference over one pair's own standard error (over points), what a one-seed run"
        " compares its difference with.\n\n" + text + "\n"
    )
    plot(cells, Path(args.plot))
    print(f"table: {args.table}\nplot: {args.plot}")


if __name__ == "__main__":
    main()
