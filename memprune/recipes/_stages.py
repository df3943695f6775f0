"""A stage is one object: when it runs, what it needs, its run, its typed result, its output
files and what the report, the findings and the seeds report read from it.

The runner (``memprune run``), the CLI verbs, ``report.md``, the findings and the report over
seeds iterate over :data:`STAGES`. Adding a stage is writing one module that calls
:func:`register` (see :mod:`memprune.recipes.stages`) and importing it there.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memprune._io import read_json
from memprune.errors import ConfigError
from memprune.registry import Registry

#: A stage's metrics, written last: its presence marks the stage finished.
DONE = "done.json"


@dataclass
class StageResult:
    """The typed result of one stage: what its ``done.json`` holds (plus ``seconds``, the
    runner's). Fields are JSON values or nested results; :meth:`from_dict` reads back
    exactly what :meth:`to_dict` wrote."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value, tp = data[f.name], hints[f.name]
            if isinstance(tp, type) and issubclass(tp, StageResult) and value is not None:
                value = tp.from_dict(value)
            kwargs[f.name] = value
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
                   and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]  # fmt: skip
        if missing:
            raise _Missing(", ".join(missing))
        return cls(**kwargs)


class _Missing(KeyError):
    """Required fields absent from a ``done.json`` (their names)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Stage:
    """One stage of a run.

    Attributes:
        name: its directory in the run and its key in ``metrics.json``.
        result: the :class:`StageResult` subclass :attr:`run` returns.
        run: ``run(ctx, out) -> result``: does the work, writes its files into ``out``.
        enabled: ``enabled(recipe) -> bool``: whether a recipe runs it.
        needs: ``needs(recipe) -> [(stage, recipe key)]``: earlier stages whose results it
            reads, each with the recipe key that may name a saved result instead (None: only
            the stage itself provides it).
        headlines: ``headlines(result) -> [sentence]`` for the report.
        values: ``values(result) -> {label: number}``: its headline numbers over seeds.
        findings: ``finding(run_dir, metrics) -> Finding`` for each claim it is judged by.
        tables: ``(file, title)`` of the tables the report shows.
        plots: ``(file, caption)`` of the plots the report shows.
        printed: the table the CLI prints when the stage is its verb's (a file in ``out``).
    """

    name: str
    result: type
    run: Callable[[Any, Path], StageResult]
    enabled: Callable[[Any], bool]
    needs: Callable[[Any], list[tuple[str, str | None]]] = lambda recipe: []
    headlines: Callable[[Any], list[str]] = lambda result: []
    values: Callable[[Any], dict[str, float]] = lambda result: {}
    findings: tuple[Callable, ...] = ()
    tables: tuple[tuple[str, str], ...] = ()
    plots: tuple[tuple[str, str], ...] = ()
    printed: str | None = None
    #: stages that keep their own progress (training checkpoints): an interrupted one is
    #: continued, not cleared
    resumable: bool = False

    def load(self, data: dict) -> StageResult:
        """The typed result of a ``done.json`` (``seconds`` aside). One written by a version
        whose result lacked fields this one records is refused, naming them, rather than read
        with blanks."""
        try:
            return self.result.from_dict({k: v for k, v in data.items() if k != "seconds"})
        except _Missing as e:
            raise ConfigError(
                f"the {self.name!r} stage's done.json lacks {e} (written by an older memprune):"
                " delete that stage's directory in the run to run it again"
            ) from None


#: Stage name -> :class:`Stage`, in run order.
STAGES: Registry = Registry("stage", {})


def register(stage: Stage, after: str | None = None) -> Stage:
    """Add ``stage`` to :data:`STAGES` (at the end, or right after the stage ``after``)."""
    if stage.name in STAGES:
        raise ConfigError(f"a stage named {stage.name!r} is already registered")
    if after is None:
        STAGES[stage.name] = stage
        return stage
    items = list(STAGES.items())
    at = [name for name, _ in items].index(STAGES.check(after)) + 1
    STAGES.clear()
    STAGES.update([*items[:at], (stage.name, stage), *items[at:]])
    return stage


def unregister(name: str) -> None:
    """Remove a stage (tests register and remove their own)."""
    STAGES.pop(STAGES.check(name))


def enabled_stages(recipe) -> list[str]:
    """The stages ``recipe`` runs, in order."""
    return [name for name, stage in STAGES.items() if stage.enabled(recipe)]


def read_metrics(run: str | Path) -> dict:
    """Stage name -> metrics of every finished stage of a run directory, in stage order."""
    run = Path(run)
    found = {d.name: d for d in run.iterdir() if (d / DONE).is_file()}
    return {name: read_json(found[name] / DONE) for name in STAGES if name in found}


def typed(metrics: dict) -> dict[str, StageResult]:
    """Stage name -> typed result, for the registered stages among ``metrics``."""
    return {name: STAGES[name].load(m) for name, m in metrics.items() if name in STAGES}
