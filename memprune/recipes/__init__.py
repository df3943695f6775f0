"""YAML recipes: one command from data to report (``memprune run RECIPE.yaml``).

* :func:`load_recipe`: read, override (``--set``) and validate a recipe.
* :func:`run_recipe`: run its stages into a run directory (resumable).
* :func:`run_verb`: run the stages of one CLI verb into its ``--out``.
* :func:`render_report`: (re)write ``report.md`` of a run directory.
* :data:`STAGES`, :class:`Stage`, :func:`register`: the stages, one object each.
"""

from memprune.recipes import stages as _builtin  # noqa: F401  (registers the built-in stages)
from memprune.recipes._context import Context
from memprune.recipes._report import headlines, render_report, unfinished_stages
from memprune.recipes._run import environment, run_recipe, run_verb
from memprune.recipes._schema import (
    Recipe,
    RecipeError,
    load_recipe,
    schema_default,
    schema_field,
    validate,
)
from memprune.recipes._stages import (
    DONE,
    STAGES,
    Stage,
    StageResult,
    enabled_stages,
    read_metrics,
    register,
    typed,
    unregister,
)
from memprune.recipes._values import (
    STAGES_OFF,
    merge,
    parse_augment,
    parse_count,
    parse_key_values,
    parse_points,
    put_key,
)

__all__ = [
    "DONE",
    "STAGES",
    "STAGES_OFF",
    "Context",
    "Recipe",
    "RecipeError",
    "Stage",
    "StageResult",
    "enabled_stages",
    "environment",
    "headlines",
    "load_recipe",
    "merge",
    "parse_augment",
    "parse_count",
    "parse_key_values",
    "parse_points",
    "put_key",
    "read_metrics",
    "register",
    "render_report",
    "run_recipe",
    "run_verb",
    "schema_default",
    "schema_field",
    "typed",
    "unfinished_stages",
    "unregister",
    "validate",
]
