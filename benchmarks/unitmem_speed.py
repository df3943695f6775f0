"""UnitMem speed and memory, measured side by side in one run (issue 3).

Prints, per model:
1. throughput of ``unit_mem`` over all unit sites vs the bare forward pass over the same views
   and batch size (target >= 0.9 on CPU);
2. peak memory of mean mode (and, for contrast, median mode) for N = 500 vs N = 5000
   (target growth < 10% in mean mode), each in a fresh subprocess;
3. the reference code's way (one image per forward pass, one site per pass, the pass stopped
   right after the site as a truncated model would be) vs ``unit_mem`` on a small N: speedup.

Usage: python benchmarks/unitmem_speed.py [--device cuda] [--large] [--quick]
``--large`` adds ResNet-50 and ViT-Small at 224 px (for a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from functools import partial

import torch
from _common import Stop, describe, make_model, random_data, side_by_side, timed
from torch.utils.data import DataLoader

import memprune
from memprune.data import MultiView
from memprune.engine import Normalizer, resolve_normalize
from memprune.hooks import capture


def bare_forward(model, data, n_views, batch_size, device) -> float:
    views = MultiView(data, n_views, augment="none")
    norm = Normalizer(resolve_normalize(model, "auto"), device)
    model.to(device).eval()

    def run():
        with torch.inference_mode():
            for batch, _, _ in DataLoader(views, batch_size=batch_size):
                model(norm(batch.to(device).flatten(0, 1)))

    return timed(run, device)


def scored(model, data, n_views, batch_size, device, **kw) -> float:
    return timed(
        lambda: memprune.unit_mem(
            model,
            data,
            n_views=n_views,
            chunk_size=batch_size,
            augment="none",
            device=device,
            progress=False,
            **kw,
        ),
        device,
    )


def reference_way(model, data, n_views, device) -> float:
    """One image per pass, one site per pass, stopped after the site (a truncated model)."""
    sites = memprune.find_sites(model, "units", input_size=tuple(data[0][0].shape))
    views = MultiView(data, n_views, augment="none")
    norm = Normalizer(resolve_normalize(model, "auto"), device)
    model.to(device).eval()

    def run():
        with torch.inference_mode():
            for site in sites:
                module = dict(model.named_modules())[site.module]

                def stop(*_):
                    raise Stop

                with capture(model, [site]) as acts:
                    handle = module.register_forward_hook(stop)
                    try:
                        for p in range(len(views)):
                            v, _, _ = views[p]
                            for k in range(n_views):
                                with contextlib.suppress(Stop):
                                    model(norm(v[k : k + 1].to(device)))
                                acts[site.name].cpu()
                    finally:
                        handle.remove()

    return timed(run, device)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(key: str, n: int, n_views: int, rest: str, device: str) -> dict:
    """Run in a subprocess: peak memory during one unit_mem call.

    ``rss_mb``: the process's peak RSS during the call (model and data included);
    ``call_mb``: that peak minus the RSS just before the call, i.e. what scoring itself needs.
    The high-water mark is reset before the call through /proc/self/clear_refs (Linux).
    """
    model, size = make_model(key)
    data = random_data(n, size)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    memprune.unit_mem(
        model,
        data,
        n_views=n_views,
        chunk_size=64,
        augment="none",
        rest=rest,
        device=dev,
        progress=False,
    )
    peak = _status_mb("VmHWM")
    out = {"rss_mb": peak, "call_mb": peak - before}
    if dev.type == "cuda":
        out["cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def peak_memory(key, n, n_views, rest, device) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import json, sys; sys.path.insert(0, {here!r}); import unitmem_speed as b; "
        f"print(json.dumps(b.peak_memory_child({key!r}, {n}, {n_views}, {rest!r}, {device!r})))"
    )
    # A fixed mmap threshold keeps glibc from parking freed activations on the heap, so the
    # peak RSS follows live memory instead of allocator history (seen: +-100% noise without).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--large", action="store_true", help="add ResNet-50 and ViT-Small at 224 px")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    keys = ["resnet18@32", "vit_tiny@32"] + (
        ["resnet50@224", "vit_small@224"] if args.large else []
    )
    print(describe(device))
    rows = []
    for key in keys:
        model, size = make_model(key)
        big = size > 64
        n = 64 if args.quick else (2048 if device.type == "cuda" or not big else 32)
        n_views, batch = 4, (16 if big and device.type == "cpu" else 32)
        data = random_data(n, size)
        t_bare, t_ours, ratio, paired = side_by_side(
            partial(bare_forward, model, data, n_views, batch, device),
            partial(scored, model, data, n_views, batch, device),
            args.repeats,
        )
        images = n * n_views
        n_sites = len(memprune.find_sites(model, "units", input_size=(3, size, size)))
        print(
            f"\n[{key}] {n_sites} unit sites, N={n}, K={n_views},"
            f" batch {batch} points ({batch * n_views} images)"
        )
        print(f"  bare forward   {images / t_bare:9.1f} img/s")
        print(
            f"  unit_mem       {images / t_ours:9.1f} img/s"
            f"   throughput ratio {ratio:.3f} best-of, {paired:.3f} median of pairs (target >= 0.9)"
        )

        small = 8 if big and device.type == "cpu" else 16
        sdata = random_data(small, size)
        ref = reference_way(model, sdata, 2, device)
        fast = min(scored(model, sdata, 2, batch, device) for _ in range(2))
        print(
            f"  reference way  N={small}, K=2: {ref:.2f} s vs unit_mem {fast:.3f} s"
            f"   speedup {ref / fast:.1f}x"
        )

        mem_n = (200, 2000) if args.quick else (500, 5000)
        mem_views = 1 if big else 2
        mem = {}
        for rest in ("mean", "median"):
            lo = peak_memory(key, mem_n[0], mem_views, rest, args.device)
            hi = peak_memory(key, mem_n[1], mem_views, rest, args.device)
            field = "cuda_mb" if device.type == "cuda" else "rss_mb"
            mem[rest] = (lo[field], hi[field])
            target = "  (target < 10%)" if rest == "mean" else ""
            print(
                f"  peak memory {rest:6s} N={mem_n[0]}: {lo[field]:8.1f} MB  N={mem_n[1]}:"
                f" {hi[field]:8.1f} MB   growth {100 * (hi[field] / lo[field] - 1):+.1f}%{target}"
            )
            if device.type == "cpu":
                print(
                    f"    scoring's own memory (peak - RSS before the call): {lo['call_mb']:.1f} MB"
                    f" vs {hi['call_mb']:.1f} MB"
                )
        rows.append((key, ratio, ref / fast, 100 * (mem["mean"][1] / mem["mean"][0] - 1)))
    print("\nsummary: model, throughput ratio, speedup vs reference way, mean-mode memory growth")
    for key, ratio, speedup, growth in rows:
        print(f"  {key:14s} {ratio:6.3f} {speedup:8.1f}x {growth:+6.1f}%")


if __name__ == "__main__":
    main()
