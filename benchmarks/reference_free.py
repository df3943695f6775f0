"""How far the reference-free layer rankings can stand in for LayerMem, measured on pairs.

For each data set and pair seed, a SimCLR pair is trained (f on shared + candidates, g on
shared + extras). On f alone: the member gap and membership AUC per layer (members: the
candidates, which f trained on; non-members: the extras, which it never saw) and the UnitMem
profile; with g: LayerMem and ΔLayerMem on the candidates. Per seed, the agreement over the
layer sites (the output read-out excluded, as select_layers excludes it):

* Kendall tau of the member gap against LayerMem and against ΔLayerMem, of the AUC against
  LayerMem, of the UnitMem profile against ΔLayerMem;
* the overlap of the top-2 layers select_layers would fine-tune (gap vs ΔLayerMem, UnitMem
  profile vs ΔLayerMem);
* whether the output's member gap and LayerMem are above 0 (the gap's bootstrap interval).

Every figure is reported as mean and 95% t-interval over the seeds. The pairs are the demo
recipe's as it first was (digits; 30 epochs, crops of 30-100%, a tiny ResNet-18; the demo has
since moved to weaker crops and a longer budget) and the toy pair of the memorization test
(tests/test_sslmem.py), where memorization is strong.

    python benchmarks/reference_free.py --data toy digits --seeds 3 --out runs/study-reference-free
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import kendalltau, t

import memprune
from memprune.scores import member_gap
from memprune.train import pretrain_pair
from memprune.tuning import select_layers, unitmem_profile

TINY = {"channels": [8, 16, 32, 64]}
#: name -> (data set options, pair recipe, view pairs per point, augmentation of the scores).
SETTINGS = {
    "digits": (  # recipes/digits-resnet.yaml as it first was
        {},
        dict(shared=0.5, candidate=0.1, extra=0.1, epochs=30, lr=3e-3, batch_size=128,
             proj_dim=64, img_size=32, augment={"scale": (0.3, 1.0)}),
        10,
        {"scale": (0.3, 1.0)},
    ),
    "toy": (  # tests/test_sslmem.py TOY_PAIR, benchmarks/planted_margin.py
        dict(size=128, dim=48, snr=1.0, redraw=0.3),
        dict(shared=0.0, candidate=0.5, extra=0.5, epochs=60, lr=1e-2, batch_size=32,
             proj_dim=32, img_size=8),
        4,
        None,  # the toy data's own augmentation
    ),
}  # fmt: skip


def _tau(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(kendalltau(a.numpy(), b.numpy()).statistic)


def one_pair(name: str, seed: int, work: Path) -> dict:
    """Train the pair of ``name`` at ``seed`` and compute every ranking and agreement."""
    options, recipe, pairs, augment = SETTINGS[name]
    if name == "toy":
        data = memprune.load_dataset("toy", "train", seed=seed, **options)
        recipe = {**recipe, "augment": data.augment}
        augment = data.augment
    else:
        data = memprune.load_dataset(name, "train")
    start = time.perf_counter()
    f, g, splits = pretrain_pair("resnet18", data, work / f"{name}-{seed}", seed=seed,
                                 split_seed=seed, progress=False, **recipe, **TINY)  # fmt: skip
    trained = time.perf_counter() - start
    f, g = f.encoder, g.encoder
    view = dict(n_pairs=pairs, augment=augment, seed=seed, progress=False)
    lm = memprune.layer_mem(f, g, data, splits.candidate, **view)
    gap = member_gap(f, data, data, splits.candidate, splits.extra, **view)
    units = memprune.unit_mem(f, data, n_views=pairs, augment=augment or "simclr", seed=seed,
                              progress=False)  # fmt: skip
    profile = unitmem_profile(units, f)
    inner = [i for i, n in enumerate(lm.layers) if n != "output"]
    v = {
        "layermem": lm.layer_mem()[inner], "delta": lm.delta()[inner],
        "gap": gap.gap()[inner], "auc": gap.auc()[inner], "unitmem": profile.ranking("unitmem"),
    }  # fmt: skip

    def top2(result, by):
        return set(select_layers(result, 2, by=by).layers)

    ci = gap.gap_ci()[-1]
    return {
        "data": name, "seed": seed, "train_seconds": round(trained, 1),
        "layers": [lm.layers[i] for i in inner],
        "values": {k: x.tolist() for k, x in v.items()},
        "tau_gap_layermem": _tau(v["gap"], v["layermem"]),
        "tau_gap_delta": _tau(v["gap"], v["delta"]),
        "tau_auc_layermem": _tau(v["auc"], v["layermem"]),
        "tau_unitmem_delta": _tau(v["unitmem"], v["delta"]),
        "top2_gap_delta": len(top2(gap, "gap") & top2(lm, "delta")) / 2,
        "top2_unitmem_delta": len(top2(profile, "unitmem") & top2(lm, "delta")) / 2,
        "output_layermem": float(lm.layer_mem()[-1]),
        "output_gap": float(gap.gap()[-1]), "output_gap_lo": float(ci[0]),
        "output_gap_hi": float(ci[1]), "output_auc": float(gap.auc()[-1]),
        "sslmem_difference": float(lm.sslmem[:, -1].mean()),
    }  # fmt: skip


def interval(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of the 95% t-interval over seeds."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, t.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / len(xs) ** 0.5


FIGURES = ["tau_gap_layermem", "tau_gap_delta", "tau_auc_layermem", "tau_unitmem_delta",
           "top2_gap_delta", "top2_unitmem_delta", "output_layermem", "output_gap",
           "output_auc"]  # fmt: skip


def summarize(records: list[dict]) -> str:
    lines = ["| data | seeds | " + " | ".join(FIGURES) + " |",
             "|---|---|" + "---|" * len(FIGURES)]  # fmt: skip
    for name in dict.fromkeys(r["data"] for r in records):
        rs = [r for r in records if r["data"] == name]
        cells = []
        for key in FIGURES:
            m, h = interval([r[key] for r in rs])
            cells.append(f"{m:+.2f} ± {h:.2f}")
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    lines += ["", "Per-layer values, mean over seeds:", ""]
    for name in dict.fromkeys(r["data"] for r in records):
        rs = [r for r in records if r["data"] == name]
        keys = list(rs[0]["values"])
        lines += [f"**{name}**", "", "| layer | " + " | ".join(keys) + " |",
                  "|---|" + "---|" * len(keys)]  # fmt: skip
        for i, layer in enumerate(rs[0]["layers"]):
            vals = [statistics.fmean(r["values"][k][i] for r in rs) for k in keys]
            lines.append(f"| {layer} | " + " | ".join(f"{x:+.4f}" for x in vals) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="+", default=["toy", "digits"], choices=list(SETTINGS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/study-reference-free")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    saved = out / "records.json"
    if saved.is_file():  # rerunnable: finished pairs are kept
        records = [r for r in json.loads(saved.read_text()) if r["data"] in args.data]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.data:
            for seed in range(args.seeds):
                if any(r["data"] == name and r["seed"] == seed for r in records):
                    continue
                records.append(one_pair(name, seed, Path(tmp)))
                r = records[-1]
                print(f"{name} seed {seed}: tau(gap, LayerMem) {r['tau_gap_layermem']:+.2f},"
                      f" top-2 overlap {r['top2_gap_delta']:.1f}, output gap"
                      f" {r['output_gap']:+.4f} [{r['output_gap_lo']:+.4f},"
                      f" {r['output_gap_hi']:+.4f}], LayerMem {r['output_layermem']:+.4f}"
                      f" ({r['train_seconds']} s)", flush=True)  # fmt: skip
                saved.write_text(json.dumps(records, indent=1))
    text = summarize(records)
    (out / "summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
