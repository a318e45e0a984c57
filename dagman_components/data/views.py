# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""The two views of a pretraining volume: how they are cut out of it.

Cross-view distillation (AITD, GITD) learns what stays the same between two views. When the views
are the same box (a nodule crop barely larger than the ROI cropped twice), it learns only
invariance to flips and intensity. :class:`PretrainingViewsd` offers three ways:

* ``independent``: each view an ROI crop anywhere in the volume (the former behaviour);
* ``resized_crop``: each view a random box of ``scale`` (a range of volume fractions) of the volume,
  anywhere in it, resized to the ROI (DINO's random resized crop, in 3D);
* ``region_crops``: one random region of ``region_factor`` x ROI per sample, then each view an ROI
  crop inside it (SMIT: two 96^3 crops of one 128^3 region), so the views overlap but differ;
* ``auto``: ``resized_crop`` for a volume smaller than twice the ROI along any axis, else
  ``region_crops``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from monai.utils import StrEnum, ensure_tuple, look_up_option

__all__ = ["ViewMode", "PretrainingViewsd"]


class ViewMode(StrEnum):
    """How :class:`PretrainingViewsd` cuts the views."""

    INDEPENDENT = "independent"
    RESIZED_CROP = "resized_crop"
    REGION_CROPS = "region_crops"
    AUTO = "auto"


class PretrainingViewsd(MapTransform, Randomizable):
    """Cut every view key's view out of the source volume (channel-first, at least ``roi_size``).

    Args:
        source_key: the key of the (padded) volume.
        view_keys: the output keys, one view each.
        roi_size: the views' size.
        mode: a :class:`ViewMode` value.
        scale: ``(low, high)`` volume fractions of the source for ``resized_crop``, in (0, 1].
        region_factor: region side over ROI side for ``region_crops`` (at least 1; clipped to the volume).

    Attributes:
        boxes: after a call, each view's ``(start, size)`` in the source volume (voxels), in key order.
        mode_used: after a call, the mode the volume got (``auto`` resolved).

    Raises:
        ValueError: for a ``scale`` outside (0, 1] or ``region_factor < 1``.
    """

    def __init__(self, source_key: str, view_keys: KeysCollection, roi_size: Sequence[int],
                 mode: str = ViewMode.INDEPENDENT, scale: Sequence[float] = (0.3, 1.0),
                 region_factor: float = 1.5) -> None:
        super().__init__(ensure_tuple(view_keys))
        low, high = (float(v) for v in scale)
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"view_scale must be [low, high] with 0 < low <= high <= 1, got {list(scale)}.")
        if float(region_factor) < 1.0:
            raise ValueError(f"view_region_factor must be at least 1, got {region_factor}.")
        self.source_key = source_key
        self.roi = tuple(int(r) for r in roi_size)
        self.mode = look_up_option(mode, ViewMode)
        self.scale = (low, high)
        self.region_factor = float(region_factor)
        self.boxes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        self.mode_used: str = str(self.mode)

    def resolve_mode(self, shape: Sequence[int]) -> ViewMode:
        """The mode for a volume of ``shape`` (``auto``: resized crops below twice the ROI on any axis)."""
        if self.mode != ViewMode.AUTO:
            return self.mode
        small = any(int(s) < 2 * r for s, r in zip(shape, self.roi))
        return ViewMode.RESIZED_CROP if small else ViewMode.REGION_CROPS

    def _offset(self, outer: Sequence[int], inner: Sequence[int]) -> tuple[int, ...]:
        return tuple(int(self.R.randint(0, int(o) - int(i) + 1)) for o, i in zip(outer, inner))

    def randomize(self, shape: Sequence[int]) -> None:
        """Draw every view's box in a volume of ``shape``."""
        mode = self.resolve_mode(shape)
        self.mode_used = str(mode)
        self.boxes = []
        if mode == ViewMode.REGION_CROPS:
            region = tuple(min(int(s), max(r, int(round(self.region_factor * r)))) for s, r in zip(shape, self.roi))
            start = self._offset(shape, region)
            for _ in self.keys:
                inner = self._offset(region, self.roi)
                self.boxes.append((tuple(a + b for a, b in zip(start, inner)), self.roi))
        elif mode == ViewMode.RESIZED_CROP:
            for _ in self.keys:
                fraction = self.R.uniform(*self.scale)
                side = fraction ** (1.0 / 3.0)
                size = tuple(max(1, min(int(s), int(round(side * int(s))))) for s in shape)
                self.boxes.append((self._offset(shape, size), size))
        else:
            for _ in self.keys:
                self.boxes.append((self._offset(shape, self.roi), self.roi))

    def _cut(self, volume: torch.Tensor, start: Sequence[int], size: Sequence[int]) -> torch.Tensor:
        box = volume[(slice(None), *(slice(a, a + b) for a, b in zip(start, size)))]
        if tuple(size) == self.roi:
            return box.clone()
        return F.interpolate(box[None].float(), size=self.roi, mode="trilinear", align_corners=False)[0]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        volume = torch.as_tensor(d[self.source_key])
        shape = volume.shape[1:]
        if any(int(s) < r for s, r in zip(shape, self.roi)):
            raise ValueError(f"the volume {tuple(shape)} is smaller than the ROI {self.roi}: pad it first.")
        self.randomize(shape)
        for key, (start, size) in zip(self.keys, self.boxes):
            d[key] = self._cut(volume, start, size)
        return d
