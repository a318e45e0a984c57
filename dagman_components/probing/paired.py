# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Did encoder B beat encoder A on the same cases? The paired AUC difference with a patient bootstrap.

Two encoders probed on the same cases, folds and seeds give paired scores. Their AUCs share most
of their sampling noise (the same hard cases are hard for both), so the interval of the
*difference* is much narrower than the two separate intervals suggest; comparing two overlapping
intervals by eye misses real gains. The interval here resamples whole patients (a patient's
nodules are not independent) with the same draw for both encoders and every seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["PairedDifference", "paired_auc_difference", "mean_auc"]


@dataclass
class PairedDifference:
    """``auc_b - auc_a``, each the mean over seeds of the pooled out-of-fold AUC.

    Attributes:
        auc_a: mean AUC of encoder A.
        auc_b: mean AUC of encoder B.
        difference: ``auc_b - auc_a``.
        low: lower end of the percentile bootstrap interval of the difference.
        high: upper end.
        share_b_better: share of the bootstrap resamples in which B's AUC is higher.
        n_boot: resamples used.
    """

    auc_a: float
    auc_b: float
    difference: float
    low: float
    high: float
    share_b_better: float
    n_boot: int

    def as_dict(self) -> dict[str, float]:
        """Plain values (JSON)."""
        return asdict(self)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted half: scikit-learn's value."""
    from scipy.stats import rankdata

    positive = labels == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mean_auc(scores: np.ndarray, labels: np.ndarray, rows: np.ndarray | None = None) -> float:
    """Mean over seeds (rows of ``scores``) of the AUC of the cases ``rows`` (default all)."""
    s = np.atleast_2d(np.asarray(scores, dtype=float))
    y = np.asarray(labels).astype(int)
    idx = np.arange(len(y)) if rows is None else rows
    return float(np.mean([_auc(seed_scores[idx], y[idx]) for seed_scores in s]))


def paired_auc_difference(
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    labels: np.ndarray,
    patients: np.ndarray,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> PairedDifference:
    """The paired AUC difference of two encoders and its patient-level bootstrap interval.

    Args:
        scores_a: (S, N) or (N,) out-of-fold scores of encoder A, one row per seed.
        scores_b: the same for encoder B (same cases, folds and seeds).
        labels: (N,) 0 / 1 labels.
        patients: (N,) patient of each case; resampling draws whole patients.
        n_boot: bootstrap resamples (resamples without both classes are drawn again).
        alpha: 0.05 gives the 95 % interval.
        seed: seed of the resampling.

    Returns:
        The :class:`PairedDifference`.

    Raises:
        ValueError: for scores of different shapes or not matching the labels, a single class,
            or non-finite scores.
    """
    a, b = np.atleast_2d(np.asarray(scores_a, dtype=float)), np.atleast_2d(np.asarray(scores_b, dtype=float))
    y, groups = np.asarray(labels).astype(int), np.asarray(patients)
    if a.shape != b.shape or a.shape[1] != len(y) or len(groups) != len(y):
        raise ValueError(f"paired scores need the same cases: got {a.shape}, {b.shape}, {len(y)} labels, "
                         f"{len(groups)} patients.")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired scores must be finite for every case (score every case in every seed).")
    if y.min() == y.max():
        raise ValueError("a paired AUC difference needs both classes among the cases.")
    auc_a, auc_b = mean_auc(a, y), mean_auc(b, y)
    members = {g: np.flatnonzero(groups == g) for g in np.unique(groups)}
    keys = list(members)
    rng = np.random.default_rng(seed)
    diffs = []
    while len(diffs) < int(n_boot):
        rows = np.concatenate([members[keys[j]] for j in rng.integers(0, len(keys), len(keys))])
        if y[rows].min() == y[rows].max():
            continue
        diffs.append(mean_auc(b, y, rows) - mean_auc(a, y, rows))
    d = np.asarray(diffs)
    low, high = (np.quantile(d, [alpha / 2, 1 - alpha / 2]) if len(d) else (np.nan, np.nan))
    return PairedDifference(auc_a=auc_a, auc_b=auc_b, difference=auc_b - auc_a, low=float(low), high=float(high),
                            share_b_better=float((d > 0).mean()) if len(d) else float("nan"), n_boot=len(d))
