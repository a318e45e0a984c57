# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Nodule preprocessing: the project's CT preprocessing at 1 mm, then a fixed 32^3 box on the nodule.

The ROI (defined once here and referenced by the bundle configs):

* :data:`NODULE_SPACING` = 1 mm isotropic. The LIDC crops are about 0.7 x 0.7 x 2.5 mm; at the
  project's 2 mm a median nodule (7 mm) would be 3-4 voxels across, at 1 mm it is 7.
* :data:`NODULE_ROI` = 32^3 voxels = 32 mm, divisible by the Swin's 32. The crops span a median
  31 x 31 x 8 mm (95th percentile 39 x 42 x 30 mm) and nodules are 3-32 mm across, so the box holds
  the nodule and its immediate context; the short z extent of most crops is padded with 0 (the
  bottom of the HU window, i.e. air-like). At this ROI the semantic-attention grid is 2^3 cells
  of 16 mm.

Crops are centred by :class:`~monai.transforms.ResizeWithPadOrCropd` (the crops are nodule
centred). For full CT volumes, :class:`CropWorldPointd` cuts the box around a world-coordinate
centre: once in the native grid (a physical box with a margin, so only a small region is
resampled), and once more, exactly, after resampling.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    BorderPad,
    EnsureTyped,
    MapTransform,
    Orientationd,
    RandFlipd,
    RandRotate90d,
    RandShiftIntensityd,
    ResizeWithPadOrCropd,
    SpatialCrop,
    Transform,
)
from monai.utils import StrEnum, ensure_tuple, look_up_option

from dagman_components.data import HU_WINDOW, check_roi_size, ct_load_and_normalise

__all__ = [
    "NODULE_SPACING",
    "NODULE_ROI",
    "CoordinateSystem",
    "world_to_voxel",
    "CropWorldPointd",
    "nodule_preprocessing",
    "nodule_augmentation",
]

logger = logging.getLogger(__name__)

#: Voxel spacing (mm) of every nodule input; see the module docstring for why.
NODULE_SPACING: tuple[float, float, float] = (1.0, 1.0, 1.0)
#: Network input size (voxels) around each nodule; 32 mm at :data:`NODULE_SPACING`.
NODULE_ROI: tuple[int, int, int] = (32, 32, 32)
#: Extra millimetres on each side of the first, native-grid crop of a full volume (room for resampling).
_NATIVE_MARGIN_MM = 4.0


class CoordinateSystem(StrEnum):
    """World-coordinate convention of nodule centres. LUNA16 / ITK / DICOM use LPS (x to the patient's
    left, y posterior); NIfTI and MONAI's affines use RAS (x right-to-left negated, y anterior)."""

    LPS = "LPS"
    RAS = "RAS"


