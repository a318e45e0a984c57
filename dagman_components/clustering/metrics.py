# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""How well features separate classes: cluster distances, silhouette, kNN accuracy, k-means NMI / ARI.

Definitions (``x_i`` the feature of case ``i``, ``C`` the classes present, ``n_c`` the cases of
class ``c``, ``||.||`` the Euclidean norm):

* centroid ``mu_c = (1 / n_c) * sum_{i in c} x_i``;
* intra-cluster distance of class ``c``: ``intra_c = (1 / n_c) * sum_{i in c} ||x_i - mu_c||``,
  the mean distance of its cases to their centroid; reported as the mean and the (population,
  ddof 0) standard deviation of ``intra_c`` over the classes (each class counts once);
* inter-cluster distance of classes ``a != b``: ``inter_ab = ||mu_a - mu_b||``, the distance of
  their centroids; reported as the mean and standard deviation over the ``|C| (|C| - 1) / 2``
  unordered pairs;
* ``separation`` = mean inter / mean intra (scale free, higher is better).

The scikit-learn scores are computed on the same vectors: the silhouette coefficient (Euclidean),
the accuracy of a k-nearest-neighbour classifier under stratified k-fold cross-validation, and
k-means (as many clusters as classes) compared with the labels by NMI and ARI.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from monai.utils import StrEnum, look_up_option

__all__ = [
    "FeatureNorm",
    "ClusterDistances",
    "normalise_features",
    "cluster_distances",
    "silhouette",
    "knn_cv_accuracy",
    "kmeans_agreement",
]

logger = logging.getLogger(__name__)


class FeatureNorm(StrEnum):
    """How features are scaled before any distance is measured.

    * ``unit_spread``: centred on the mean feature ``m`` and divided by the root-mean-square
      distance to it, ``x' = (x - m) / sqrt(mean_i ||x_i - m||^2)``, so the average squared
      distance to the overall centroid is 1 for every encoder and distances are comparable
      across encoders of different widths and scales; kNN, k-means, silhouette and UMAP's
      Euclidean neighbours are unchanged by it (shift and global scale).
    * ``l2``: each vector divided by its Euclidean norm (cosine geometry). Frozen Swin features
      share one large common direction (they are layer-normalised outputs), so after ``l2`` all
      distances are small and their absolute values say little.
    * ``none``: raw features.
    """

    UNIT_SPREAD = "unit_spread"
    L2 = "l2"
    NONE = "none"


@dataclass
class ClusterDistances:
    """Intra- and inter-cluster Euclidean distances (see the module docstring).

    Attributes:
        classes: the class labels, sorted.
        intra: ``(C,)`` per-class mean distance to the centroid.
        inter: ``(C, C)`` centroid distances (symmetric, zero diagonal).
    """

    classes: np.ndarray
    intra: np.ndarray
    inter: np.ndarray

    @property
    def inter_pairs(self) -> np.ndarray:
        """The ``C (C - 1) / 2`` distances of distinct class pairs (upper triangle)."""
        return self.inter[np.triu_indices(len(self.classes), k=1)]

    @property
    def intra_mean(self) -> float:
        return float(self.intra.mean())

    @property
    def intra_std(self) -> float:
        return float(self.intra.std())

    @property
    def inter_mean(self) -> float:
        return float(self.inter_pairs.mean())

    @property
    def inter_std(self) -> float:
        return float(self.inter_pairs.std())

    @property
    def separation(self) -> float:
        """Mean inter over mean intra distance (``inf`` when every class is a single point)."""
        return self.inter_mean / self.intra_mean if self.intra_mean > 0 else float("inf")


