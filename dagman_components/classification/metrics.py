# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Binary classification figures: ROC AUC, ROC curve, a validation-chosen threshold, sensitivity and
specificity, and percentile-bootstrap 95 % intervals, on scores and {0, 1} labels (numpy arrays,
lists or torch tensors). The ROC AUC and curve are scikit-learn's, with the inputs checked first;
the Ignite side lives in :mod:`dagman_components.classification.handlers`.

Conventions (those of scikit-learn): a case is called malignant when ``score >= threshold``; the
ROC curve's thresholds are the distinct scores in decreasing order, preceded by ``inf``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "as_binary_arrays",
    "roc_auc",
    "roc_curve",
    "youden_threshold",
    "sensitivity_specificity",
    "bootstrap_ci",
    "binary_report",
    "mean_and_std",
    "summarise_folds",
]


def as_binary_arrays(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Scores as float64 and labels as int arrays of the same length (tensors are detached).

    Raises:
        ValueError: for different lengths, an empty input, or labels other than 0 and 1.
    """
    s = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if s.shape != y.shape or s.size == 0:
        raise ValueError(f"scores and labels must be non-empty and of the same length, got {s.size} and {y.size}.")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values {np.unique(y).tolist()}.")
    return s, y.astype(np.int64)


def roc_auc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve (scikit-learn's ``roc_auc_score``; ties count one half).

    Raises:
        ValueError: when the labels hold a single class (the AUC is undefined).

    Example:
        >>> roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        0.75
    """
    from sklearn.metrics import roc_auc_score

    s, y = as_binary_arrays(scores, labels)
    if y.min() == y.max():
        raise ValueError("ROC AUC is undefined when only one class is present.")
    return float(roc_auc_score(y, s))


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold (scikit-learn's ``roc_curve``
    with ``drop_intermediate=False``).

    Returns:
        ``(fpr, tpr, thresholds)``; ``thresholds[0]`` is ``inf`` (nothing called positive), then the
        distinct scores in decreasing order.

    Raises:
        ValueError: when the labels hold a single class.
    """
    from sklearn.metrics import roc_curve as sklearn_roc_curve

    s, y = as_binary_arrays(scores, labels)
    if y.min() == y.max():
        raise ValueError("the ROC curve is undefined when only one class is present.")
    fpr, tpr, thresholds = sklearn_roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr, thresholds


def youden_threshold(scores: Any, labels: Any) -> float:
    """The threshold maximising sensitivity + specificity - 1 (Youden's J) on these cases; among ties
    the highest threshold (fewest positive calls). Choose it on validation, apply it on test.

    Raises:
        ValueError: when the labels hold a single class.
    """
    fpr, tpr, thresholds = roc_curve(scores, labels)
    j = tpr[1:] - fpr[1:]  # skip inf: it calls nothing positive
    return float(thresholds[1:][int(np.argmax(j))])


def sensitivity_specificity(scores: Any, labels: Any, threshold: float) -> tuple[float, float]:
    """Sensitivity (recall of malignant) and specificity (recall of benign) when ``score >= threshold``
    is called malignant; ``nan`` for a class with no case."""
    s, y = as_binary_arrays(scores, labels)
    pred = s >= threshold
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    sens = float((pred & (y == 1)).sum() / n_pos) if n_pos else float("nan")
    spec = float((~pred & (y == 0)).sum() / n_neg) if n_neg else float("nan")
    return sens, spec


def bootstrap_ci(
    scores: Any,
    labels: Any,
    statistic: Callable[[np.ndarray, np.ndarray], float],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(scores, labels)`` over cases resampled with replacement.

    Resamples in which a class is missing are drawn again (they leave the AUC undefined), so every
    interval rests on ``n_boot`` valid resamples.

    Args:
        scores: case scores.
        labels: case labels (both classes present).
        statistic: function of (scores, labels) arrays.
        n_boot: number of resamples.
        alpha: 0.05 gives the 95 % interval.
        seed: seed of the resampling.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for ``n_boot == 0``.

    Raises:
        ValueError: for a single class, ``alpha`` outside (0, 1) or a negative ``n_boot``.
    """
    s, y = as_binary_arrays(scores, labels)
    if y.min() == y.max():
        raise ValueError("a bootstrap interval needs both classes among the cases.")
    if not 0.0 < alpha < 1.0 or n_boot < 0:
        raise ValueError(f"alpha must be in (0, 1) and n_boot >= 0, got {alpha} and {n_boot}.")
    if n_boot == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values: list[float] = []
    while len(values) < n_boot:
        idx = rng.integers(0, len(s), size=len(s))
        if y[idx].min() != y[idx].max():
            values.append(float(statistic(s[idx], y[idx])))
    low, high = np.nanpercentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def binary_report(
    scores: Any, labels: Any, threshold: float, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, Any]:
    """AUC, sensitivity and specificity at ``threshold``, each with its bootstrap interval.

    Returns:
        ``{"n", "n_malignant", "threshold", "auc": {"value", "ci95"}, "sensitivity": {...},
        "specificity": {...}}`` (plain floats, JSON-ready).
    """
    s, y = as_binary_arrays(scores, labels)
    sens, spec = sensitivity_specificity(s, y, threshold)
    report: dict[str, Any] = {"n": int(len(y)), "n_malignant": int(y.sum()), "threshold": float(threshold)}
    figures: dict[str, tuple[float, Callable[[np.ndarray, np.ndarray], float]]] = {
        "auc": (roc_auc(s, y), roc_auc),
        "sensitivity": (sens, lambda a, b: sensitivity_specificity(a, b, threshold)[0]),
        "specificity": (spec, lambda a, b: sensitivity_specificity(a, b, threshold)[1]),
    }
    for name, (value, fn) in figures.items():
        report[name] = {"value": value, "ci95": list(bootstrap_ci(s, y, fn, n_boot, alpha, seed))}
    return report


def mean_and_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation of per-fold figures (``nan``-free inputs)."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def summarise_folds(reports: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation over folds of the ``value`` of each figure of :func:`binary_report`."""
    return {k: mean_and_std([r[k]["value"] for r in reports]) for k in ("auc", "sensitivity", "specificity")}
