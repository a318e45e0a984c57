"""Does the [CLS] attention look at the nodule? S_ATT mass inside a lesion mask against the mask's share.

For a nodule-centred crop with its binary mask, S_ATT (the head-averaged [CLS]-to-patch attention
of the last SA block, summing to 1 over the SA grid) is spread over the voxels of each cell. The
share of the attention that falls inside the mask is compared with the share of the volume the
mask covers: uniform attention gives equal shares (ratio 1), an encoder that attends to the
lesion gives a ratio above 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from monai.networks.utils import eval_mode
from monai.transforms import Compose, EnsureTyped, ResizeWithPadOrCropd

from dagman_components.data import HU_WINDOW, ct_load_and_normalise
from dagman_components.networks import EncoderOutput
from dagman_components.networks.attention_map import attention_to_voxels

__all__ = ["nodule_and_mask_transforms", "attention_mass_in_mask", "attention_in_mask_report"]


def nodule_and_mask_transforms(roi_size: Sequence[int] = (32, 32, 32), spacing: Sequence[float] = (1.0, 1.0, 1.0),
                               hu_window: Sequence[float] = HU_WINDOW) -> Compose:
    """The nodule preprocessing (project CT preprocessing, then a centred ``roi_size`` box) applied to
    ``image`` and, with nearest resampling and no intensity change, to ``mask``."""
    return Compose([
        *ct_load_and_normalise(("image",), ("mask",), spacing=spacing, hu_window=hu_window),
        ResizeWithPadOrCropd(("image", "mask"), spatial_size=tuple(roi_size), mode="constant"),
        EnsureTyped(("image", "mask"), dtype=torch.float32, track_meta=False),
    ])


def attention_mass_in_mask(s_att: torch.Tensor, sa_grid: Sequence[int], stride: int,
                           masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per case: the share of S_ATT inside the mask, and the mask's share of the volume.

    Args:
        s_att: (B, N) attention on the SA grid, rows summing to 1.
        sa_grid: the SA grid (d, h, w), ``N = d*h*w``.
        stride: voxels per SA cell along each axis.
        masks: (B, 1, D, H, W) binary masks with ``D = d*stride`` etc.

    Returns:
        ``(mass_inside, mask_share)``, two (B,) arrays.

    Raises:
        ValueError: when the mask grid does not match the SA grid times ``stride``.
    """
    vox = attention_to_voxels(s_att.float(), tuple(int(g) for g in sa_grid), stride)
    if vox.shape[2:] != masks.shape[2:]:
        raise ValueError(f"masks of shape {tuple(masks.shape[2:])} do not match the attention grid {tuple(vox.shape[2:])}.")
    m = (masks > 0.5).float()
    inside = (vox * m).flatten(1).sum(1)
    share = m.flatten(1).mean(1)
    return inside.cpu().numpy(), share.cpu().numpy()


@torch.no_grad()
def attention_in_mask_report(encoder: nn.Module, items: Sequence[Mapping[str, Any]], roi_size: Sequence[int] = (32, 32, 32),
                             spacing: Sequence[float] = (1.0, 1.0, 1.0), hu_window: Sequence[float] = HU_WINDOW,
                             batch_size: int = 32, device: str | torch.device = "cpu") -> dict[str, Any]:
    """S_ATT mass inside the nodule mask for every crop with a non-empty mask.

    Args:
        encoder: a :class:`~dagman_components.networks.SwinDAGMaN` (run in eval mode).
        items: dicts with ``image`` and ``mask`` paths (and optionally ``id``).
        roi_size: crop size (every side divisible by 32).
        spacing: voxel spacing in mm.
        hu_window: the pretraining HU window.
        batch_size: crops per forward pass.
        device: where the encoder runs.

    Returns:
        ``cases``, per-case ``mass_inside`` and ``mask_share``, and their summaries: ``mean_mass_inside``,
        ``mean_mask_share``, ``mean_ratio`` (mean of mass / share) and ``share_above_chance`` (fraction of
        cases whose mass exceeds their mask share).

    Raises:
        ValueError: when no crop has a non-empty mask after preprocessing.
    """
    transform = nodule_and_mask_transforms(roi_size, spacing, hu_window)
    encoder = encoder.to(device)
    inside_all, share_all, ids = [], [], []
    for start in range(0, len(items), batch_size):
        chunk = [transform(dict(it)) for it in items[start : start + batch_size]]
        keep = [i for i, c in enumerate(chunk) if float(c["mask"].sum()) > 0]
        if not keep:
            continue
        images = torch.stack([chunk[i]["image"] for i in keep]).to(device)
        masks = torch.stack([chunk[i]["mask"] for i in keep])
        with eval_mode(encoder):  # the previous mode is restored
            out = encoder(images)
        inside, share = attention_mass_in_mask(
            out[EncoderOutput.S_ATT].cpu(), out[EncoderOutput.SA_GRID].tolist(), encoder.sa_stride, masks
        )
        inside_all.append(inside)
        share_all.append(share)
        ids += [str(items[start + i].get("id", start + i)) for i in keep]
    if not inside_all:
        raise ValueError("no crop had a non-empty nodule mask after preprocessing; check the mask files.")
    inside, share = np.concatenate(inside_all), np.concatenate(share_all)
    return {"cases": len(ids), "ids": ids, "mass_inside": inside.tolist(), "mask_share": share.tolist(),
            "mean_mass_inside": float(inside.mean()), "mean_mask_share": float(share.mean()),
            "mean_ratio": float(np.mean(inside / share)), "share_above_chance": float(np.mean(inside > share))}
