"""Output directories: never silently overwritten, and an interrupted command can be rerun.

A command that writes into ``--out`` first leaves a marker file there naming the command and its
arguments, and marks it finished as its very last write. Rerunning the same command with the
same arguments on a directory whose marker is unfinished (the process was killed) redoes the
work and overwrites its own partial outputs, so the result equals an uninterrupted run. Every
other non-empty directory is refused unless ``--force`` is given.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from memprune._io import read_json, write_json
from memprune.errors import ConfigError

#: The marker a command leaves in its output directory.
MARKER = ".memprune-output.json"


@dataclass(frozen=True)
class OutputDir:
    """An output directory opened by :func:`open_output`.

    Attributes:
        path: the directory.
        overwrite: whether existing outputs may be replaced (``--force``, or finishing an
            interrupted run of the same command).
    """

    path: Path
    overwrite: bool

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    def finish(self) -> None:
        """Mark the command finished (call after its last output is written)."""
        marker = read_json(self.path / MARKER)
        write_json(self.path / MARKER, {**marker, "finished": True})


def check_writable(path: Path) -> None:
    """Refuse a path that cannot become a writable directory, without creating anything."""
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(
            f"cannot create --out {path}: {ancestor} is a file, not a directory;"
            " choose a path under a directory"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(
            f"cannot write to --out {path}: {ancestor} is not writable;"
            " choose a directory you can write to"
        )


def read_marker(path: str | os.PathLike) -> dict | None:
    """The marker of a memprune output directory (``command``, ``finished``), or None."""
    try:
        return read_json(Path(path) / MARKER)
    except (OSError, ValueError):
        return None


def _interrupted(path: Path, command: dict) -> bool:
    """Whether ``path`` holds an unfinished run of exactly ``command``."""
    marker = read_marker(path)
    return marker is not None and not marker.get("finished", False) and (
        marker.get("command") == _plain(command))  # fmt: skip


def _plain(command: dict) -> dict:
    """``command`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(command))


def check_output(path: str | os.PathLike, command: dict, force: bool = False) -> bool:
    """Check, without writing anything, that ``path`` may receive the outputs of ``command``
    (the command name and its arguments, JSON-serializable); returns whether existing outputs
    may be overwritten.

    A new or empty directory is fine; a directory holding an unfinished run of the same command
    is reused (overwrite); any other non-empty directory is refused unless ``force``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} exists and is not a directory: choose a directory")
    resumed = path.is_dir() and _interrupted(path, command)
    if path.is_dir() and any(path.iterdir()) and not (force or resumed):
        marker = path / MARKER
        what = "the outputs of another command or other arguments" if marker.is_file() else (
            "files memprune did not write")  # fmt: skip
        raise ConfigError(
            f"output directory {path} already exists and holds {what}: choose another --out,"
            " or pass --force to write into it"
        )
    check_writable(path)
    return force or resumed


def open_output(path: str | os.PathLike, command: dict, force: bool = False) -> OutputDir:
    """Create (or reuse, see :func:`check_output`) the output directory of one command run and
    leave the unfinished marker in it. Call it once every input has been validated and just
    before the first output is written, so that a bad input leaves nothing behind. With
    ``force``, a directory that holds a previous memprune output is emptied first, so that
    none of that output (a pruned encoder of another ratio) passes for this one's; a folder
    memprune did not write is written into and nothing in it removed."""
    overwrite = check_output(path, command, force)
    path = Path(path)
    if force and (path / MARKER).is_file():  # a previous memprune output: none of it stays
        for child in path.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / MARKER, {"command": _plain(command), "finished": False})
    return OutputDir(path, overwrite=overwrite)
