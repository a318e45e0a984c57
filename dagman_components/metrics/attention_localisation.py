# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Does S_ATT find the lesion, or only the middle of the crop? Attention metrics a centre prior cannot pass.

Nodule crops are centred on the nodule, so a fixed map on the central cells "attends to the
nodule" without looking at the image. Here every crop is first shifted by a random offset (up to
``max_shift`` voxels per axis, zero fill), with its mask, so the lesion's cells move; then, per
crop, on the SA grid:

* **cell AUROC**: how well S_ATT ranks the cells holding lesion voxels above the others (1: every
  lesion cell above every other cell; 0.5: no better than chance);
* **mass ratio**: the S_ATT mass on the lesion (each cell weighted by the share of its voxels in the
  mask) over the lesion's share of the crop (1: uniform attention).

The same figures are computed for two references on the same shifted crops: a **tissue prior**
(each cell weighted by its mean intensity: bright tissue) and a **centre prior** (uniform on the
central cells). An encoder whose attention localises lesions beats both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.utils import eval_mode

from dagman_components.networks import EncoderOutput

__all__ = [
    "shift_volumes",
    "cell_fractions",
    "cell_auroc",
    "mass_ratio",
    "tissue_prior",
    "centre_prior",
    "sa_head_attention",
    "attention_localisation",
]


