"""Organ clustering metrics of a pretrained encoder against several random initialisations (no UMAP).

How much do the metrics of ``bundles/dagman_organ_ct_clustering`` move between random seeds? This
runs the bundle's feature extraction and feature-space metrics (same definitions, same folds) for
the pretrained encoder and for random encoders of the same architecture with seeds 0..N-1, and
logs one line per token: the pretrained value and the random mean ± std [min, max].

Usage (from the repository root)::

    python scripts/organ_clustering_seed_spread.py \\
        --data bundles/dagman_organ_ct_clustering/sample_data/organ_crops_totalseg_28.npz \\
        --model-path /path/to/dagman_ct_pretraining/models/model.pt [--seeds 5] [--tokens global cls]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

import numpy as np

if importlib.util.find_spec("dagman_components") is None:  # not installed: use the repository this script is in
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dagman_components.clustering import (  # noqa: E402
    OrganFeatureExtractor,
    cluster_distances,
    kmeans_agreement,
    knn_cv_accuracy,
    load_organ_npz,
    normalise_features,
    silhouette,
)
from dagman_components.weights.encoder_io import prepare_encoder  # noqa: E402

logger = logging.getLogger("organ_clustering_seed_spread")
COLUMNS = ("intra", "inter", "inter/intra", "silhouette", "knn", "nmi")


def scores(x: np.ndarray, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """The feature-space scores of :data:`COLUMNS` for (already scaled) features ``x``."""
    d = cluster_distances(x, labels)
    return np.array([
        d.intra_mean, d.inter_mean, d.separation, silhouette(x, labels),
        knn_cv_accuracy(x, labels, seed=seed)["accuracy_mean"], kmeans_agreement(x, labels, seed=seed)["nmi"],
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="npz in the organmnist3d layout")
    parser.add_argument("--model-path", required=True, type=Path, help="pretrained model.pt (card beside it)")
    parser.add_argument("--seeds", type=int, default=5, help="random initialisations 0..N-1")
    parser.add_argument("--tokens", nargs="+", default=["global", "cls"], choices=["global", "cls"])
    parser.add_argument("--roi-size", type=int, default=32)
    parser.add_argument("--feature-norm", default="unit_spread")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)

    ds = load_organ_npz(args.data)
    for token in args.tokens:
        extract = OrganFeatureExtractor(token, args.roi_size, progress=False)
        runs = {}
        for init, seed in [("pretrained", 0)] + [("random", s) for s in range(args.seeds)]:
            weights = args.model_path if init == "pretrained" else None  # random: the same card's architecture
            encoder = prepare_encoder(weights, card=args.model_path, seed=seed)
            x = normalise_features(extract(encoder, ds.images), args.feature_norm)
            runs[(init, seed)] = scores(x, ds.labels)
        rnd = np.stack([v for (init, _), v in runs.items() if init == "random"])
        pre = runs[("pretrained", 0)]
        logger.info("%s %s pretrained: %s", args.data.name, token, ", ".join(f"{c} {v:.3f}" for c, v in zip(COLUMNS, pre)))
        logger.info("%s %s random x%d: %s", args.data.name, token, args.seeds, ", ".join(
            f"{c} {m:.3f} ± {s:.3f} [{lo:.3f}, {hi:.3f}]"
            for c, m, s, lo, hi in zip(COLUMNS, rnd.mean(0), rnd.std(0), rnd.min(0), rnd.max(0))
        ))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
