# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""The one CT preprocessing of the project, and the two-view pretraining augmentation.

Every bundle (pretraining, classification, segmentation, clustering) and inference reads CT
through :func:`ct_load_and_normalise`: load with the channel first, warn when the intensities do
not look like Hounsfield units, orient to RAS, resample to 2 mm, clip to the HU window
[-175, 250] and scale it to [0, 1] (the SMIT/DAGMaN setting). :func:`pretraining_transforms`
adds the foreground crop, padding and two independently augmented random views.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    DeleteItemsd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
    Transform,
)
from monai.utils import convert_to_numpy, ensure_tuple

from dagman_components.data.views import PretrainingViewsd

from dagman_components.errors import ConfigValueError

__all__ = [
    "HU_WINDOW",
    "HU_WINDOWS",
    "resolve_hu_window",
    "DEFAULT_SPACING",
    "WarnIfNotHounsfieldd",
    "check_roi_size",
    "ct_load_and_normalise",
    "pretraining_transforms",
]

logger = logging.getLogger(__name__)

#: Hounsfield window clipped and scaled to [0, 1] (SMIT/DAGMaN abdominal window).
HU_WINDOW: tuple[float, float] = (-175.0, 250.0)
#: Named windows, accepted wherever a window is set (``hu_window: lung``). ``soft_tissue`` is the
#: paper's; ``lung`` keeps the parenchyma and ground-glass opacities (the range of MONAI's LUNA16
#: lung-nodule detection bundle), which the soft-tissue window maps to 0.
HU_WINDOWS: dict[str, tuple[float, float]] = {"soft_tissue": HU_WINDOW, "lung": (-1024.0, 300.0)}
#: Voxel spacing in mm that every volume is resampled to.
DEFAULT_SPACING: tuple[float, float, float] = (2.0, 2.0, 2.0)

_MAX_SAMPLES = 1_000_000
_FOREGROUND_MARGIN = 8


