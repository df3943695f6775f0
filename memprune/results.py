"""The result protocol every memprune result follows.

A result has a ``kind`` (``"unitmem"``, ``"layermem"``, ...), a ``meta`` dict recording how it
was made, ``to_rows()`` for tables, and ``save(path)`` / ``load(path)``: tensors go to
``PATH.safetensors``, everything else to ``PATH.json``, both written atomically, nothing
pickled. ``load`` refuses a file of another kind, naming both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import torch

from memprune._io import load_result, save_result
from memprune.errors import ConfigError


class Result:
    """Base of every result. Subclasses set ``kind`` and implement ``to_rows``, ``_tensors``
    (what goes to safetensors), ``_fields`` (what else goes to JSON besides ``meta``) and
    ``_build`` (the inverse of both)."""

    kind: ClassVar[str] = ""
    meta: dict

    def to_rows(self) -> list[dict]:
        raise NotImplementedError

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def _fields(self) -> dict:
        return {}

    @classmethod
    def _build(cls, tensors: dict[str, torch.Tensor], fields: dict, meta: dict):
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``PATH.safetensors`` and ``PATH.json`` atomically; returns the common stem."""
        record = {"kind": self.kind, "fields": self._fields(), "meta": self.meta}
        return save_result(path, self._tensors(), record, self.kind)

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Read a result written by :meth:`save` (refusing one of another kind)."""
        tensors, record = load_result(path, cls.kind)
        found = record.get("kind") if isinstance(record, dict) else None
        if found != cls.kind or "fields" not in record:
            raise ConfigError(
                f"{path} holds a {found or 'non-memprune'} result, not {cls.kind}: load it"
                f" with the result class of {found or 'its own kind'}"
                f" (e.g. memprune.load_result), not {cls.__name__}"
            )
        try:
            return cls._build(tensors, record["fields"], record["meta"])
        except KeyError as err:  # the .json names what the .safetensors lacks
            raise ConfigError(
                f"{path}: the .json names {err.args[0]!r}, which its .safetensors lacks: the two"
                " files were not saved together (or one was edited); compute the result again"
            ) from None


def load_any(path: str | os.PathLike) -> Result:
    """Any saved result, as the class its file names."""
    from memprune._io import read_json

    stem = Path(path)
    stem = stem.with_suffix("") if stem.suffix in (".json", ".safetensors") else stem
    json_path = stem.with_suffix(".json")
    if not json_path.is_file():
        raise ConfigError(f"no result at {stem} ({json_path.name} missing)")
    kind = read_json(json_path).get("kind")
    classes = {c.kind: c for c in _subclasses(Result) if c.kind}
    if kind not in classes:
        raise ConfigError(f"{json_path} holds no memprune result (kind {kind!r})")
    return classes[kind].load(stem)


def _subclasses(cls) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out
