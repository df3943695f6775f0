"""Throughput at ImageNet size: ResNet-50 and ViT-B/16 at 224 px, measured side by side.

For each model, in one run on one device:

* the bare forward pass (and forward + backward) on batches already on the device, in the
  precision memprune picks there (bf16 autocast on a CUDA device that supports it, fp32
  otherwise; channels_last for CNNs on CUDA): the ceiling;
* UnitMem over every unit site with ``--views`` views per point, LayerMem of a pair,
  feature extraction and one SimCLR epoch, as images per second and as a ratio to that
  ceiling (forward for the scores and the extraction, forward + backward for SimCLR);
* the views per second the SimCLR augmentation alone makes, by the DataLoader with the
  settings memprune picks on the device (the CPU side that must keep up with the encoder)
  and in batches on the device (what memprune does on CUDA), with the largest pixel
  difference between the two (the same parameters; interpolation rounding only).

The images are synthetic (drawn per index, so N images never sit in memory together) and
decoded-image cost is not included: a folder of JPEGs adds the decode to the augmentation.

On the CPU it runs the same code at small N and says so: the figures then show the overheads
of the machinery, not what a GPU reaches. Usage:

    python benchmarks/scale.py --device cuda                # ResNet-50 and ViT-B/16, N=2048
    python benchmarks/scale.py                              # CPU, N=8, 2 views
    python benchmarks/scale.py --models resnet18 --img-size 32 --n 4   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch
from _common import timed
from torch.utils.data import DataLoader, Dataset, Subset

import memprune
from memprune.data import MultiView, loop_views
from memprune.engine import autocast_dtype, loader_options, uses_channels_last
from memprune.probe import extract_features

MODELS = {"resnet50": "resnet50", "vit_b16": "vit_base_patch16_224"}


class Synthetic(Dataset):
    """``n`` images ``[3, size, size]`` in [0, 1], image i drawn from a generator seeded by i."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size
        self.name = f"synthetic{size}"

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return torch.rand(3, self.size, self.size, generator=g), i % 10, i


def bare(model, device, size: int, batch: int, steps: int, backward: bool) -> float:
    """Images per second of the bare forward (+ backward) pass in memprune's precision."""
    dtype = autocast_dtype("auto", device)
    nhwc = uses_channels_last(model, device)
    model = model.to(device)
    model.to(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    model.train(backward)
    x = torch.rand(batch, 3, size, size, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if nhwc else x
    autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=bool(dtype))

    def step():
        if backward:
            with autocast:
                loss = model(x).float().pow(2).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), autocast:
                model(x)

    step()  # warm-up: cuDNN autotuning, allocator
    seconds = timed(lambda: [step() for _ in range(steps)], device)
    model.to(memory_format=torch.contiguous_format).eval()
    return batch * steps / seconds


def views_per_second(data, n_views: int, chunk: int, device, place: str) -> tuple[float, dict]:
    """Views per second the SimCLR augmentation makes, ready on ``device``: by the DataLoader
    (``host``) or in batches on the device (``device``), with memprune's loader settings."""
    views, make = loop_views(MultiView(data, n_views, "simclr"), device, place)
    options = loader_options(device)
    loader = DataLoader(views, batch_size=chunk, **options)
    seconds = timed(lambda: [make(batch) for batch, _, _ in loader], device)
    return len(data) * n_views / seconds, options


def view_difference(data, n_views: int, chunk: int, device) -> dict:
    """Largest and mean absolute pixel difference between the same views made on the host
    and in batches on ``device`` (the same parameters; interpolation rounding only)."""
    part = Subset(data, range(min(chunk, len(data))))
    host = torch.cat(
        [
            batch.flatten(0, 1)
            for batch, _, _ in DataLoader(MultiView(part, n_views, "simclr"), batch_size=chunk)
        ]
    )
    views, make = loop_views(MultiView(part, n_views, "simclr"), device, "device")
    made = torch.cat([make(batch).cpu() for batch, _, _ in DataLoader(views, batch_size=chunk)])
    diff = (made - host).abs()
    return {"max": float(diff.max()), "mean": float(diff.mean())}


