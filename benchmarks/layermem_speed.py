"""LayerMem speed, measured side by side in one run (issue 4).

Prints, per model:
1. ``layer_mem`` over all layer sites (+ output) of f and g vs the bare forward passes of
   both encoders over the same views and batch size (target >= 0.85 on CPU);
2. the reference code's way (one truncated model per layer, one image per pass: here the
   full model stopped right after the layer) vs ``layer_mem`` on a small N: the speedup.

Usage: python benchmarks/layermem_speed.py [--device cuda] [--large] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from functools import partial

import torch
import torch.nn.functional as F
from _common import Stop, describe, make_model, random_data, side_by_side, timed
from torch.utils.data import DataLoader

import memprune
from memprune.engine import Normalizer, resolve_normalize
from memprune.hooks import capture, layer_reducer
from memprune.scores.sslmem import PairedViews
from memprune.sites import output_site


def pair(key: str):
    f, size = make_model(key)
    torch.manual_seed(1)
    g = copy.deepcopy(f)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return f, g, size


def bare(f, g, data, n_views, batch_size, device) -> float:
    views = PairedViews(data, n_views, "views", "none", 0)
    norm = Normalizer(resolve_normalize(f, "auto"), device)
    f.to(device).eval(), g.to(device).eval()

    def run():
        with torch.inference_mode():
            for batch, _, _ in DataLoader(views, batch_size=batch_size):
                x = norm(batch.to(device).flatten(0, 1))
                f(x)
                g(x)

    return timed(run, device)


def scored(f, g, data, n_views, batch_size, device) -> float:
    kw = dict(n_pairs=n_views, chunk_size=batch_size, augment="none", device=device, progress=False)
    return timed(lambda: memprune.layer_mem(f, g, data, **kw), device)


def _stop(*_):
    raise Stop


def reference_way(f, g, data, n_views, device) -> float:
    """Per layer, per encoder, per point: each view through the model alone, stopped after
    the layer; then the pair distances."""
    size = tuple(data[0][0].shape)
    sites = [*memprune.find_sites(f, "layers", input_size=size), output_site(f.num_features)]
    views = PairedViews(data, n_views, "views", "none", 0)
    norm = Normalizer(resolve_normalize(f, "auto"), device)

    def run():
        with torch.inference_mode():
            for site in sites:
                rep = layer_reducer(site, "flatten")
                for model in (f, g):
                    module = dict(model.named_modules())[site.module]
                    with capture(model, [site], reduce=rep) as acts:
                        handle = module.register_forward_hook(_stop)
                        if site.module == "":  # the output: nothing to stop
                            handle.remove()
                        try:
                            for p in range(len(views)):
                                v, _, _ = views[p]
                                h = []
                                for k in range(2 * n_views):
                                    with contextlib.suppress(Stop):
                                        model(norm(v[k : k + 1].to(device)))
                                    h.append(F.normalize(acts[site.name], dim=1))
                                float(
                                    torch.stack(
                                        [(h[2 * i] - h[2 * i + 1]).norm() for i in range(n_views)]
                                    ).mean()
                                )
                        finally:
                            handle.remove()

    return timed(run, device)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--large", action="store_true", help="add ResNet-50 and ViT-Small at 224 px")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    keys = ["resnet18@32", "vit_tiny@32"] + (
        ["resnet50@224", "vit_small@224"] if args.large else []
    )
    print(describe(device))
    rows = []
    for key in keys:
        f, g, size = pair(key)
        big = size > 64
        n = 64 if args.quick else (512 if device.type == "cuda" or not big else 32)
        n_views, batch = 2, 32  # 2 pairs = 4 views per point: 128 images per pass per encoder
        data = random_data(n, size)
        t_bare, t_ours, ratio, paired = side_by_side(
            partial(bare, f, g, data, n_views, batch, device),
            partial(scored, f, g, data, n_views, batch, device),
            args.repeats,
        )
        images = n * 2 * n_views * 2  # views x encoders
        n_layers = len(memprune.find_sites(f, "layers", input_size=(3, size, size))) + 1
        print(f"\n[{key}] {n_layers} layers (incl. output), N={n}, K={n_views} pairs,"
              f" batch {batch} points")  # fmt: skip
        print(f"  bare forward f+g {images / t_bare:9.1f} img/s")
        print(f"  layer_mem        {images / t_ours:9.1f} img/s   ratio {ratio:.3f} best-of,"
              f" {paired:.3f} median of pairs (target >= 0.85)")  # fmt: skip
        small = 8
        sdata = random_data(small, size)
        ref = reference_way(f, g, sdata, n_views, device)
        fast = min(scored(f, g, sdata, n_views, batch, device) for _ in range(2))
        print(f"  reference way    N={small}: {ref:.2f} s vs layer_mem {fast:.3f} s"
              f"   speedup {ref / fast:.1f}x")  # fmt: skip
        rows.append((key, ratio, paired, ref / fast))
    print("\nsummary: model, ratio best-of, ratio median of pairs, speedup vs reference way")
    for key, ratio, paired, speedup in rows:
        print(f"  {key:14s} {ratio:6.3f} {paired:6.3f} {speedup:8.1f}x")


if __name__ == "__main__":
    main()
