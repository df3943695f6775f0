"""Output directories are never silently overwritten."""

from __future__ import annotations

import os
from pathlib import Path

from memprune.errors import ConfigError


def prepare_out_dir(path: str | os.PathLike, force: bool = False) -> Path:
    """Create ``path``; refuse a non-empty existing directory unless ``force``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise ConfigError(
            f"output directory {path} already exists and is not empty: choose another --out,"
            " or pass --force to write into it"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path
