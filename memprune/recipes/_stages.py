"""The stages of a recipe run, in order, and what a finished stage leaves behind."""

from __future__ import annotations

from pathlib import Path

from memprune._io import read_json
from memprune.recipes._schema import Recipe

STAGES = (
    "pretrain", "supervised", "unitmem", "classmem", "sslmem", "layermem", "membergap",
    "cka", "evaluate", "prune", "finetune",
)  # fmt: skip
#: A stage's metrics, written last: its presence marks the stage finished.
DONE = "done.json"


def enabled_stages(recipe: Recipe) -> list[str]:
    """The stages ``recipe`` runs, in order."""
    s, a, e = recipe.scores, recipe.actions, recipe.encoder
    on = {
        "pretrain": e.pretrain is not None, "supervised": e.supervised.enabled,
        "unitmem": s.unitmem.enabled, "classmem": s.classmem.enabled,
        "sslmem": s.sslmem.enabled, "layermem": s.layermem.enabled,
        "membergap": s.membergap.enabled,
        "cka": s.cka.enabled and e.supervised.enabled,
        "evaluate": recipe.evaluation.linear or recipe.evaluation.knn,
        "prune": a.prune.enabled, "finetune": a.finetune.enabled,
    }  # fmt: skip
    return [name for name in STAGES if on[name]]


def read_metrics(run: str | Path) -> dict:
    """Stage name -> metrics of every finished stage of a run directory."""
    return {
        d.name: read_json(d / DONE) for d in sorted(Path(run).iterdir()) if (d / DONE).is_file()
    }
