# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""The organ clustering run: features -> metrics -> UMAP -> JSON, CSV, PNG (and the raw features).

Everything is computed first and written last, each file atomically, so a failed run leaves the
outputs of the previous run untouched.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn
from monai.utils import look_up_option

from dagman_components.atomic import atomic_write_bytes
from dagman_components.clustering.embedding import plot_embedding, umap_embedding
from dagman_components.clustering.features import OrganFeatureExtractor
from dagman_components.clustering.metrics import (
    FeatureNorm,
    cluster_distances,
    kmeans_agreement,
    knn_cv_accuracy,
    normalise_features,
    silhouette,
)
from dagman_components.clustering.organ_npz import OrganCropSet
from dagman_components.clustering.writers import write_csv, write_json
from dagman_components.data.transforms import HU_WINDOW, resolve_hu_window
from dagman_components.runtime.progress import progress

__all__ = ["ClusteringResult", "OrganClustering", "OUTPUT_FILES"]

logger = logging.getLogger(__name__)

#: Files written into ``output_dir``.
OUTPUT_FILES = {
    "metrics": "clustering_metrics.json",
    "embedding": "embeddings.csv",
    "plot": "umap.png",
    "features": "features.npz",
}


@dataclass
class ClusteringResult:
    """What :meth:`OrganClustering.compute` found."""

    features: np.ndarray
    embedding: np.ndarray
    knn_predictions: np.ndarray
    kmeans_clusters: np.ndarray
    metrics: dict[str, Any]


def _distances_summary(x: np.ndarray, labels: np.ndarray, names: dict[int, str]) -> dict[str, Any]:
    d = cluster_distances(x, labels)
    cls = [names[int(c)] for c in d.classes]
    return {
        "intra_cluster": {"mean": d.intra_mean, "std": d.intra_std, "per_class": dict(zip(cls, d.intra.tolist()))},
        "inter_cluster": {
            "mean": d.inter_mean,
            "std": d.inter_std,
            "pairs": len(d.inter_pairs),
            "centroid_distance_matrix": {"classes": cls, "values": d.inter.tolist()},
        },
        "separation_inter_over_intra": d.separation,
        "silhouette": silhouette(x, labels),
    }


