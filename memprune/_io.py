"""Atomic file writes: a file is either absent or complete, never half-written."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from memprune._dist import is_main
from memprune.errors import OutputError


def _file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (mkstemp's 0600 would
    hide every result from the other users of a shared machine)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(
    path: str | os.PathLike, write: Callable[[str], None], suffix: str = ".tmp"
) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` in one rename (``suffix``
    ends the temporary name, for writers that insist on an extension).

    Under a launcher only the main process writes; the others return ``path`` at once (they
    hold the same results, and one writer per file is what keeps a file whole).
    """
    path = Path(path)
    if not is_main():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        refused = _refused(err)
        if refused:
            raise OutputError(f"cannot write {path}: {refused}") from None
        raise
    return path


#: what a file system's refusal to write means, and the fix
_FULL = (
    "the disk is full, or a file size limit (ulimit -f) was reached: free space or write elsewhere"
)
_REFUSALS = {errno.ENOSPC: _FULL, errno.EFBIG: _FULL, errno.EDQUOT: "the disk quota is used up",
             errno.EROFS: "the file system is read-only: write elsewhere",
             errno.EACCES: "permission denied: write elsewhere"}  # fmt: skip


def _refused(err: BaseException) -> str | None:
    """Why the file system refused a write (an ``OSError``, or safetensors' own error that
    wraps one), or None for any other error."""
    if isinstance(err, OSError) and err.errno in _REFUSALS:
        return _REFUSALS[err.errno]
    if type(err).__name__ == "SafetensorError":  # its message quotes the OS error's code
        text = str(err)
        for code, why in _REFUSALS.items():
            if f"(os error {code})" in text or f"code: {code}," in text:
                return why
    return None


def write_text(path: str | os.PathLike, text: str) -> Path:
    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return atomic_write(path, _write)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    from safetensors.torch import save_file

    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(clean, tmp, metadata=dict(metadata or {})))


def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on, for the metadata of saved files."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("memprune", "torch", "torchvision", "timm", "torch-pruning", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _stem(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def save_result(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: dict, kind: str
) -> Path:
    """A result as ``PATH.safetensors`` (tensors) and ``PATH.json`` (metadata), atomically.
    ``path`` may name either file or their common stem."""
    stem = _stem(path)
    write_safetensors(stem.with_suffix(".safetensors"), tensors, {"kind": kind})
    write_json(stem.with_suffix(".json"), meta)
    return stem


def load_result(path: str | os.PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata written by :func:`save_result` (tensors read with
    safetensors: nothing is unpickled)."""
    from safetensors.torch import load_file

    from memprune.errors import ConfigError

    stem = _stem(path)
    if not stem.with_suffix(".safetensors").is_file():
        raise ConfigError(
            f"no {kind} result at {stem}.safetensors (save writes PATH.safetensors and PATH.json)"
        )
    return load_file(str(stem.with_suffix(".safetensors"))), read_json(stem.with_suffix(".json"))
