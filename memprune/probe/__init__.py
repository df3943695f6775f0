"""Downstream evaluation of frozen encoders: linear probe and weighted kNN (docs/method.md §11)."""

from memprune.probe._api import ProbeResult, confusion_matrix, knn_probe, linear_probe
from memprune.probe._features import Features, extract_features
from memprune.probe._flips import Flips, flip_auc, flips, mcnemar, top_share
from memprune.probe._knn import knn_accuracy
from memprune.probe._linear import BACKENDS, DEFAULT_CS, LinearProbe, ProbeConvergenceWarning
from memprune.probe._split import validation_split

__all__ = [
    "BACKENDS",
    "DEFAULT_CS",
    "Features",
    "Flips",
    "LinearProbe",
    "ProbeConvergenceWarning",
    "ProbeResult",
    "confusion_matrix",
    "extract_features",
    "flip_auc",
    "flips",
    "knn_accuracy",
    "knn_probe",
    "linear_probe",
    "mcnemar",
    "top_share",
    "validation_split",
]