def _check(x: np.ndarray, labels: np.ndarray, min_classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    if x.ndim != 2 or x.shape[0] != labels.shape[0]:
        raise ValueError(f"features must be (N, F) with N = {labels.shape[0]} labels, got shape {x.shape}.")
    if not np.all(np.isfinite(x)):
        raise ValueError("features hold NaN or infinite values.")
    n_classes = len(np.unique(labels))
    if n_classes < min_classes:
        raise ValueError(f"at least {min_classes} classes are needed, got {n_classes}.")
    return x, labels


def normalise_features(x: np.ndarray, norm: str = FeatureNorm.UNIT_SPREAD, eps: float = 1e-12) -> np.ndarray:
    """Scale ``(N, F)`` features as ``norm`` says (see :class:`FeatureNorm`).

    Example:
        >>> normalise_features(np.array([[0.0, 1.0], [2.0, 1.0]]))
        array([[-1.,  0.],
               [ 1.,  0.]])
        >>> normalise_features(np.array([[3.0, 4.0]]), "l2")
        array([[0.6, 0.8]])
    """
    norm = look_up_option(norm, FeatureNorm)
    x = np.asarray(x, dtype=np.float64)
    if norm == FeatureNorm.NONE:
        return x
    if norm == FeatureNorm.L2:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
    centred = x - x.mean(axis=0, keepdims=True)
    return centred / max(float(np.sqrt((centred**2).sum(axis=1).mean())), eps)


def cluster_distances(x: np.ndarray, labels: np.ndarray) -> ClusterDistances:
    """Intra- and inter-cluster Euclidean distances of ``x`` grouped by ``labels``.

    Args:
        x: ``(N, F)`` features.
        labels: ``(N,)`` class labels (at least two classes).

    Returns:
        A :class:`ClusterDistances`.

    Raises:
        ValueError: for mismatched shapes, non-finite values or fewer than two classes.

    Example:
        >>> d = cluster_distances(np.array([[0.0, 0], [2, 0], [10, 0], [10, 4]]), np.array([0, 0, 1, 1]))
        >>> d.intra.tolist(), d.inter_mean
        ([1.0, 2.0], 9.219544457292887)
    """
    x, labels = _check(x, labels)
    classes = np.unique(labels)
    centroids = np.stack([x[labels == c].mean(axis=0) for c in classes])
    intra = np.array([np.linalg.norm(x[labels == c] - centroids[k], axis=1).mean() for k, c in enumerate(classes)])
    inter = np.linalg.norm(centroids[:, None, :] - centroids[None, :, :], axis=-1)
    return ClusterDistances(classes=classes, intra=intra, inter=inter)


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """scikit-learn's mean silhouette coefficient (Euclidean); NaN when every class has one case."""
    from sklearn.metrics import silhouette_score

    x, labels = _check(x, labels)
    if len(np.unique(labels)) >= x.shape[0]:
        return float("nan")
    return float(silhouette_score(x, labels, metric="euclidean"))


def knn_cv_accuracy(
    x: np.ndarray, labels: np.ndarray, k: int = 5, folds: int = 5, seed: int = 0
) -> dict[str, object]:
    """Accuracy of a k-nearest-neighbour classifier (Euclidean, uniform votes) under stratified
    k-fold cross-validation (shuffled with ``seed``).

    The number of folds is ``min(folds, smallest class size)`` and ``k`` is capped at the size of
    the smallest training fold, so small data sets still run; both used values are returned.

    Args:
        x: ``(N, F)`` features.
        labels: ``(N,)`` labels; every class needs at least two cases.
        k: neighbours.
        folds: the largest number of folds.
        seed: shuffling seed.

    Returns:
        ``{"k", "folds", "accuracy_mean", "accuracy_std", "fold_accuracy", "predictions"}``, the
        last being the out-of-fold prediction of every case.

    Raises:
        ValueError: for ``k < 1``, ``folds < 2``, or a class with fewer than two cases (named).
    """
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier

    if k < 1 or folds < 2:
        raise ValueError(f"knn needs k >= 1 and folds >= 2, got k={k}, folds={folds}.")
    x, labels = _check(x, labels)
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < 2:
        raise ValueError(
            f"class(es) {classes[counts < 2].tolist()} have a single case; cross-validated kNN needs at least 2 "
            "cases per class (cut more crops per structure, or leave the class out)."
        )
    n_folds = int(min(folds, counts.min()))
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold_splits = list(splitter.split(x, labels))
    k_used = int(min(k, min(len(train) for train, _ in fold_splits)))
    predictions = np.empty_like(labels)
    accuracies = []
    for train, test in fold_splits:
        clf = KNeighborsClassifier(n_neighbors=k_used).fit(x[train], labels[train])
        predictions[test] = clf.predict(x[test])
        accuracies.append(float((predictions[test] == labels[test]).mean()))
    return {
        "k": k_used,
        "folds": n_folds,
        "accuracy_mean": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        "fold_accuracy": accuracies,
        "predictions": predictions,
    }


def kmeans_agreement(x: np.ndarray, labels: np.ndarray, seed: int = 0, n_init: int = 10) -> dict[str, object]:
    """k-means with as many clusters as classes, compared with the labels.

    Returns:
        ``{"n_clusters", "nmi", "ari", "clusters"}``: scikit-learn's normalised mutual information
        (arithmetic mean normalisation) and adjusted Rand index, and each case's cluster.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    x, labels = _check(x, labels)
    n_clusters = len(np.unique(labels))
    clusters = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed).fit_predict(x)
    return {
        "n_clusters": n_clusters,
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "ari": float(adjusted_rand_score(labels, clusters)),
        "clusters": clusters,
    }
