# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""PNG figures of the classification bundle: ROC curves and attention montages.
Every figure is written atomically (temporary file, then rename)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dagman_components.atomic import atomic_write_png
from dagman_components.visualize.backend import pyplot

__all__ = ["save_png_atomic", "plot_roc_curves", "plot_attention_montage"]


def save_png_atomic(fig: Any, path: str | os.PathLike) -> None:
    """Render a matplotlib figure to ``path`` through a temporary file and close it."""
    atomic_write_png(fig, path, close=True)


def plot_roc_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float], float]], path: str | os.PathLike,
                    title: str = "ROC", points: Mapping[str, tuple[float, float]] | None = None) -> None:
    """ROC curves (one per name: ``(fpr, tpr, auc)``) with the chance diagonal, and optional operating
    points (``name -> (1 - specificity, sensitivity)``) at the chosen thresholds."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    for name, (fpr, tpr, auc) in curves.items():
        line = ax.plot(fpr, tpr, lw=1.6, label=f"{name} (AUC {auc:.3f})")[0]
        if points and name in points:
            ax.plot(*points[name], "o", color=line.get_color(), ms=6)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_png_atomic(fig, path)


def plot_attention_montage(image: np.ndarray, attention: np.ndarray, path: str | os.PathLike, title: str = "",
                           n_slices: int = 8, mask: np.ndarray | None = None, sa_grid: Sequence[int] | None = None,
                           cell_mm: Sequence[float] | None = None) -> None:
    """Axial slices (last axis) of ``image`` with ``attention`` drawn as a heat map over it
    (:func:`~dagman_components.visualize.heatmap.plot_attention_slices`: sequential colour map,
    transparent where attention is lowest, colour bar, the nodule's outline when ``mask`` is given).

    Args:
        image: (X, Y, Z) intensities (e.g. the [0, 1] network input).
        attention: (X, Y, Z) attention on the same grid.
        path: PNG path.
        title: figure title (e.g. case id and probability).
        n_slices: number of panels.
        mask: optional (X, Y, Z) nodule mask on the same grid.
        sa_grid: the attention grid's shape, added to the title with ``cell_mm``.
        cell_mm: the size of one attention cell in mm.
    """
    from dagman_components.visualize.heatmap import grid_title, plot_attention_slices

    if sa_grid is not None and cell_mm is not None:
        title = f"{title}\n{grid_title(sa_grid, cell_mm)}" if title else grid_title(sa_grid, cell_mm)
    fig = plot_attention_slices([image], [attention], [mask], slices=min(n_slices, image.shape[-1]), axis=2,
                                title=title, colorbar_label="attention (case min to max)", with_plain_ct=False)
    save_png_atomic(fig, path)
