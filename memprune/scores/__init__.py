"""Memorization scores."""

from memprune.scores.unitmem import UnitMemResult, class_mem, unit_mem

__all__ = ["UnitMemResult", "class_mem", "unit_mem"]
