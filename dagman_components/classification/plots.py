# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""PNG figures of the classification bundle: ROC curves, training curves and attention montages.
Every figure is written atomically (temporary file, then rename)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dagman_components.classification._files import replace_atomically

__all__ = ["save_png_atomic", "plot_roc_curves", "plot_training_curves", "plot_attention_montage"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png_atomic(fig: Any, path: str | os.PathLike) -> None:
    """Render a matplotlib figure to ``path`` through a temporary file and close it."""
    try:
        replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png"), suffix=".png")
    finally:
        _pyplot().close(fig)


def plot_roc_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float], float]], path: str | os.PathLike,
                    title: str = "ROC", points: Mapping[str, tuple[float, float]] | None = None) -> None:
    """ROC curves (one per name: ``(fpr, tpr, auc)``) with the chance diagonal, and optional operating
    points (``name -> (1 - specificity, sensitivity)``) at the chosen thresholds."""
    plt = _pyplot()
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


def plot_training_curves(epochs: Sequence[int], loss: Sequence[float], val_epochs: Sequence[int],
                         val_auc: Sequence[float], path: str | os.PathLike, title: str = "training") -> None:
    """Training loss per epoch and validation AUC per validation, side by side."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    a.plot(epochs, loss, "-o", ms=3)
    a.set(xlabel="epoch", ylabel="weighted cross-entropy", title=f"{title}: loss")
    b.plot(val_epochs, val_auc, "-o", ms=3, color="C1")
    b.set(xlabel="epoch", ylabel="AUC", ylim=(0, 1), title="validation AUC")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png_atomic(fig, path)


def plot_attention_montage(image: np.ndarray, attention: np.ndarray, path: str | os.PathLike, title: str = "",
                           n_slices: int = 8) -> None:
    """Axial slices (evenly spread over the last axis) of ``image`` with ``attention`` overlaid, its
    colour scale running from the least (blue) to the most attended voxel (red) of the case.

    Args:
        image: (X, Y, Z) intensities (e.g. the [0, 1] network input).
        attention: (X, Y, Z) attention on the same grid.
        path: PNG path.
        title: figure title (e.g. case id and probability).
        n_slices: number of panels.
    """
    plt = _pyplot()
    z = np.linspace(0, image.shape[-1] - 1, num=min(n_slices, image.shape[-1])).round().astype(int)
    fig, axes = plt.subplots(1, len(z), figsize=(1.6 * len(z), 2.0), dpi=110)
    vmin, vmax = float(attention.min()), float(attention.max())
    vmax = vmax if vmax > vmin else vmin + 1e-12  # uniform attention: one colour
    for ax, k in zip(np.atleast_1d(axes), z):
        ax.imshow(image[:, :, k].T, cmap="gray", origin="lower", vmin=0, vmax=1)
        ax.imshow(attention[:, :, k].T, cmap="jet", origin="lower", alpha=0.35, vmin=vmin, vmax=vmax)
        ax.set_title(f"z={k}", fontsize=7)
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    save_png_atomic(fig, path)
