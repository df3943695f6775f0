"""Export a (pruned) encoder as a ``torch.export`` program, and optionally to ONNX, checked
against the eager model."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from memprune._io import atomic_write
from memprune.encoders import evaluating, input_size
from memprune.errors import ConfigError

PROGRAM = "encoder.pt2"
ONNX = "encoder.onnx"


def _check_onnx() -> None:
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"ONNX export needs the {' and '.join(missing)} package(s), which are not installed:"
            " pip install 'memprune[onnx]' (or drop onnx=True / --onnx)"
        )


def export_encoder(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor | None = None,
    onnx: bool = False,
    atol: float = 1e-4,
) -> dict:
    """Write ``PATH/encoder.pt2`` (``torch.export`` of ``model`` in eval mode, any batch size;
    read it back with ``torch.export.load``) and, with ``onnx``, ``PATH/encoder.onnx``.

    Each exported program is run on a fresh batch of 3 and compared with the eager model; a
    largest absolute difference above ``atol`` is an error (nothing is left half-written).
    Returns ``{"program": path, "onnx": path or None, "max_abs_diff": float}``.
    """
    if onnx:
        _check_onnx()
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"{path} is a file: export_encoder writes a directory (encoder.pt2, encoder.onnx);"
            " pass a directory's path"
        )
    path.mkdir(parents=True, exist_ok=True)
    param = next(model.parameters())
    size = tuple(example_input.shape[1:]) if example_input is not None else input_size(model)
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0)).to(param.device)
    check = torch.randn(3, *size, generator=torch.Generator().manual_seed(1)).to(param.device)
    batch = torch.export.Dim("batch", min=1)
    with evaluating(model), torch.no_grad():
        program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
        eager = model(check)
        diff = (program.module()(check) - eager).abs().max().item()
        if diff > atol:
            raise ConfigError(
                f"the exported program differs from the eager model by {diff:.2e} (> atol="
                f"{atol}): this model does not export faithfully; report it with the model name"
            )
        atomic_write(path / PROGRAM, lambda tmp: torch.export.save(program, tmp), ".pt2")
        out = {"program": str(path / PROGRAM), "onnx": None, "max_abs_diff": diff}
        if onnx:
            atomic_write(path / ONNX, lambda tmp: torch.onnx.export(
                model, (x,), tmp, dynamo=True, dynamic_shapes=({0: batch},)), ".onnx")  # fmt: skip
            out["onnx"] = str(path / ONNX)
    return out


def exported_module(path: str | os.PathLike) -> nn.Module:
    """The module of an exported program written by :func:`export_encoder` (a directory or
    the ``.pt2`` file)."""
    path = Path(path)
    file = path / PROGRAM if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{file} holds no exported program: export with export_encoder first")
    return torch.export.load(file).module()
