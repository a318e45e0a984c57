"""The semantic-attention [CLS] map of a checkpoint overlaid on CT slices (the paper's Figures 5 and 6).

For each volume the frozen encoder (``eval`` mode, no mask, no patch dropout) gives S_ATT, the
[CLS]-to-patch attention of the last semantic-attention block on the SA grid; it is upsampled to
voxels (trilinear, ``align_corners=False``), scaled to [0, 1] per volume and drawn in a colour map
over the grey CT. The PNG has one row per volume and, per chosen slice, two panels (CT, CT with
attention), each panel at the volume's slice size in pixels times ``scale``; it is assembled as an
array, so its pixel size is exact: ``(rows * H * scale, 2 * slices * W * scale)``.
"""

from __future__ import annotations

import io
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

from dagman_components.metrics.diversity_report import load_encoder_from_card, read_model_card, volume_loader
from dagman_components.weights import atomic_write_text

__all__ = ["attention_volume", "overlay_rows", "save_rgb_png", "attention_overlay_figure"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def attention_volume(encoder: nn.Module, image: torch.Tensor) -> np.ndarray:
    """S_ATT of one image upsampled to its voxels and scaled to [0, 1].

    Args:
        encoder: a frozen :class:`SwinDAGMaN` or :class:`ViTDAGMaN` (with an SA block).
        image: (1, C, D, H, W).

    Returns:
        (D, H, W) float array in [0, 1].

    Raises:
        ValueError: for an encoder without a semantic-attention output.
    """
    was_training = encoder.training
    encoder.eval()
    try:
        out = encoder(image)
    finally:
        encoder.train(was_training)
    if "s_att" not in out:
        raise ValueError(f"{type(encoder).__name__} has no semantic-attention block (sa_stage=None): no S_ATT to draw.")
    grid = [int(g) for g in out["sa_grid"]]
    att = out["s_att"][:1].reshape(1, 1, *grid).float()
    vox = F.interpolate(att, size=tuple(image.shape[2:]), mode="trilinear", align_corners=False)[0, 0].cpu().numpy()
    lo, hi = float(vox.min()), float(vox.max())
    return (vox - lo) / (hi - lo) if hi > lo else np.zeros_like(vox)


def _slice(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.rot90(np.take(vol, index, axis=axis))  # RAS volumes: rotate so anterior is up


def overlay_rows(
    images: Sequence[np.ndarray],
    attentions: Sequence[np.ndarray],
    slices: int = 3,
    axis: int = 2,
    alpha: float = 0.5,
    scale: int = 1,
    cmap: str = "jet",
) -> np.ndarray:
    """Assemble the overlay figure as one RGB array.

    Args:
        images: (D, H, W) CT volumes scaled to [0, 1], all of one shape.
        attentions: matching (D, H, W) attention maps in [0, 1].
        slices: evenly spaced slices per volume (through the inner 60 % of ``axis``).
        axis: slicing axis (2: axial for RAS volumes).
        alpha: opacity of the attention colour.
        scale: integer pixel magnification of every panel.
        cmap: matplotlib colour map of the attention.

    Returns:
        (rows * h * scale, 2 * slices * w * scale, 3) float array in [0, 1].

    Raises:
        ValueError: for mismatched lengths or shapes.
    """
    import matplotlib

    if len(images) != len(attentions) or not images:
        raise ValueError(f"need as many attention maps as images (got {len(images)} and {len(attentions)}).")
    colour = matplotlib.colormaps[cmap]
    depth = images[0].shape[axis]
    idx = np.unique(np.linspace(0.2 * (depth - 1), 0.8 * (depth - 1), slices).round().astype(int))
    rows = []
    for img, att in zip(images, attentions):
        if img.shape != att.shape or img.shape != images[0].shape:
            raise ValueError(f"image {img.shape} and attention {att.shape} must share the first image's shape.")
        panels = []
        for i in idx:
            ct = np.clip(_slice(img, axis, i), 0.0, 1.0)
            grey = np.repeat(ct[..., None], 3, axis=-1)
            heat = colour(np.clip(_slice(att, axis, i), 0.0, 1.0))[..., :3]
            panels += [grey, (1.0 - alpha) * grey + alpha * heat]
        rows.append(np.concatenate(panels, axis=1))
    rgb = np.concatenate(rows, axis=0)
    if scale > 1:
        rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
    return rgb


def save_rgb_png(rgb: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an RGB array as a PNG of exactly its pixel size, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    plt.imsave(buf, np.clip(rgb, 0.0, 1.0), format="png")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return path


def attention_overlay_figure(
    model_path: str | os.PathLike,
    source: str | os.PathLike | Sequence[Mapping[str, Any]],
    png_path: str | os.PathLike,
    model_card: str | os.PathLike | Mapping | None = None,
    roi_size: Sequence[int] | int | None = None,
    spacing: Sequence[float] | None = None,
    max_volumes: int | None = 4,
    slices: int = 3,
    scale: int = 2,
    device: str | torch.device = "cpu",
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
        scale: pixel magnification.
        device: where to run.

    Returns:
        ``{"png", "volumes", "shape", "roi_size"}``.
    """
    card = read_model_card(model_path, model_card)
    roi = roi_size or card.get("training", {}).get("roi_size") or 64
    spacing = spacing or card.get("preprocessing", {}).get("spacing_mm") or (2.0, 2.0, 2.0)
    encoder = load_encoder_from_card(model_path, card, device=device)
    ds = volume_loader(source, roi, spacing=spacing, max_volumes=max_volumes)
    images, maps = [], []
    for i in range(len(ds)):
        img = ds[i]["image"].unsqueeze(0).to(device)
        maps.append(attention_volume(encoder, img))
        images.append(img[0, 0].cpu().numpy())
    rgb = overlay_rows(images, maps, slices=slices, scale=scale)
    path = save_rgb_png(rgb, png_path)
    info = {"png": str(path), "weights": str(model_path), "volumes": len(images), "shape": list(rgb.shape[:2]),
            "roi_size": list(roi) if not isinstance(roi, int) else [roi] * 3, "spacing_mm": list(spacing)}
    atomic_write_text(json.dumps(info, indent=2), path.with_suffix(".json"))
    logger.info("attention overlay of %d volume(s) -> %s", len(images), path)
    return info
