"""YAML recipes: one command from data to report (``memprune run RECIPE.yaml``).

* :func:`load_recipe`: read, override (``--set``) and validate a recipe.
* :func:`run_recipe`: run its stages into a run directory (resumable).
* :func:`render_report`: (re)write ``report.md`` of a run directory.
"""

from memprune.recipes._report import headlines, render_report, unfinished_stages
from memprune.recipes._run import environment, run_recipe
from memprune.recipes._schema import Recipe, RecipeError, load_recipe, validate
from memprune.recipes._stages import STAGES, enabled_stages, read_metrics

__all__ = [
    "STAGES",
    "Recipe",
    "RecipeError",
    "enabled_stages",
    "environment",
    "headlines",
    "load_recipe",
    "read_metrics",
    "render_report",
    "run_recipe",
    "unfinished_stages",
    "validate",
]
