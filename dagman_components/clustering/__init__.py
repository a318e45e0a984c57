# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Organ clustering from frozen DAGMaN features: organ crops (OrganMNIST3D layout or cut from a CT
and its label map), frozen-encoder features, cluster metrics, a seeded UMAP and its picture."""

from __future__ import annotations

from .crops import OrganCrop, Structure, cut_organ_crops, extract_crop, find_structures, load_ct_and_labels
from .embedding import plot_embedding, umap_embedding
from .features import FeatureToken, OrganFeatureExtractor
from .metrics import (
    ClusterDistances,
    FeatureNorm,
    cluster_distances,
    kmeans_agreement,
    knn_cv_accuracy,
    normalise_features,
    silhouette,
)
from .organ_npz import (
    ORGANMNIST3D_LABELS,
    SPLITS,
    OrganCropSet,
    OrganDataError,
    load_organ_npz,
    read_name_table,
    save_organ_npz,
)
from .pipeline import OUTPUT_FILES, ClusteringResult, OrganClustering
from .writers import atomic_write_bytes, write_csv, write_json

__all__ = [
    "ORGANMNIST3D_LABELS",
    "OUTPUT_FILES",
    "SPLITS",
    "ClusterDistances",
    "ClusteringResult",
    "FeatureNorm",
    "FeatureToken",
    "OrganClustering",
    "OrganCrop",
    "OrganCropSet",
    "OrganDataError",
    "OrganFeatureExtractor",
    "Structure",
    "atomic_write_bytes",
    "cluster_distances",
    "cut_organ_crops",
    "extract_crop",
    "find_structures",
    "kmeans_agreement",
    "knn_cv_accuracy",
    "load_ct_and_labels",
    "load_organ_npz",
    "normalise_features",
    "plot_embedding",
    "read_name_table",
    "save_organ_npz",
    "silhouette",
    "umap_embedding",
    "write_csv",
    "write_json",
]
