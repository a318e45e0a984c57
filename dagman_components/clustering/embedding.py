# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""A seeded 2D UMAP of the features and its scatter plot, one colour per class, with a legend."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np

from dagman_components.atomic import atomic_write_bytes

__all__ = ["umap_embedding", "plot_embedding"]

logger = logging.getLogger(__name__)


def umap_embedding(
    x: np.ndarray, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0, metric: str = "euclidean"
) -> tuple[np.ndarray, dict[str, object]]:
    """Embed ``x`` in 2D with umap-learn, reproducibly (``random_state`` set, so single-threaded).

    ``n_neighbors`` is capped at ``N - 1`` so that small sets run.

    Args:
        x: ``(N, F)`` features, ``N >= 3``.
        n_neighbors: UMAP's neighbourhood size.
        min_dist: UMAP's minimum distance in the embedding.
        seed: UMAP's ``random_state``.
        metric: input-space metric.

    Returns:
        ``(embedding (N, 2) float32, settings used)``.

    Raises:
        ValueError: for fewer than 3 cases or ``n_neighbors < 2``.
    """
    import umap

    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 3:
        raise ValueError(f"UMAP needs at least 3 cases of (N, F) features, got shape {x.shape}.")
    if n_neighbors < 2:
        raise ValueError(f"umap n_neighbors must be at least 2, got {n_neighbors}.")
    used = int(min(n_neighbors, x.shape[0] - 1))
    reducer = umap.UMAP(
        n_components=2, n_neighbors=used, min_dist=float(min_dist), metric=metric, random_state=int(seed)
    )
    embedding = reducer.fit_transform(x).astype(np.float32)
    return embedding, {"n_neighbors": used, "min_dist": float(min_dist), "metric": metric, "seed": int(seed)}


def _colours(n: int) -> list:
    import matplotlib

    if n <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(n)]
    return [matplotlib.colormaps["gist_ncar"](i / n) for i in range(n)]


def plot_embedding(
    embedding: np.ndarray,
    labels: np.ndarray,
    names: Mapping[int, str],
    path: str | os.PathLike,
    title: str = "",
    subtitle_lines: Sequence[str] = (),
) -> None:
    """Scatter the 2D embedding, one colour (and, past 10 classes, marker) per class, legend beside
    the axes; written atomically as PNG.

    Args:
        embedding: ``(N, 2)``.
        labels: ``(N,)`` label ids, each a key of ``names``.
        names: label id -> legend text.
        path: output ``.png``.
        title: figure title.
        subtitle_lines: extra lines under the title (e.g. the metrics).

    Raises:
        ValueError: for a shape mismatch or a label without a name.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    embedding, labels = np.asarray(embedding), np.asarray(labels).reshape(-1)
    if embedding.ndim != 2 or embedding.shape[1] != 2 or embedding.shape[0] != labels.shape[0]:
        raise ValueError(f"embedding must be (N, 2) with N = {labels.shape[0]}, got {embedding.shape}.")
    classes = [int(c) for c in np.unique(labels)]
    missing = [c for c in classes if c not in names]
    if missing:
        raise ValueError(f"labels {missing} have no name for the legend.")
    colours, markers = _colours(len(classes)), "os^Dv<>pP*X"
    fig, ax = plt.subplots(figsize=(8.5 if len(classes) <= 20 else 11, 6), dpi=110)
    try:
        for k, c in enumerate(classes):
            sel = labels == c
            ax.scatter(
                embedding[sel, 0],
                embedding[sel, 1],
                s=22,
                color=colours[k],
                marker=markers[k % len(markers)] if len(classes) > 10 else "o",
                edgecolors="black",
                linewidths=0.3,
                label=f"{names[c]} ({int(sel.sum())})",
            )
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
        ax.set_title("\n".join([title, *subtitle_lines]).strip(), fontsize=9)
        ax.legend(
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize=7 if len(classes) <= 20 else 6,
            ncol=1 if len(classes) <= 24 else 2,
            frameon=False,
            title="organ (cases)",
            title_fontsize=8,
        )
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)
