# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Attention drawn as a heat map a reader can interpret: one sequential colour map whose opacity grows
with the attention, over the grey CT, with a colour bar, the lesion's outline when a mask is given,
and the attention grid's cell size in mm in the title.

Both attention pictures of the project use :func:`plot_attention_slices`: the pretraining overlay
(:mod:`dagman_components.visualize.attention_overlay`) and the classification montage
(:func:`dagman_components.classification.plot_attention_montage`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["attention_rgba", "grid_title", "plot_attention_slices"]

#: Outline colour of the mask: stands out against the grey CT and the colour map.
OUTLINE_COLOUR = "cyan"


def attention_rgba(attention: np.ndarray, vmin: float, vmax: float, cmap: str = "inferno",
                   max_alpha: float = 0.75) -> np.ndarray:
    """Colour an attention slice with opacity rising from 0 (at ``vmin``) to ``max_alpha`` (at ``vmax``).

    Args:
        attention: a 2D slice.
        vmin: value drawn fully transparent.
        vmax: value drawn at ``max_alpha``.
        cmap: a sequential matplotlib colour map.
        max_alpha: opacity of the most attended value.

    Returns:
        ``(H, W, 4)`` RGBA in [0, 1].
    """
    import matplotlib

    span = vmax - vmin if vmax > vmin else 1.0
    level = np.clip((np.asarray(attention, dtype=float) - vmin) / span, 0.0, 1.0)
    rgba = matplotlib.colormaps[cmap](level)
    rgba[..., 3] = max_alpha * level
    return rgba


def grid_title(sa_grid: Sequence[int], cell_mm: Sequence[float]) -> str:
    """``"SA grid 4 x 4 x 4, cells of 8 x 8 x 8 mm"``: what one attention value covers."""
    grid = " x ".join(str(int(g)) for g in sa_grid)
    cell = " x ".join(f"{float(c):g}" for c in cell_mm)
    return f"SA grid {grid}, cells of {cell} mm"


def _slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.rot90(np.take(volume, index, axis=axis))  # RAS volumes: anterior up


def plot_attention_slices(
    images: Sequence[np.ndarray],
    attentions: Sequence[np.ndarray],
    masks: Sequence[np.ndarray | None] | None = None,
    slices: int = 3,
    axis: int = 2,
    title: str = "",
    row_titles: Sequence[str] | None = None,
    colorbar_label: str = "attention",
    with_plain_ct: bool = True,
    cmap: str = "inferno",
    panel_inches: float = 1.8,
) -> Any:
    """Draw CT slices with the attention over them, one row per volume, and a shared colour bar.

    Each volume's attention is scaled from its own minimum (transparent) to its maximum (most
    opaque); the colour bar gives the fraction of that range. Slices are evenly spaced through the
    inner 60 % of ``axis`` (one slice: the middle one).

    Args:
        images: ``(D, H, W)`` CT volumes in [0, 1], all of one shape.
        attentions: matching attention volumes (already on the voxel grid).
        masks: optional matching masks (or ``None`` per volume); their outline is drawn.
        slices: slices per volume.
        axis: slicing axis (2: axial for RAS volumes).
        title: the figure title (e.g. :func:`grid_title`).
        row_titles: one label per volume.
        colorbar_label: label of the colour bar.
        with_plain_ct: put the CT without attention beside each overlay.
        cmap: a sequential colour map.
        panel_inches: size of one panel.

    Returns:
        The matplotlib figure (save it, then close it).

    Raises:
        ValueError: for mismatched lengths or shapes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    masks = list(masks) if masks is not None else [None] * len(images)
    if not images or len(images) != len(attentions) or len(masks) != len(images):
        raise ValueError(f"need as many attention maps (and masks) as images (got {len(images)}, "
                         f"{len(attentions)} and {len(masks)}).")
    depth = images[0].shape[axis]
    if slices == 1:  # the middle slice (a lesion-centred crop's lesion)
        idx = np.array([round(0.5 * (depth - 1))])
    else:
        idx = np.unique(np.linspace(0.2 * (depth - 1), 0.8 * (depth - 1), slices).round().astype(int))
    per_slice = 2 if with_plain_ct else 1
    cols = per_slice * len(idx)
    fig, axes = plt.subplots(len(images), cols, squeeze=False,
                             figsize=(panel_inches * cols + 1.2, panel_inches * len(images) + 0.6), dpi=110)
    for row, (img, att, mask) in enumerate(zip(images, attentions, masks)):
        if img.shape != att.shape or img.shape != images[0].shape or (mask is not None and mask.shape != img.shape):
            raise ValueError(f"image {img.shape}, attention {att.shape} and mask must share the first image's shape.")
        lo, hi = float(att.min()), float(att.max())
        for k, i in enumerate(idx):
            panels = axes[row, per_slice * k: per_slice * (k + 1)]
            for ax in panels:
                ax.imshow(_slice(img, axis, i), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
            panels[-1].imshow(attention_rgba(_slice(att, axis, i), lo, hi, cmap), interpolation="nearest")
            if mask is not None and np.any(_slice(mask, axis, i) > 0.5):
                for ax in panels:
                    ax.contour(_slice(mask, axis, i) > 0.5, levels=[0.5], colors=OUTLINE_COLOUR, linewidths=1.0)
            panels[0].set_title(f"slice {i}", fontsize=7)
        if row_titles is not None:
            axes[row, 0].set_ylabel(str(row_titles[row]), fontsize=7)
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap), ax=axes, fraction=0.03, pad=0.02)
    bar.set_label(colorbar_label, fontsize=7)
    bar.ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=8)
    return fig


def save_figure_atomic(fig: Any, path: str | os.PathLike) -> None:
    """Write a figure as PNG through a temporary file and a rename, then close it."""
    from dagman_components.atomic import atomic_write_png

    atomic_write_png(fig, path, close=True)
