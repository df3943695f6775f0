"""YAML recipes: one command from data to report (``memprune run RECIPE.yaml``).

* :func:`load_recipe`: read, override (``--set``) and validate a recipe.
* :func:`run_recipe`: run its stages into a run directory (resumable).
* :func:`render_report`: (re)write ``report.md`` of a run directory.
"""

from memprune.recipes._report import render_report
from memprune.recipes._run import STAGES, enabled_stages, environment, run_recipe
from memprune.recipes._schema import Recipe, RecipeError, load_recipe, validate

__all__ = [
    "STAGES",
    "Recipe",
    "RecipeError",
    "enabled_stages",
    "environment",
    "load_recipe",
    "render_report",
    "run_recipe",
    "validate",
]