class OrganClustering:
    """Cluster labelled organ crops with a frozen encoder's features and write the evidence.

    Args:
        dataset: the crops (:func:`~dagman_components.clustering.load_organ_npz`).
        encoder: the frozen encoder (:func:`~dagman_components.weights.encoder_io.prepare_encoder`);
            unused with the ``voxels`` token.
        extractor: an :class:`OrganFeatureExtractor` (token, ROI, batch size, device).
        output_dir: where the files of :data:`OUTPUT_FILES` go.
        feature_norm: ``unit_spread``, ``l2`` or ``none`` (see
            :class:`~dagman_components.clustering.FeatureNorm`); applied before every metric and UMAP.
        knn_k: neighbours of the kNN classifier.
        cv_folds: largest number of cross-validation folds.
        umap_neighbors: UMAP ``n_neighbors`` (capped at N - 1).
        umap_min_dist: UMAP ``min_dist``.
        seed: seed of the fold shuffling, k-means and UMAP.
        description: free text stored in the JSON (e.g. which weights, which data).
        hu_window: the encoder's HU window (its model card's): crops stored in Hounsfield units are
            windowed with it; crops stored already scaled (MedMNIST) are used as they are.

    Example::

        run = OrganClustering(load_organ_npz("crops.npz"), prepare_encoder(None),
                              OrganFeatureExtractor("global"), "eval/random_global")
        metrics = run.run()
    """

    def __init__(
        self,
        dataset: OrganCropSet,
        encoder: nn.Module | None,
        extractor: OrganFeatureExtractor,
        output_dir: str | os.PathLike,
        feature_norm: str = "unit_spread",
        knn_k: int = 5,
        cv_folds: int = 5,
        umap_neighbors: int = 15,
        umap_min_dist: float = 0.1,
        seed: int = 0,
        description: str = "",
        hu_window: str | Sequence[float] = HU_WINDOW,
    ) -> None:
        if len(dataset) < 3:
            raise ValueError(f"clustering needs at least 3 crops, '{dataset.source}' gives {len(dataset)}.")
        self.dataset = dataset
        self.encoder = encoder
        self.extractor = extractor
        self.output_dir = Path(output_dir)
        self.feature_norm = look_up_option(feature_norm, FeatureNorm)
        self.knn_k = int(knn_k)
        self.cv_folds = int(cv_folds)
        self.umap_neighbors = int(umap_neighbors)
        self.umap_min_dist = float(umap_min_dist)
        self.seed = int(seed)
        self.description = description
        self.hu_window = resolve_hu_window(hu_window)
        if not dataset.in_hounsfield and self.hu_window != HU_WINDOW:
            logger.warning("the crops of %s are stored already scaled, so the encoder's window %s cannot be applied; "
                           "cut crops in HU with scripts/make_organ_crops.py.", dataset.source, list(self.hu_window))

    def _encoder_info(self) -> dict[str, Any]:
        enc = self.encoder
        info: dict[str, Any] = {"token": str(self.extractor.token), "roi_size": list(self.extractor.roi_size)}
        info["feature_dim"] = self.extractor.feature_dim(enc)
        if enc is None or str(self.extractor.token) == "voxels":
            info["network"] = "none (voxel baseline: each crop average-pooled to 8^3)"
            return info
        report = getattr(enc, "load_report", None)
        info.update(
            init=getattr(enc, "init", "unknown"),
            weights=report.path if report is not None else None,
            weights_sha256=getattr(enc, "weights_sha256", None),
            load_report=report.summary() if report is not None else None,
            embed_dim=int(enc.embed_dim),
            sa_stage=int(enc.sa_stage),
            parameters=int(sum(p.numel() for p in enc.parameters())),
        )
        return info

    def compute(self) -> ClusteringResult:
        """Features, metrics and the UMAP embedding, in memory."""
        ds, t0 = self.dataset, time.perf_counter()
        raw = self.extractor(self.encoder, ds.float_images(self.hu_window))
        t_features = time.perf_counter() - t0
        x = normalise_features(raw, self.feature_norm)
        labels = ds.labels
        steps = {
            "knn": lambda: knn_cv_accuracy(x, labels, k=self.knn_k, folds=self.cv_folds, seed=self.seed),
            "kmeans": lambda: kmeans_agreement(x, labels, seed=self.seed),
            "umap": lambda: umap_embedding(
                x, n_neighbors=self.umap_neighbors, min_dist=self.umap_min_dist, seed=self.seed
            ),
        }
        done = {name: step() for name, step in progress(steps.items(), "clustering (kNN, k-means, UMAP)",
                                                        total=len(steps), unit="step")}
        knn, km, (embedding, umap_settings) = done["knn"], done["kmeans"], done["umap"]
        metrics: dict[str, Any] = {
            "description": self.description,
            "data": {
                "file": ds.source,
                "splits": sorted(set(ds.splits.tolist()), key=["train", "val", "test"].index),
                "cases": len(ds),
                "crop_shape": list(ds.images.shape[1:]),
                "hu_window": list(self.hu_window) if ds.in_hounsfield else "stored scaled",
                "classes": len(ds.class_ids),
                "cases_per_class": ds.class_counts(),
            },
            "encoder": self._encoder_info(),
            "feature_norm": str(self.feature_norm),
            "feature_space": {
                **_distances_summary(x, labels, ds.names),
                "knn": {k: v for k, v in knn.items() if k != "predictions"},
                "kmeans": {k: v for k, v in km.items() if k != "clusters"},
            },
            "umap_space": {**_distances_summary(embedding.astype(np.float64), labels, ds.names), "umap": umap_settings},
            "seconds": {"features": round(t_features, 2), "total": round(time.perf_counter() - t0, 2)},
        }
        return ClusteringResult(raw, embedding, knn["predictions"], km["clusters"], metrics)

    def write(self, result: ClusteringResult) -> dict[str, Path]:
        """Write the JSON, CSV, PNG and features (each atomically); returns their paths."""
        ds, m = self.dataset, result.metrics
        paths = {k: self.output_dir / v for k, v in OUTPUT_FILES.items()}
        fs, us = m["feature_space"], m["umap_space"]
        enc = m["encoder"]
        title = f"{enc.get('init', 'no network')} encoder, {enc['token']} features, {m['data']['cases']} crops"
        intra, inter = fs["intra_cluster"], fs["inter_cluster"]
        lines = [
            f"features ({m['feature_norm']}): intra {intra['mean']:.3f}±{intra['std']:.3f}, "
            f"inter {inter['mean']:.3f}±{inter['std']:.3f}",
            f"silhouette {fs['silhouette']:.3f}, kNN accuracy {fs['knn']['accuracy_mean']:.3f}, "
            f"k-means NMI {fs['kmeans']['nmi']:.3f} / ARI {fs['kmeans']['ari']:.3f}",
            f"UMAP: intra {us['intra_cluster']['mean']:.2f}±{us['intra_cluster']['std']:.2f}, "
            f"inter {us['inter_cluster']['mean']:.2f}±{us['inter_cluster']['std']:.2f}",
        ]
        columns = {
            "case_id": ds.case_ids.tolist(),
            "split": ds.splits.tolist(),
            "label": ds.labels.tolist(),
            "organ": [ds.names[int(i)] for i in ds.labels],
            "umap_1": result.embedding[:, 0].tolist(),
            "umap_2": result.embedding[:, 1].tolist(),
            "knn_prediction": [ds.names[int(i)] for i in result.knn_predictions],
            "kmeans_cluster": result.kmeans_clusters.tolist(),
        }
        write_json(m, paths["metrics"])
        write_csv(columns, paths["embedding"])
        plot_embedding(result.embedding, ds.labels, ds.names, paths["plot"], title=title, subtitle_lines=lines)
        buf = io.BytesIO()
        np.savez_compressed(buf, features=result.features, labels=ds.labels, case_ids=ds.case_ids.astype(str))
        atomic_write_bytes(buf.getvalue(), paths["features"])
        return paths

    def run(self) -> dict[str, Any]:
        """Compute and write; returns the metrics dict (also logged in one line)."""
        result = self.compute()
        paths = self.write(result)
        fs, us = result.metrics["feature_space"], result.metrics["umap_space"]
        logger.info(
            "%s: intra %.4f+-%.4f inter %.4f+-%.4f silhouette %.4f kNN %.4f NMI %.4f ARI %.4f | UMAP intra %.3f "
            "inter %.3f -> %s",
            result.metrics["encoder"].get("init", "voxels") + "/" + result.metrics["encoder"]["token"],
            fs["intra_cluster"]["mean"],
            fs["intra_cluster"]["std"],
            fs["inter_cluster"]["mean"],
            fs["inter_cluster"]["std"],
            fs["silhouette"],
            fs["knn"]["accuracy_mean"],
            fs["kmeans"]["nmi"],
            fs["kmeans"]["ari"],
            us["intra_cluster"]["mean"],
            us["inter_cluster"]["mean"],
            paths["metrics"].parent,
        )
        return result.metrics