def measure(key: str, args, device: torch.device) -> dict:
    name = MODELS.get(key, key)
    size, n, views, chunk = args.img_size, args.n, args.views, args.chunk
    model = memprune.load_encoder(name, img_size=size)
    data = Synthetic(n, size)
    row = {"model": name, "img_size": size, "n": n, "views": views,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}  # fmt: skip
    row["precision"] = "bf16" if autocast_dtype("auto", device) else "fp32"
    row["channels_last"] = uses_channels_last(model, device)
    batch = chunk * views
    row["forward_img_s"] = bare(model, device, size, batch, args.steps, backward=False)
    row["train_img_s"] = bare(model, device, size, args.train_batch * 2, args.steps, True)
    run = dict(device=device, progress=False)

    t = timed(lambda: memprune.unit_mem(model, data, n_views=views, chunk_size=chunk, **run),
              device)  # fmt: skip
    row["unitmem_img_s"] = n * views / t
    row["unitmem_s"] = t
    g = memprune.load_encoder(name, img_size=size)  # another init: a reference encoder
    pairs = max(1, views // 2)  # two views per pair: as many images per point as UnitMem
    t = timed(lambda: memprune.layer_mem(model, g, data, n_pairs=pairs, chunk_size=chunk,
                                         **run), device)  # fmt: skip
    row["layermem_img_s"] = n * pairs * 2 * 2 / t  # points x pairs x 2 views x 2 encoders
    t = timed(lambda: extract_features(model, data, chunk_size=batch, **run), device)
    row["features_img_s"] = n / t
    with tempfile.TemporaryDirectory() as tmp:
        t = timed(lambda: memprune.pretrain_simclr(
            name, data, epochs=1, batch_size=args.train_batch, img_size=size, out_dir=tmp,
            progress=False), device)  # fmt: skip
    row["simclr_img_s"] = (n // args.train_batch) * args.train_batch * 2 / t
    row["views_s"], options = views_per_second(data, views, chunk, device, "host")
    row["device_views_s"], _ = views_per_second(data, views, chunk, device, "device")
    row["view_difference"] = view_difference(data, views, chunk, device)
    row["loader"] = options
    for what in ("unitmem", "layermem", "features"):
        row[f"{what}_ratio"] = row[f"{what}_img_s"] / row["forward_img_s"]
    row["simclr_ratio"] = row["simclr_img_s"] / row["train_img_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--n", type=int, default=None, help="points (CPU 8, GPU 2048)")
    parser.add_argument("--views", type=int, default=None, help="views (CPU 2, GPU 10)")
    parser.add_argument("--chunk", type=int, default=None, help="points per forward pass")
    parser.add_argument("--train-batch", type=int, default=None, help="SimCLR batch (points)")
    parser.add_argument("--steps", type=int, default=None, help="timed bare passes")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    defaults = dict(n=2048 if gpu else 8, views=10 if gpu else 2, chunk=32 if gpu else 4,
                    train_batch=256 if gpu else 4, steps=20 if gpu else 2)  # fmt: skip
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    where = torch.cuda.get_device_name(device) if gpu else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {device} ({where}), {platform.processor() or 'cpu'}")
    if not gpu:
        print(f"CPU mode: N={args.n} points x {args.views} views at {args.img_size} px. These are"
              " small-N figures of the machinery on this CPU, not GPU throughput.")  # fmt: skip
    rows = []
    for key in args.models:
        row = measure(key, args, device)
        rows.append(row)
        print(f"\n{row['model']} @ {row['img_size']} px ({row['params_m']:.1f} M params,"
              f" {row['precision']}, channels_last={row['channels_last']}):")  # fmt: skip
        print(f"  bare forward        {row['forward_img_s']:9.1f} img/s")
        print(f"  bare fwd+bwd        {row['train_img_s']:9.1f} img/s")
        for what, label in (("unitmem", f"UnitMem {args.views} views"), ("layermem", "LayerMem"),
                            ("features", "features")):  # fmt: skip
            print(f"  {label:19s} {row[what + '_img_s']:9.1f} img/s"
                  f"  {row[what + '_ratio']:.2f} x forward")  # fmt: skip
        print(f"  SimCLR epoch        {row['simclr_img_s']:9.1f} img/s"
              f"  {row['simclr_ratio']:.2f} x fwd+bwd")  # fmt: skip
        print(f"  augmentation alone  {row['views_s']:9.1f} views/s"
              f"  (host: DataLoader, {row['loader']['num_workers']} workers)")  # fmt: skip
        diff = row["view_difference"]
        print(f"  augmentation alone  {row['device_views_s']:9.1f} views/s  (batched on {device};"
              f" pixels within {diff['max']:.1e} of host, mean {diff['mean']:.1e})")  # fmt: skip
        fifty = 50_000 * 10 / row["unitmem_img_s"]
        print(f"  -> 50,000 images x 10 views of UnitMem at this rate: {fifty / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": where, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
