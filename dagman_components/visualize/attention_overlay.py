"""The semantic-attention [CLS] map of a checkpoint overlaid on CT slices (the paper's Figures 5 and 6).

For each volume the frozen encoder (``eval`` mode, no mask, no patch dropout) gives S_ATT, the
[CLS]-to-patch attention of the last semantic-attention block on the SA grid; it is upsampled to
voxels by nearest neighbour (each SA cell stays one block, so a finer grid, e.g. ``sa_stage`` 2,
shows as smaller cells), scaled to [0, 1] per volume and drawn by
:func:`~dagman_components.visualize.heatmap.plot_attention_slices`: a sequential colour map whose
opacity grows with attention over the grey CT, a colour bar, the mask's outline when the items
carry one, and the grid and its cell size in mm in the title. One row per volume; per chosen
slice, the CT alone and the CT with attention.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dagman_components.atomic import atomic_write_text
from dagman_components.weights.encoder_io import EncoderOutput, prepare_encoder, read_model_card
from dagman_components.metrics.diversity_report import volume_loader
from dagman_components.runtime.progress import progress
from dagman_components.visualize.heatmap import (
    grid_title,
    plot_attention_slices,
    save_figure_atomic,
)

__all__ = ["attention_volume", "attention_overlay_figure"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def attention_volume(encoder: nn.Module, image: torch.Tensor, mode: str = "nearest",
                     return_grid: bool = False) -> np.ndarray | tuple[np.ndarray, tuple[int, int, int]]:
    """S_ATT of one image upsampled to its voxels and scaled to [0, 1].

    Args:
        encoder: a frozen :class:`SwinDAGMaN` or :class:`ViTDAGMaN` (with an SA block).
        image: (1, C, D, H, W).
        mode: ``"nearest"`` shows the true attention cells (one value per SA cell); ``"trilinear"``
            smooths across them.
        return_grid: also return the SA grid shape.

    Returns:
        (D, H, W) float array in [0, 1]; with ``return_grid``, also the SA grid ``(D', H', W')``.

    Raises:
        ValueError: for an encoder without a semantic-attention output.
    """
    was_training = encoder.training
    encoder.eval()
    try:
        out = encoder(image)
    finally:
        encoder.train(was_training)
    if EncoderOutput.S_ATT not in out:
        raise ValueError(f"{type(encoder).__name__} has no semantic-attention block (sa_stage=None): no S_ATT to draw.")
    grid = tuple(int(g) for g in out[EncoderOutput.SA_GRID])
    att = out[EncoderOutput.S_ATT][:1].reshape(1, 1, *grid).float()
    extra = {"align_corners": False} if mode == "trilinear" else {}
    vox = F.interpolate(att, size=tuple(image.shape[2:]), mode=mode, **extra)[0, 0].cpu().numpy()
    lo, hi = float(vox.min()), float(vox.max())
    vox = (vox - lo) / (hi - lo) if hi > lo else np.zeros_like(vox)
    return (vox, grid) if return_grid else vox  # type: ignore[return-value]


def attention_overlay_figure(
    model_path: str | os.PathLike,
    source: str | os.PathLike | Sequence[Mapping[str, Any]],
    png_path: str | os.PathLike,
    model_card: str | os.PathLike | Mapping | None = None,
    roi_size: Sequence[int] | int | None = None,
    spacing: Sequence[float] | None = None,
    max_volumes: int | None = 4,
    slices: int = 3,
    device: str | torch.device = "cpu",
    mask_key: str = "mask",
) -> dict[str, Any]:
    """Draw the SA [CLS] attention of a checkpoint over CT slices into one PNG.

    Args:
        model_path: the pretraining bundle's ``models/model.pt``.
        source: CT volumes (folder, JSON datalist or list of ``{"image": path}``).
        png_path: output PNG (a ``.json`` with the same stem records the settings).
        model_card: encoder settings (default: ``model_card.json`` beside ``model_path``).
        roi_size: crop size (default: the card's pretraining ``roi_size``; the ViT needs exactly that).
        spacing: voxel spacing (default: the card's, else 2 mm).
        max_volumes: volumes drawn (one row each).
        slices: slices per volume.
        device: where to run.
        mask_key: items (of a list or JSON datalist) holding a mask under this key get its outline drawn.

    Returns:
        ``{"png", "weights", "volumes", "sa_grid", "cell_mm", "roi_size", "spacing_mm"}``.
    """
    card = read_model_card(model_card if model_card is not None else model_path)
    roi = roi_size or card.get("training", {}).get("roi_size") or 64
    spacing = spacing or card.get("preprocessing", {}).get("spacing_mm") or (2.0, 2.0, 2.0)
    encoder = prepare_encoder(model_path, card, seed=0).to(device)
    ds = volume_loader(source, roi, spacing=spacing, max_volumes=max_volumes, mask_key=mask_key)
    images, maps, masks, grid = [], [], [], (1, 1, 1)
    for i in progress(range(len(ds)), "attention overlay", unit="volume"):
        item = ds[i]
        img = item["image"].unsqueeze(0).to(device)
        vox, grid = attention_volume(encoder, img, return_grid=True)
        maps.append(vox)
        images.append(img[0, 0].cpu().numpy())
        masks.append(np.asarray(item[mask_key][0]) if mask_key in item else None)
    cell_mm = [round(float(n) / g * float(sp), 2) for n, g, sp in zip(images[0].shape, grid, spacing)]
    fig = plot_attention_slices(images, maps, masks, slices=slices,
                                title=f"[CLS] attention, {grid_title(grid, cell_mm)}",
                                colorbar_label="attention (case min to max)")
    path = Path(png_path)
    save_figure_atomic(fig, path)
    info = {"png": str(path), "weights": str(model_path), "volumes": len(images), "sa_grid": list(grid),
            "cell_mm": cell_mm, "roi_size": list(roi) if not isinstance(roi, int) else [roi] * 3,
            "spacing_mm": list(spacing)}
    atomic_write_text(json.dumps(info, indent=2), path.with_suffix(".json"))
    logger.info("attention overlay of %d volume(s) -> %s", len(images), path)
    return info