def world_to_voxel(point: Sequence[float], affine: Any, system: str = CoordinateSystem.LPS) -> np.ndarray:
    """Continuous voxel index of a world point.

    Args:
        point: (x, y, z) in mm.
        affine: 4x4 voxel-to-world matrix in RAS (a MONAI ``MetaTensor.affine``; MONAI converts ITK's
            LPS to RAS on loading).
        system: the convention of ``point`` (:class:`CoordinateSystem`).

    Returns:
        The (i, j, k) index as floats.

    Example:
        >>> world_to_voxel([-10.0, -20.0, 5.0], np.diag([2.0, 2.0, 2.0, 1.0]), "RAS")
        array([ -5. , -10. ,   2.5])
    """
    system = look_up_option(system, CoordinateSystem)
    p = np.asarray(point, dtype=np.float64).reshape(3)
    if system == CoordinateSystem.LPS:
        p = p * np.array([-1.0, -1.0, 1.0])
    a = np.asarray(affine.cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    return (np.linalg.inv(a) @ np.append(p, 1.0))[:3]


class CropWorldPointd(MapTransform):
    """Cut a box centred on a world-coordinate point, padding where it leaves the image.

    The point's voxel index is rounded; the box spans ``index - size // 2`` to ``index - size // 2 +
    size`` on each axis, so the point sits in voxel ``size // 2`` of the output. Parts outside the
    image are padded with ``pad_value``. The output's affine is updated (MONAI's ``BorderPad`` and
    ``SpatialCrop``), so later transforms (orientation, resampling) stay consistent.

    Args:
        keys: image keys.
        point_key: item key of the centre, (x, y, z) in mm.
        roi_size: box size in voxels of the current grid; or
        physical_size: box size in mm (converted per axis with the voxel sizes of the affine, rounded up).
        coordinate_system: the convention of the point (LPS for LUNA16 / ITK, RAS).
        pad_value: value of padded voxels (``-1024`` = air in HU before the intensity scaling).
        allow_missing_keys: don't raise for missing keys.

    Raises:
        ValueError: not exactly one of ``roi_size`` / ``physical_size``; at call time, a point outside
            the image (the message names the file and suggests checking ``coordinate_system``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        point_key: str = "center",
        roi_size: Sequence[int] | int | None = None,
        physical_size: Sequence[float] | float | None = None,
        coordinate_system: str = CoordinateSystem.LPS,
        pad_value: float = -1024.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if (roi_size is None) == (physical_size is None):
            raise ValueError("give exactly one of roi_size (voxels) and physical_size (mm).")
        self.point_key = point_key
        self.roi_size = None if roi_size is None else tuple(int(s) for s in ensure_tuple(roi_size)) * (
            3 if isinstance(roi_size, int) else 1)
        self.physical_size = None if physical_size is None else tuple(float(s) for s in ensure_tuple(physical_size)) * (
            3 if isinstance(physical_size, (int, float)) else 1)
        self.coordinate_system = look_up_option(coordinate_system, CoordinateSystem)
        self.pad_value = float(pad_value)

    def _box_size(self, affine: np.ndarray) -> np.ndarray:
        if self.roi_size is not None:
            return np.asarray(self.roi_size)
        voxel = np.linalg.norm(affine[:3, :3], axis=0)
        return np.array([max(1, math.ceil(mm / v)) for mm, v in zip(self.physical_size, voxel)])  # type: ignore[arg-type]

    def crop(self, img: MetaTensor, point: Sequence[float]) -> MetaTensor:
        """The box of ``img`` (C, X, Y, Z) around ``point``."""
        affine = np.asarray(img.affine, dtype=np.float64)
        shape = np.asarray(img.shape[1:])
        index = world_to_voxel(point, affine, self.coordinate_system)
        if np.any(index < -0.5) or np.any(index > shape - 0.5):
            name = img.meta.get("filename_or_obj", "<image>")
            raise ValueError(
                f"nodule centre {list(point)} mm ({self.coordinate_system.value}) is at voxel {index.round(1).tolist()}, "
                f"outside image '{name}' of shape {shape.tolist()}. Check coordinate_system (LUNA16 / ITK coordinates "
                "are LPS) and that the row names the right series."
            )
        size = self._box_size(affine)
        start = np.round(index).astype(int) - size // 2
        end = start + size
        before, after = np.maximum(-start, 0), np.maximum(end - shape, 0)
        if before.any() or after.any():
            border = [int(v) for pair in zip(before, after) for v in pair]
            img = BorderPad(spatial_border=border, mode="constant", value=self.pad_value)(img)
            start, end = start + before, end + before
        return SpatialCrop(roi_start=start.tolist(), roi_end=end.tolist())(img)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.point_key not in d:
            raise KeyError(f"item {d.get('id', '')!r} has no '{self.point_key}' (set center_columns in the config).")
        for key in self.key_iterator(d):
            d[key] = self.crop(d[key], d[self.point_key])
        return d


def nodule_preprocessing(
    keys: KeysCollection = ("image",),
    roi_size: Sequence[int] | int = NODULE_ROI,
    spacing: Sequence[float] = NODULE_SPACING,
    hu_window: Sequence[float] = HU_WINDOW,
    center_key: str | None = None,
    coordinate_system: str = CoordinateSystem.LPS,
    track_meta: bool = True,
) -> list[Transform]:
    """The project's CT preprocessing (:func:`~dagman_components.data.ct_load_and_normalise`: HU check,
    RAS, resampling, HU window to [0, 1]) followed by a ``roi_size`` box on the nodule.

    Args:
        keys: image keys.
        roi_size: network input size, every side divisible by 32.
        spacing: voxel spacing in mm.
        hu_window: HU window scaled to [0, 1].
        center_key: ``None`` for nodule-centred crops (centre crop / zero pad); the item key of a world
            centre (from ``center_columns``) for full CT volumes.
        coordinate_system: convention of the centres (LPS for LUNA16).
        track_meta: keep MONAI metadata (the affine is needed to save attention overlays).

    Returns:
        The transforms (put them in a ``Compose``).

    Raises:
        ValueError: for a ``roi_size`` not divisible by 32 or an invalid spacing / window.
    """
    roi = check_roi_size(roi_size, key="roi_size")
    keys = tuple(ensure_tuple(keys))
    transforms = list(ct_load_and_normalise(keys, spacing=spacing, hu_window=hu_window))
    if center_key is None:
        transforms.append(ResizeWithPadOrCropd(keys, spatial_size=roi, mode="constant"))
    else:
        physical = [r * float(s) + 2 * _NATIVE_MARGIN_MM for r, s in zip(roi, ensure_tuple(spacing))]
        native = CropWorldPointd(keys, center_key, physical_size=physical, coordinate_system=coordinate_system)
        at = next(i for i, t in enumerate(transforms) if isinstance(t, Orientationd))  # before resampling
        transforms.insert(at, native)
        transforms.append(CropWorldPointd(keys, center_key, roi_size=roi, coordinate_system=coordinate_system,
                                          pad_value=0.0))
    transforms.append(EnsureTyped(keys, dtype=torch.float32, track_meta=track_meta))
    return transforms


def nodule_augmentation(
    keys: KeysCollection = ("image",), flip_prob: float = 0.5, rotate_prob: float = 0.5, intensity_shift: float = 0.05
) -> list[Transform]:
    """Training augmentation: flips along each axis, 90-degree rotations in the axial plane and a
    small intensity shift (values are in [0, 1] after the HU window).

    Raises:
        ValueError: for probabilities outside [0, 1] or a negative shift.
    """
    if not (0.0 <= flip_prob <= 1.0 and 0.0 <= rotate_prob <= 1.0) or intensity_shift < 0:
        raise ValueError(f"invalid augmentation settings: flip_prob={flip_prob}, rotate_prob={rotate_prob}, "
                         f"intensity_shift={intensity_shift}.")
    out: list[Transform] = [RandFlipd(keys, prob=flip_prob, spatial_axis=axis) for axis in range(3)]
    out.append(RandRotate90d(keys, prob=rotate_prob, max_k=3, spatial_axes=(0, 1)))
    if intensity_shift > 0:
        out.append(RandShiftIntensityd(keys, offsets=intensity_shift, prob=0.5))
    return out
