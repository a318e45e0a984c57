# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""The nodule preprocessing at 1 mm / 32^3, under its classification name:
the code is in :mod:`dagman_components.data.nodule_transforms`.

It lives in the core because the pretraining probe uses it too (the core imports no task package).
"""

from __future__ import annotations

from dagman_components.data.nodule_transforms import (
    NODULE_SPACING,
    NODULE_ROI,
    CoordinateSystem,
    world_to_voxel,
    CropWorldPointd,
    nodule_preprocessing,
    nodule_augmentation,
)

__all__ = [
    "NODULE_SPACING", "NODULE_ROI", "CoordinateSystem", "world_to_voxel", "CropWorldPointd", "nodule_preprocessing",
    "nodule_augmentation"
]
