"""Named options: one registry per concept, from which the CLI and the recipes take their choices.

A :class:`Registry` is a dict from a name to its implementation (a class, a function, or the
value a library expects). Looking up an unknown name raises a :class:`ConfigError` that lists
the valid ones, so every layer reports a bad option the same way.
"""

from __future__ import annotations

from typing import Any

from memprune.errors import ConfigError


class Registry(dict):
    """``name -> implementation`` for one ``concept`` (e.g. ``"pruning strategy"``)."""

    def __init__(self, concept: str, entries: dict[str, Any]) -> None:
        super().__init__(entries)
        self.concept = concept

    def __missing__(self, name: str):
        raise ConfigError(f"unknown {self.concept} {name!r}: use one of {', '.join(self)}")

    def check(self, name: str) -> str:
        """``name`` if it is registered, else the error listing the valid names."""
        self[name]
        return name

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self)
