"""Probes of frozen features: the one logistic-regression protocol, kNN, cross-validated scores and
paired comparisons of encoders."""

from dagman_components.probing.crossval import (
    CLASSIFIERS,
    ProbeScores,
    knn_scores,
    probe_auc,
    probe_scores,
    select_logistic_probe,
)
from dagman_components.probing.logistic import DEFAULT_C, LogisticProbe, class_weights, fit_logistic_probe

__all__ = [
    "CLASSIFIERS",
    "DEFAULT_C",
    "LogisticProbe",
    "ProbeScores",
    "class_weights",
    "fit_logistic_probe",
    "knn_scores",
    "probe_auc",
    "probe_scores",
    "select_logistic_probe",
]
from dagman_components.probing.paired import PairedDifference, mean_auc, paired_auc_difference  # noqa: E402

__all__ += ["PairedDifference", "mean_auc", "paired_auc_difference"]
