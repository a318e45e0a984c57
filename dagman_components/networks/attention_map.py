# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""The [CLS]-to-patch attention of the semantic-attention block, on the input's voxel grid.

S_ATT (B, N) lives on the SA grid (one cell = ``sa_stride``^3 voxels, 16^3 for the defaults) and
sums to 1 over the N cells. :func:`attention_to_voxels` repeats each cell's value over its voxels
(nearest-neighbour upsampling, so nothing is invented between cells) and divides it by the
voxels per cell: the voxel map is a distribution that **sums to 1 over the input volume**, and
its mean over one cell's voxels is that cell's S_ATT divided by the cell's voxel count.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["attention_to_voxels"]


def attention_to_voxels(s_att: torch.Tensor, sa_grid: torch.Tensor | tuple[int, int, int], stride: int) -> torch.Tensor:
    """Upsample S_ATT to the input grid.

    Args:
        s_att: (B, N) attention on the SA grid, rows summing to 1.
        sa_grid: the grid shape (D', H', W') with D'H'W' = N (``SwinDAGMaN`` returns it as ``sa_grid``).
        stride: voxels per SA cell along each axis (``SwinDAGMaN.sa_stride``).

    Returns:
        (B, 1, D'*stride, H'*stride, W'*stride), each voxel holding its cell's value / stride^3.

    Raises:
        ValueError: when ``N`` does not match the grid.

    Example:
        >>> att = attention_to_voxels(torch.full((1, 8), 1 / 8), (2, 2, 2), 16)
        >>> att.shape, round(float(att.sum()), 6)
        (torch.Size([1, 1, 32, 32, 32]), 1.0)
    """
    grid = [int(g) for g in (sa_grid.tolist() if isinstance(sa_grid, torch.Tensor) else sa_grid)]
    if s_att.ndim != 2 or s_att.shape[1] != int(np.prod(grid)):
        raise ValueError(f"s_att of shape {tuple(s_att.shape)} does not match the SA grid {grid}.")
    att = s_att.reshape(s_att.shape[0], 1, *grid)
    for axis in (2, 3, 4):
        att = att.repeat_interleave(stride, dim=axis)
    return att / float(stride**3)