class WarnIfNotHounsfieldd(MapTransform):
    """Log a warning, once per file, when an image's intensities do not look like Hounsfield units.

    Rule: every CT field of view holds air, lung or fat, all darker than water (0 HU), so the
    low ``quantile`` (default 0.5th percentile) of a CT volume in HU lies well below 0. When it
    is above ``threshold`` (default -50), nothing in the volume is darker than water and the
    image is flagged: this catches data already scaled to [0, 1] or [0, 255], normalised data
    (z-scores, [-1, 1]), MR magnitude images and raw CT stored values whose rescale intercept
    was not applied. A crop lying entirely inside soft tissue or bone is flagged too (a false
    alarm, harmless since the data are never changed). The statistic is computed on at most
    one million evenly strided voxels, and each file is checked only once per process (so
    at most once per DataLoader worker); images without a file name are checked once per key.

    Args:
        keys: image keys to check.
        quantile: low quantile, in [0, 1), compared with ``threshold``.
        threshold: the quantile must be at or below this value (in HU) for a CT in HU.
        allow_missing_keys: do not raise when a key is missing.

    Raises:
        ValueError: when ``quantile`` is not in [0, 1).

    Example:
        >>> check = WarnIfNotHounsfieldd("image")
        >>> _ = check({"image": torch.rand(1, 8, 8, 8)})  # logs a warning: values in [0, 1]
    """

    def __init__(
        self,
        keys: KeysCollection,
        quantile: float = 0.005,
        threshold: float = -50.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= quantile < 1.0:
            raise ValueError(f"quantile must be in [0, 1), got {quantile}.")
        self.quantile = float(quantile)
        self.threshold = float(threshold)
        self._checked: set[str] = set()

    def low_value(self, img: Any) -> float:
        """The low ``quantile`` of ``img`` (computed on at most one million strided voxels)."""
        flat = np.asarray(convert_to_numpy(img.as_tensor() if isinstance(img, MetaTensor) else img)).reshape(-1)
        if flat.size == 0:
            return float("nan")
        flat = flat[:: max(1, flat.size // _MAX_SAMPLES)]
        return float(np.quantile(flat.astype(np.float32, copy=False), self.quantile))

    def looks_like_hu(self, img: Any) -> bool:
        """Whether ``img`` passes the rule above (an empty image passes)."""
        low = self.low_value(img)
        return bool(np.isnan(low) or low <= self.threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            name = str(img.meta.get("filename_or_obj", "")) if isinstance(img, MetaTensor) else ""
            name = name or f"<image under key '{key}' without a file name>"
            if name in self._checked:
                continue
            self._checked.add(name)
            low = self.low_value(img)
            if not (np.isnan(low) or low <= self.threshold):
                logger.warning(
                    "%s does not look like CT in Hounsfield units: its %g-th percentile is %.4g, above %.4g HU "
                    "(no air, lung or fat). The CT preprocessing clips a HU window and scales it to [0, 1]; give it "
                    "unscaled CT in HU (with the DICOM rescale slope/intercept applied), or pretraining is wasted.",
                    name,
                    100.0 * self.quantile,
                    low,
                    self.threshold,
                )
        return d


def check_roi_size(roi_size: int | Sequence[int], divisor: int = 32, key: str = "roi_size") -> tuple[int, int, int]:
    """Check a 3D region-of-interest size for the Swin encoder (every side divisible by 32).

    Args:
        roi_size: one int (isotropic) or three ints.
        divisor: every side must be a positive multiple of this.
        key: name of the setting, used in the error message.

    Returns:
        The size as a tuple of three ints.

    Raises:
        ConfigValueError: (a ``ValueError``) naming ``key`` when the size is not three positive integers
            divisible by ``divisor``, with the nearest sizes that are.

    Example:
        >>> check_roi_size(96)
        (96, 96, 96)
    """
    sides = (roi_size,) * 3 if isinstance(roi_size, (int, np.integer)) else roi_size
    try:
        sides = tuple(sides)
    except TypeError:
        raise ConfigValueError(f"{key} must be an int or three ints, got {roi_size!r}.") from None
    if len(sides) != 3 or not all(
        isinstance(s, (int, np.integer, float)) and not isinstance(s, bool) and float(s).is_integer() for s in sides
    ):
        raise ConfigValueError(f"{key} must be an int or three ints, got {roi_size!r}.")
    sides = tuple(int(s) for s in sides)
    if any(s <= 0 or s % divisor for s in sides):
        nearest = [max(divisor, round(s / divisor) * divisor) for s in sides]
        raise ConfigValueError(
            f"{key} must have every side positive and divisible by {divisor}, got {sides}; set --{key} to e.g. "
            f"{nearest} (the Swin encoder halves the size five times)."
        )
    return sides  # type: ignore[return-value]


def resolve_hu_window(window: str | Sequence[float], key: str = "hu_window") -> tuple[float, float]:
    """The (low, high) HU of a window given by name (:data:`HU_WINDOWS`) or as a pair.

    Args:
        window: ``"soft_tissue"``, ``"lung"`` or ``[low, high]`` in HU.
        key: the config key named in the error.

    Returns:
        ``(low, high)`` as floats.

    Raises:
        ConfigValueError: an unknown name, or not two numbers with low < high.

    Example:
        >>> resolve_hu_window("lung")
        (-1024.0, 300.0)
        >>> resolve_hu_window([-175, 250])
        (-175.0, 250.0)
    """
    if isinstance(window, str):
        if window not in HU_WINDOWS:
            raise ConfigValueError(f"{key}: unknown window '{window}'; use one of {sorted(HU_WINDOWS)} or [low, high] in HU.")
        return HU_WINDOWS[window]
    try:
        low, high = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ConfigValueError(
            f"{key} must be a window name {sorted(HU_WINDOWS)} or [low, high] in HU, got {window!r}."
        ) from None
    if not low < high:
        raise ConfigValueError(f"{key} must be (low, high) with low < high, got {window!r}.")
    return low, high


def _check_window_and_spacing(
    spacing: Sequence[float], hu_window: str | Sequence[float] | None
) -> tuple[float, float] | None:
    if len(ensure_tuple(spacing)) != 3 or any(float(s) <= 0 for s in ensure_tuple(spacing)):
        raise ValueError(f"spacing must be three positive values in mm, got {spacing!r}.")
    return None if hu_window is None else resolve_hu_window(hu_window)


def ct_load_and_normalise(
    keys: KeysCollection = ("image",),
    label_keys: KeysCollection = (),
    spacing: Sequence[float] = DEFAULT_SPACING,
    hu_window: str | Sequence[float] | None = HU_WINDOW,
    reader: Any = None,
) -> list[Transform]:
    """The CT preprocessing shared by every bundle: load, check HU, RAS, resample, window and scale.

    Images and labels are loaded channel first and get the same geometry (RAS orientation,
    resampling to ``spacing``; bilinear for images, nearest for labels). Images only are
    checked with :class:`WarnIfNotHounsfieldd` and clipped to ``hu_window``, scaled to [0, 1].

    Args:
        keys: image keys.
        label_keys: label keys (same geometry, no intensity change).
        spacing: output voxel spacing in mm.
        hu_window: (low, high) HU mapped to (0, 1), values outside clipped, or a name of :data:`HU_WINDOWS`;
            ``None`` keeps Hounsfield units (crops stored in HU, windowed later for each encoder).
        reader: optional MONAI image reader for ``LoadImaged`` (e.g. ``"ITKReader"``).

    Returns:
        The transforms, to be put in a ``Compose`` (possibly with more).

    Raises:
        ValueError: when no image key is given, a key is both image and label, or ``spacing`` /
            ``hu_window`` are invalid.

    Example:
        >>> pre = Compose(ct_load_and_normalise())
        >>> pre({"image": "data/totalseg_example/example_ct_sm.nii.gz"})["image"].shape  # doctest: +SKIP
        torch.Size([1, 182, 151, 44])
    """
    image_keys, labels = tuple(ensure_tuple(keys)), tuple(ensure_tuple(label_keys))
    if not image_keys:
        raise ValueError("keys must name at least one image key.")
    if set(image_keys) & set(labels):
        raise ValueError(f"keys and label_keys overlap: {sorted(set(image_keys) & set(labels))}.")
    hu_window = _check_window_and_spacing(spacing, hu_window)
    all_keys = image_keys + labels
    transforms: list[Transform] = [
        LoadImaged(all_keys, reader=reader, ensure_channel_first=True, image_only=True),
        EnsureTyped(image_keys, dtype=torch.float32),
    ]
    if labels:
        transforms.append(EnsureTyped(labels))
    transforms += [
        WarnIfNotHounsfieldd(image_keys),
        Orientationd(all_keys, axcodes="RAS", labels=None),  # labels from the image meta "space"
        Spacingd(
            all_keys,
            pixdim=tuple(float(s) for s in spacing),
            mode=("bilinear",) * len(image_keys) + ("nearest",) * len(labels),
            dtype=np.float32,
        ),
    ]
    if hu_window is not None:
        transforms.append(ScaleIntensityRanged(
            image_keys, a_min=float(hu_window[0]), a_max=float(hu_window[1]), b_min=0.0, b_max=1.0, clip=True
        ))
    return transforms


def pretraining_transforms(
    roi_size: int | Sequence[int],
    keys: KeysCollection = ("image",),
    view_keys: Sequence[str] = ("image", "image_2"),
    spacing: Sequence[float] = DEFAULT_SPACING,
    hu_window: Sequence[float] = HU_WINDOW,
    flip_prob: float = 0.5,
    intensity_jitter: float = 0.1,
    crop_foreground: bool = True,
    view_mode: str = "independent",
    view_scale: Sequence[float] = (0.3, 1.0),
    view_region_factor: float = 1.5,
) -> Compose:
    """Two random views of one CT volume for DAGMaN pretraining.

    After :func:`ct_load_and_normalise`, the volume is optionally cropped to its foreground (voxels
    above the HU window's lower bound, i.e. > 0 after scaling; 8-voxel margin), padded to at least
    ``roi_size`` (so small volumes work), and each view key gets its own view of it
    (:class:`~dagman_components.data.views.PretrainingViewsd`: ``view_mode`` ``independent`` an ROI crop
    anywhere, ``resized_crop`` a random box of ``view_scale`` of the volume resized to the ROI,
    ``region_crops`` ROI crops of one region of ``view_region_factor`` x ROI, ``auto`` resized crops
    below twice the ROI and region crops above), random flips along each of the three axes, and random
    intensity scaling and shifting (``intensity_jitter``, probability 0.5 each; 0 turns them off).
    All randomness comes from MONAI ``Randomizable`` transforms: seed with
    ``pretraining_transforms(...).set_random_state(seed)``.

    Args:
        roi_size: crop size, every side divisible by 32 (one int for a cube).
        keys: the one image key holding the loaded volume.
        view_keys: output keys of the views (at least two, distinct); may include the image key.
        spacing: voxel spacing in mm.
        hu_window: HU window mapped to [0, 1].
        flip_prob: probability of a flip along each axis.
        intensity_jitter: range of the random scale factor (1 +/- jitter) and offset (+/- jitter).
        crop_foreground: crop to the foreground bounding box before the random crops.
        view_mode: how the views are cut (:class:`~dagman_components.data.views.ViewMode`).
        view_scale: ``resized_crop``: range of the views' volume fractions of the source.
        view_region_factor: ``region_crops``: region side over ROI side.

    Returns:
        A ``Compose`` whose output holds every view key as a tensor of shape ``(1, *roi_size)``.

    Raises:
        ValueError: on an invalid ``roi_size``, not exactly one image key, fewer than two or
            repeated view keys, or a probability / jitter out of range.

    Example:
        >>> aug = pretraining_transforms(64).set_random_state(0)
        >>> out = aug({"image": "data/totalseg_example/example_ct_sm.nii.gz"})  # doctest: +SKIP
        >>> out["image"].shape, out["image_2"].shape  # doctest: +SKIP
        (torch.Size([1, 64, 64, 64]), torch.Size([1, 64, 64, 64]))
    """
    roi = check_roi_size(roi_size)
    image_keys, views = tuple(ensure_tuple(keys)), tuple(view_keys)
    if len(image_keys) != 1:
        raise ValueError(f"keys must name exactly one image key for pretraining, got {image_keys}.")
    if len(views) < 2 or len(set(views)) != len(views):
        raise ValueError(f"view_keys must be at least two distinct keys, got {views}.")
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}.")
    if not 0.0 <= intensity_jitter < 1.0:
        raise ValueError(f"intensity_jitter must be in [0, 1), got {intensity_jitter}.")
    source = image_keys[0]

    transforms: list[Transform] = list(ct_load_and_normalise(source, spacing=spacing, hu_window=hu_window))
    if crop_foreground:
        transforms.append(CropForegroundd(
                source,
                source_key=source,
                margin=_FOREGROUND_MARGIN,
                allow_smaller=True,
                start_coord_key=None,
                end_coord_key=None,
            ))
    transforms.append(SpatialPadd(source, spatial_size=roi))
    transforms.append(PretrainingViewsd(source, views, roi, mode=view_mode, scale=view_scale,
                                        region_factor=view_region_factor))
    if source not in views:
        transforms.append(DeleteItemsd(source))
    for view in views:
        transforms += [RandFlipd(view, prob=flip_prob, spatial_axis=axis) for axis in range(3)]
        if intensity_jitter > 0:
            transforms += [
                RandScaleIntensityd(view, factors=intensity_jitter, prob=0.5),
                RandShiftIntensityd(view, offsets=intensity_jitter, prob=0.5),
            ]
    transforms.append(EnsureTyped(views, dtype=torch.float32, track_meta=False))
    return Compose(transforms)
