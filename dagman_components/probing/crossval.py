# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Cross-validated scores of the project's probes on frozen features.

Every place that asks "how good are these features?" scores them here: the in-loop probe of
pretraining, ``scripts/compare_pretraining.py`` and ``scripts/evaluate_encoders.py``. The
classification bundle's ``mode: linear_probe`` fits the same :func:`fit_logistic_probe`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dagman_components.probing.logistic import DEFAULT_C, LogisticProbe, fit_logistic_probe

__all__ = ["CLASSIFIERS", "ProbeScores", "probe_scores", "probe_auc", "select_logistic_probe", "knn_scores"]

logger = logging.getLogger(__name__)

#: The classifiers a probe can fit on frozen features.
CLASSIFIERS: tuple[str, ...] = ("logistic", "knn")


@dataclass
class ProbeScores:
    """Out-of-fold results of a probe.

    Attributes:
        scores: (N,) positive-class probability of each case from the fold that held it out (NaN
            for the cases of skipped folds).
        fold_aucs: test ROC AUC of each scored fold, in fold order.
        scored: mask (N,) of the cases that have a score.
        chosen_C: the C each scored fold used (logistic only).
    """

    scores: np.ndarray
    fold_aucs: list[float]
    scored: np.ndarray
    chosen_C: list[float] = field(default_factory=list)


def knn_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_neighbors: int = 10) -> np.ndarray:
    """Share of positive neighbours among the ``n_neighbors`` nearest training cases (Euclidean, on
    features standardised with the training statistics): scikit-learn's kNN."""
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=max(1, min(int(n_neighbors), len(train_y)))))
    model.fit(train_x, train_y)
    proba = model.predict_proba(test_x)
    classes = list(model.classes_)
    return proba[:, classes.index(1)] if 1 in classes else np.zeros(len(test_x))


def select_logistic_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray | None = None,
    val_y: np.ndarray | None = None,
    Cs: Sequence[float] = (DEFAULT_C,),
    balanced: bool = True,
) -> tuple[LogisticProbe, dict[float, float]]:
    """Fit the probe for every C of ``Cs`` and keep the one with the best validation ROC AUC.

    With one C (the default) or no validation set, no selection happens.

    Args:
        train_x: (N, C) training features.
        train_y: (N,) 0 / 1 labels.
        val_x: (M, C) validation features, or ``None``.
        val_y: (M,) validation labels.
        Cs: inverse L2 strengths to try; ties go to the first (list them from strong to weak).
        balanced: balanced class weights.

    Returns:
        The chosen probe and the validation AUC of each C (empty without a validation set).
    """
    from sklearn.metrics import roc_auc_score

    Cs = [float(c) for c in Cs]
    if len(Cs) == 1 or val_x is None or val_y is None or len(np.unique(val_y)) < 2:
        return fit_logistic_probe(train_x, train_y, C=Cs[0], balanced=balanced), {}
    best, best_auc, val_aucs = None, -np.inf, {}
    for c in Cs:
        probe = fit_logistic_probe(train_x, train_y, C=c, balanced=balanced)
        auc = float(roc_auc_score(val_y, probe.probabilities(val_x)[:, 1]))
        val_aucs[c] = auc
        if auc > best_auc:
            best, best_auc = probe, auc
    return best, val_aucs


def probe_scores(
    features: np.ndarray,
    labels: np.ndarray,
    folds: Sequence[np.ndarray],
    classifier: str = "logistic",
    C: float = DEFAULT_C,
    n_neighbors: int = 10,
    balanced: bool = True,
) -> ProbeScores:
    """Out-of-fold scores of a probe fitted on the other folds.

    Folds whose test or training part lacks a class are skipped (with a warning).

    Args:
        features: (N, C) features.
        labels: (N,) 0 / 1 labels.
        folds: test indices of each fold (a partition of ``range(N)``).
        classifier: ``"logistic"`` (:func:`fit_logistic_probe`) or ``"knn"`` (:func:`knn_scores`).
        C: the logistic probe's inverse L2 strength.
        n_neighbors: k of the kNN (capped at the training size).
        balanced: balanced class weights of the logistic probe.

    Returns:
        The out-of-fold scores and each scored fold's AUC; nothing is scored when the features are
        not finite.

    Raises:
        ValueError: for an unknown ``classifier``.
    """
    from sklearn.metrics import roc_auc_score

    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {list(CLASSIFIERS)}, got {classifier!r}.")
    x, y = np.asarray(features, dtype=np.float64), np.asarray(labels).astype(int)
    result = ProbeScores(scores=np.full(len(y), np.nan), fold_aucs=[], scored=np.zeros(len(y), bool))
    if not np.isfinite(x).all():
        logger.warning("probe: the features are not finite (diverged weights?); AUC set to NaN")
        return result
    for k, test in enumerate(folds):
        train = np.setdiff1d(np.arange(len(y)), test)
        if len(np.unique(y[test])) < 2 or len(np.unique(y[train])) < 2:
            logger.warning("probe: fold %d lacks a class in its test or training part; skipped", k)
            continue
        if classifier == "knn":
            result.scores[test] = knn_scores(x[train], y[train], x[test], n_neighbors)
        else:
            result.scores[test] = fit_logistic_probe(x[train], y[train], C=C, balanced=balanced).probabilities(x[test])[:, 1]
            result.chosen_C.append(float(C))
        result.scored[test] = True
        result.fold_aucs.append(float(roc_auc_score(y[test], result.scores[test])))
    return result


def probe_auc(features: np.ndarray, labels: np.ndarray, folds: Sequence[np.ndarray], **kwargs) -> float:
    """Mean test ROC AUC over the folds of :func:`probe_scores` (same arguments); NaN when nothing
    could be scored."""
    aucs = probe_scores(features, labels, folds, **kwargs).fold_aucs
    return float(np.mean(aucs)) if aucs else float("nan")