def shift_volumes(volumes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Shift each volume by an integer offset per axis, filling with zeros.

    Args:
        volumes: (B, C, D, H, W).
        offsets: (B, 3) integer offsets (positive: towards higher indices).

    Returns:
        The shifted volumes, same shape.
    """
    b, _, d, h, w = volumes.shape
    pad = int(offsets.abs().max()) if offsets.numel() else 0
    padded = F.pad(volumes, (pad, pad) * 3)
    out = torch.empty_like(volumes)
    for i in range(b):
        z, y, x = (pad - int(o) for o in offsets[i])
        out[i] = padded[i, :, z : z + d, y : y + h, x : x + w]
    return out


def cell_fractions(masks: torch.Tensor, stride: int) -> torch.Tensor:
    """Share of each SA cell's voxels inside the mask, (B, N) in the encoder's token order.

    Args:
        masks: (B, 1, D, H, W) binary masks.
        stride: voxels per SA cell along each axis.
    """
    return F.avg_pool3d((masks > 0.5).float(), kernel_size=int(stride)).flatten(1)


def cell_auroc(attention: torch.Tensor | np.ndarray, fractions: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per crop, the AUROC of the attention separating lesion cells (any lesion voxel) from the rest;
    NaN where all or no cells hold lesion voxels. Ties count half.

    Args:
        attention: (B, N) a map per crop (any scale).
        fractions: (B, N) :func:`cell_fractions`.
    """
    from scipy.stats import rankdata

    att, frac = np.asarray(attention, dtype=float), np.asarray(fractions, dtype=float)
    out = np.full(len(att), np.nan)
    for i, (a, f) in enumerate(zip(att, frac)):
        pos = f > 0
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos and n_neg:
            ranks = rankdata(a)
            out[i] = (ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out


def mass_ratio(attention: torch.Tensor | np.ndarray, fractions: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per crop, the attention mass on the lesion over the lesion's share of the crop (1: uniform);
    NaN for an empty mask. The attention is normalised to sum 1 per crop first."""
    att, frac = np.asarray(attention, dtype=float), np.asarray(fractions, dtype=float)
    att = att / np.clip(att.sum(1, keepdims=True), 1e-12, None)
    share = frac.mean(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(share > 0, (att * frac).sum(1) / share, np.nan)


def tissue_prior(images: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, N) each SA cell's mean intensity, normalised to sum 1 (uniform for an empty crop)."""
    cells = F.avg_pool3d(images.float().clamp_min(0), kernel_size=int(stride)).flatten(1)
    total = cells.sum(1, keepdim=True)
    return torch.where(total > 0, cells / total.clamp_min(1e-12), torch.full_like(cells, 1.0 / cells.shape[1]))


def centre_prior(grid: Sequence[int]) -> torch.Tensor:
    """(N,) uniform on the central cells of the grid (the middle two along an even axis, the middle
    one along an odd axis), zero elsewhere."""
    axes = []
    for n in grid:
        n = int(n)
        centre = torch.zeros(n)
        centre[(n - 1) // 2 : n // 2 + 1] = 1.0
        axes.append(centre)
    m = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return (m / m.sum()).flatten()


def sa_head_attention(encoder: nn.Module) -> torch.Tensor | None:
    """(B, heads, N) the [CLS]-to-patch attention of each head of the last SA block, from the encoder's
    last forward pass (each row renormalised over the patches), or ``None`` when not available."""
    sa = getattr(encoder, "sa", None)
    att = getattr(getattr(getattr(sa, "blocks", [None])[-1], "attn", None), "att_mat", None) if sa is not None else None
    if not isinstance(att, torch.Tensor) or att.ndim != 4:
        return None
    row = att[:, :, 0, 1:].float()
    return row / row.sum(-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def attention_localisation(
    encoder: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    max_shift: int = 8,
    seed: int = 0,
    patch_drop: float = 0.0,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Cell AUROC and mass ratio of S_ATT (head mean and each head) on shifted crops, with the tissue
    and centre priors on the same crops.

    Args:
        encoder: a Swin-DAGMaN encoder (run in eval mode; its mode is restored).
        images: (B, 1, D, H, W) preprocessed crops centred on their lesion.
        masks: (B, 1, D, H, W) lesion masks on the same grid.
        max_shift: largest offset per axis in voxels (0: no shift).
        seed: seed of the offsets and of the patch dropout.
        patch_drop: the noisy teacher's token-drop rate for the pass (0: the clean pass).
        batch_size: crops per forward pass.
        device: where the encoder runs.

    Returns:
        ``cases`` (crops with a lesion inside the crop after the shift), and for ``s_att``,
        ``head_<h>``, ``tissue_prior`` and ``centre_prior`` each ``{"cell_auroc": mean,
        "mass_ratio": mean}`` over those crops.

    Raises:
        ValueError: when no crop keeps lesion voxels, or the shapes differ.
    """
    if images.shape != masks.shape:
        raise ValueError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)} must have the same shape.")
    g = torch.Generator().manual_seed(int(seed))
    offsets = torch.randint(-int(max_shift), int(max_shift) + 1, (len(images), 3), generator=g)
    images, masks = shift_volumes(images.float(), offsets), shift_volumes(masks.float(), offsets)
    keep = (masks > 0.5).flatten(1).any(1)
    if not bool(keep.any()):
        raise ValueError("no crop keeps lesion voxels after the shift; check the masks (or lower max_shift).")
    images, masks = images[keep], masks[keep]
    maps: dict[str, list[torch.Tensor]] = {"s_att": []}
    stride = int(getattr(encoder, "sa_stride"))
    with eval_mode(encoder):
        for start in range(0, len(images), int(batch_size)):
            x = images[start : start + int(batch_size)].to(device)
            drop = None
            if patch_drop > 0:
                grid = [s // int(encoder.patch_size[0] if hasattr(encoder.patch_size, "__len__") else encoder.patch_size)
                        for s in x.shape[2:]]
                drop = (torch.rand((len(x), *grid), generator=g) < float(patch_drop)).float().to(device)
            out = encoder(x, token_drop=drop) if drop is not None else encoder(x)
            maps["s_att"].append(out[EncoderOutput.S_ATT].float().cpu())
            heads = sa_head_attention(encoder)
            if heads is not None:
                for h in range(heads.shape[1]):
                    maps.setdefault(f"head_{h}", []).append(heads[:, h].cpu())
    frac = cell_fractions(masks, stride)
    result: dict[str, Any] = {"cases": int(len(images)), "max_shift": int(max_shift), "patch_drop": float(patch_drop)}
    named = {k: torch.cat(v) for k, v in maps.items()}
    named["tissue_prior"] = tissue_prior(images, stride)
    named["centre_prior"] = centre_prior([s // stride for s in images.shape[2:]]).expand(len(images), -1)
    for name, att in named.items():
        result[name] = {"cell_auroc": float(np.nanmean(cell_auroc(att, frac))),
                        "mass_ratio": float(np.nanmean(mass_ratio(att, frac)))}
    return result
