"""What structured pruning buys, and what recovery costs, measured side by side in one run.

1. For one small member of every supported timm family (ResNet, MobileNetV3, EfficientNet,
   ConvNeXt, RegNet, ViT), units are removed by magnitude (layer scope, output width kept;
   ViTs: MLP neurons, then also attention heads, then also the embedding width), and the
   unpruned and the pruned encoder run the same batch alternately. Prints parameters and MACs
   after / before (torch-pruning's counter), the latency ratio pruned / unpruned (best of the
   repeats, and the median of the per-pair ratios) and the latency of the pruned encoder's
   ``torch.export`` program against its eager module. Zeroing weights would leave every ratio
   at 1.0.
2. Recovery cost: seconds of one distillation-recovery epoch of the pruned demo-size encoder
   against one SimCLR pretraining epoch of the unpruned one, on the same data, alternately.

Usage: python benchmarks/prune_speed.py [--device cuda] [--large] [--quick] [--batch 64]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from _common import describe, make_model, random_data, side_by_side, timed

import memprune
from memprune.encoders import resolve_device
from memprune.pruning import export_encoder, exported_module, recover

FAMILIES = ["resnet18@32", "mobilenetv3_small_050@64", "efficientnet_b0@64", "convnext_atto@64",
            "regnetx_002@64", "vit_tiny@32"]  # fmt: skip


def forward(model, x, device, reps: int):
    def run():
        with torch.inference_mode():
            for _ in range(reps):
                model(x)

    return lambda: timed(run, device)


def variants(key: str, ratio: float):
    yield f"{ratio:.0%} units", {}
    if "vit" in key:
        yield f"{ratio:.0%} + heads", {"heads": True}
        yield f"{ratio:.0%} + heads + width", {"heads": True, "keep_output_width": False}


def speed(keys, ratios, device, batch, repeats, reps) -> None:
    head = f"{'model':<26}{'pruned':<20}{'params':>8}{'MACs':>8}{'latency':>9}{'median':>8}"
    print(head + f"{'export/eager':>14}\n" + "-" * (len(head) + 14))
    for key in keys:
        model, size = make_model(key)
        model = model.to(device).eval()
        x = torch.randn(batch, 3, size, size, device=device)
        for ratio in ratios:
            for what, options in variants(key, ratio):
                pruned, report = memprune.prune(model, ratio=ratio, strategy="magnitude",
                                                latency_batch=None, **options)  # fmt: skip
                base, ours = forward(model, x, device, reps), forward(pruned, x, device, reps)
                best_a, best_b, _, median = side_by_side(base, ours, repeats)
                with tempfile.TemporaryDirectory() as tmp:
                    export_encoder(pruned, tmp)
                    program = exported_module(tmp)
                    _, best_e, _, _ = side_by_side(ours, forward(program, x, device, reps),
                                                   repeats)  # fmt: skip
                p = report.params[1] / report.params[0]
                m = report.macs[1] / report.macs[0]
                print(f"{key:<26}{what:<20}{p:>8.3f}{m:>8.3f}{best_b / best_a:>9.3f}"
                      f"{1 / median:>8.3f}{best_e / best_b:>14.3f}")  # fmt: skip
    print(
        "params, MACs, latency: pruned / unpruned; export/eager: the pruned encoder's exported"
        " program / its eager module (lower is smaller / faster)"
    )


def recovery_cost(device, repeats: int) -> None:
    """One distillation epoch of the half-pruned demo encoder vs one SimCLR epoch."""
    data = random_data(512, 32)
    torch.manual_seed(0)
    tiny = {"channels": (8, 16, 32, 64)}
    teacher = memprune.load_encoder("resnet18", img_size=32, **tiny).to(device).eval()
    pruned, _ = memprune.prune(teacher, ratio=0.5, strategy="magnitude", latency_batch=None)

    def distill():
        return timed(lambda: recover(pruned, teacher, data=data, epochs=1, batch_size=128,
                                     progress=False), device)  # fmt: skip

    def pretrain():
        with tempfile.TemporaryDirectory() as tmp:
            return timed(lambda: memprune.pretrain_simclr(
                "resnet18", data, epochs=1, batch_size=128, img_size=32, out_dir=tmp,
                progress=False, **tiny), device)  # fmt: skip

    best_p, best_r, ratio, median = side_by_side(pretrain, distill, repeats)
    print(f"\nrecovery cost (resnet18 tiny @32, 512 points, batch 128): one distillation epoch"
          f" {best_r:.2f} s, one SimCLR pretraining epoch {best_p:.2f} s; recovery / pretraining"
          f" {best_r / best_p:.3f} (median of pairs {1 / median:.3f})")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--large", action="store_true", help="resnet50 / vit_small at 224 px")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    device = resolve_device(args.device)
    keys = ["resnet50@224", "vit_small@224"] if args.large else FAMILIES
    repeats, reps = (3, 1) if args.quick else (7, 3)
    print(describe(device), f"batch {args.batch}, {repeats} x {reps} forward passes per timing")
    speed(keys, [0.5] if args.quick else [0.3, 0.5], device, args.batch, repeats, reps)
    recovery_cost(device, 2 if args.quick else 3)


if __name__ == "__main__":
    main()
