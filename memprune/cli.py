"""The ``memprune`` command: parse arguments, make a config, call one library function.

Errors a user can fix (:class:`MemPruneError`) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from memprune.errors import MemPruneError

DEFAULT_MODEL = "resnet18"
DEFAULT_DATA = "digits"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="timm model name (default: %(default)s)")
    p.add_argument("--checkpoint", default=None, help="weights: .safetensors or torch state dict")
    p.add_argument(
        "--img-size", type=int, default=32, help="input resolution (default: %(default)s)"
    )
    p.add_argument("--trust-pickle", action="store_true", help="allow pickled checkpoints (unsafe)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", default=DEFAULT_DATA, help="data set name or image folder (default: %(default)s)"
    )
    p.add_argument("--root", default=None, help="folder of a torchvision data set's files")
    p.add_argument(
        "--split", default="train", choices=("train", "test"), help="(default: %(default)s)"
    )


def _encoder(args):
    from memprune.encoders import load_encoder

    return load_encoder(
        args.model,
        checkpoint=args.checkpoint,
        img_size=args.img_size,
        trust_pickle=args.trust_pickle,
    )


def _dataset(args):
    from memprune.data import load_dataset

    img_size = None if args.data == "digits" else args.img_size
    return load_dataset(args.data, split=args.split, root=args.root, img_size=img_size)


def cmd_sites(args: argparse.Namespace) -> int:
    """List the unit and layer sites and push one batch of views through them."""
    import torch

    from memprune._table import format_table
    from memprune.data import MultiView
    from memprune.encoders import normalization
    from memprune.hooks import capture
    from memprune.sites import find_sites

    model = _encoder(args)
    data = _dataset(args)
    sites = find_sites(model, "units") + find_sites(model, "layers")
    views = MultiView(data, n_views=args.views, seed=args.seed)
    batch = torch.stack([views[i][0] for i in range(min(args.batch_size, len(views)))])
    b, k = batch.shape[:2]  # [B, K, 3, H, W]
    mean, std = normalization(model)
    x = (batch.flatten(0, 1) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.inference_mode(), capture(model, sites) as acts:
        out = model(x)
    rows = [
        (
            s.name,
            s.kind,
            s.role,
            s.n_units,
            "x".join(map(str, acts.shapes[s.name])),
            tuple(acts[s.name].shape),
        )
        for s in sites
    ]
    n_params = sum(p.numel() for p in model.parameters())
    shape = tuple(x.shape[1:])
    print(
        f"{args.model}: {n_params / 1e6:.2f}M parameters, input {shape}, output dim {out.shape[1]}"
    )
    print(f"{data.name} ({args.split}): {len(data)} images; one batch of {b} points x {k} views\n")
    print(format_table(["site", "kind", "role", "units", "output shape", "captured"], rows))
    n_units = sum(s.n_units for s in sites if s.kind == "units")
    print(
        f"\n{sum(s.kind == 'units' for s in sites)} unit sites ({n_units} units),"
        f" {sum(s.kind == 'layers' for s in sites)} layer sites"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memprune",
        description="Localize memorization in vision encoders and act on it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sites", help="list an encoder's unit and layer sites")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--views", type=int, default=4, help="views per point (default: %(default)s)")
    p.add_argument(
        "--batch-size", type=int, default=8, help="points in the batch (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="view seed (default: %(default)s)")
    p.set_defaults(func=cmd_sites)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MemPruneError as err:
        print(f"memprune {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
