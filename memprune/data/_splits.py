"""Disjoint, seeded index sets for the encoder pair f and g (docs/method.md §4).

f is trained on ``shared ∪ candidate``, g on ``shared ∪ extra``; ``test`` is held out from both.
Canaries (appended to the data set, docs/method.md §8b) each get a seeded coin: the
``included`` ones join f's training set; g never sees a canary.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from memprune._io import read_json, write_json
from memprune.errors import ConfigError

PARTS = ("shared", "candidate", "extra", "test")
#: Every index set a splits file names: its parts, the canaries (those included in f's
#: training and those excluded), and the training sets of f and g.
SETS = (*PARTS, "canaries", "included", "excluded", "f", "g")


def _count(value: int | float, n: int, name: str) -> int:
    """An int is a count, a float a fraction of ``n``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a count (int) or a fraction (float), got {value!r}")
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name}={value} is a fraction outside [0, 1]; give counts as ints")
        return round(value * n)
    if value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")
    return value


@dataclass(frozen=True)
class Splits:
    """Disjoint sorted index lists into a data set of ``n`` points."""

    n: int
    shared: list[int] = field(default_factory=list)
    candidate: list[int] = field(default_factory=list)
    extra: list[int] = field(default_factory=list)
    test: list[int] = field(default_factory=list)
    seed: int | None = None
    canaries: list[int] = field(default_factory=list)
    included: list[int] = field(default_factory=list)
    #: how many times each included canary appears in f's training set per epoch
    repeat: int = 1
    #: what makes the canaries' images (kind, seed, strength), so that a run that reads this
    #: split with other canaries is refused rather than scoring images f never saw
    canary_spec: dict | None = None

    def __post_init__(self) -> None:
        if isinstance(self.repeat, bool) or not isinstance(self.repeat, int) or self.repeat < 1:
            raise ConfigError(f"splits: repeat must be an int >= 1, got {self.repeat!r}")
        if not set(self.included) <= set(self.canaries):
            raise ConfigError("splits: every included canary must be one of the canaries")
        seen: dict[int, str] = {}
        for part in (*PARTS, "canaries"):
            for i in getattr(self, part):
                if not 0 <= i < self.n:
                    raise ConfigError(f"split {part!r} holds index {i}, outside [0, {self.n})")
                if i in seen:
                    raise ConfigError(
                        f"splits overlap: index {i} is in both {seen[i]!r} and {part!r};"
                        " shared, candidate, extra and test must be disjoint"
                    )
                seen[i] = part

    @property
    def f_indices(self) -> list[int]:
        """Training set of f: shared ∪ candidate ∪ the included canaries."""
        return sorted(self.shared + self.candidate + self.included)

    @property
    def f_training(self) -> list[int]:
        """What f trains on per epoch: :attr:`f_indices` with each included canary
        :attr:`repeat` times (a repeated canary is memorized more, as in Carlini et al.'s
        secret-sharer canaries)."""
        return sorted(self.shared + self.candidate + self.included * self.repeat)

    @property
    def excluded(self) -> list[int]:
        """The canaries f never saw."""
        return sorted(set(self.canaries) - set(self.included))

    @property
    def g_indices(self) -> list[int]:
        """Training set of g: shared ∪ extra."""
        return sorted(self.shared + self.extra)

    def indices(self, name: str) -> list[int]:
        """The index set ``name`` (one of :data:`SETS`)."""
        if name not in SETS:
            raise ConfigError(f"a splits file holds {', '.join(SETS)}, not {name!r}")
        derived = {"f": self.f_indices, "g": self.g_indices, "excluded": self.excluded}
        return derived[name] if name in derived else list(getattr(self, name))

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Splits:
        return cls._from_dict(read_json(path), path)

    @classmethod
    def _from_dict(cls, data: dict, path) -> Splits:
        unknown = set(data) - {"n", "seed", "repeat", "canary_spec", *PARTS, "canaries",
                               "included"}  # fmt: skip
        if unknown or "n" not in data:
            raise ConfigError(f"{path} is not a memprune splits file (keys {sorted(data)})")
        scalars = ("n", "seed", "repeat", "canary_spec")
        return cls(**{k: v if k in scalars else [int(i) for i in v] for k, v in data.items()})


def read_indices(path: str | os.PathLike, part: str | None = None) -> list[int]:
    """Indices from a JSON file: a list of ints, or a memprune splits file and which of its
    :data:`SETS` (``part``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"index file {path} does not exist")
    raw = read_json(path)
    if isinstance(raw, dict):
        if part is None:
            raise ConfigError(f"{path} is a splits file: name which of {', '.join(SETS)} to use")
        return Splits._from_dict(raw, path).indices(part)
    if not isinstance(raw, list):
        raise ConfigError(f"{path} holds neither a list of indices nor a splits file")
    return [int(i) for i in raw]


def make_splits(
    n: int,
    shared: int | float,
    candidate: int | float,
    extra: int | float,
    test: int | float = 0,
    seed: int = 0,
    canaries: int = 0,
    p: float = 0.5,
    repeat: int = 1,
) -> Splits:
    """Draw disjoint seeded index sets from ``range(n)``; sizes are counts or fractions of ``n``.

    ``canaries``: the last this many indices are canaries (:class:`memprune.data.WithCanaries`):
    the parts are drawn from the points before them (fractions too), and each canary is
    included in f's training set by its own seeded coin of probability ``p``, and appears there
    ``repeat`` times per epoch.
    """
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive int, got {n!r}")
    if isinstance(canaries, bool) or not isinstance(canaries, int) or not 0 <= canaries < n:
        raise ConfigError(f"canaries must be a count in [0, {n}), got {canaries!r}")
    if not 0 < p < 1:
        raise ConfigError(f"p (the chance a canary is included) must be in (0, 1), got {p!r}")
    base = n - canaries
    sizes = {q: _count(v, base, q) for q, v in zip(PARTS, (shared, candidate, extra, test))}
    total = sum(sizes.values())
    if total > base:
        parts = " + ".join(f"{q}={s}" for q, s in sizes.items())
        raise ConfigError(f"splits ask for {parts} = {total} points but the data set has {base}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(base)
    out, start = {}, 0
    for part in PARTS:
        out[part] = sorted(int(i) for i in perm[start : start + sizes[part]])
        start += sizes[part]
    coins = np.random.default_rng([seed, 1]).random(canaries) < p  # a stream of their own
    marked = list(range(base, n))
    included = [i for i, c in zip(marked, coins) if c]
    return Splits(n=n, seed=seed, **out, canaries=marked, included=included, repeat=repeat)
