"""memprune: localize memorization in vision encoders and act on it.

Public API (everything else is private):

* data: :func:`load_dataset`, :class:`MultiView`, :func:`make_splits`, :class:`Splits`
* encoders: :func:`load_encoder`, :func:`normalization`, :func:`find_sites`, :class:`Site`,
  :func:`capture`
* scores: :func:`unit_mem`, :func:`class_mem`, :class:`UnitMemResult`
"""

from memprune.data import MultiView, Splits, load_dataset, make_splits
from memprune.encoders import load_encoder, normalization
from memprune.errors import MemPruneError
from memprune.hooks import capture
from memprune.scores import UnitMemResult, class_mem, unit_mem
from memprune.sites import Site, find_sites

__version__ = "0.1.0"

__all__ = [
    "MemPruneError",
    "MultiView",
    "Site",
    "Splits",
    "UnitMemResult",
    "capture",
    "class_mem",
    "find_sites",
    "load_dataset",
    "load_encoder",
    "make_splits",
    "normalization",
    "unit_mem",
]
