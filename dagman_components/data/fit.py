# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Sizes that must fit the data and the machine, checked before a bundle builds its engines.

Each check raises a ``ValueError`` that names the config key and what to lower, instead of the
late failure it prevents (an empty data loader, a scheduler with zero iterations, views that are
all padding). Bundles call them from their ``initialize`` section.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["available_cpus", "fit_num_workers", "check_batch_fits", "volume_extent_mm", "check_roi_fits"]

logger = logging.getLogger(__name__)


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity where the OS reports it, else ``os.cpu_count()``)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def fit_num_workers(num_workers: int, cpus: int | None = None) -> int:
    """``min(num_workers, cpus)``: data-loading workers this machine can run.

    PyTorch's ``DataLoader`` warns when it is given more workers than the cores it may use; capping
    the configured value keeps that warning away on small machines and changes nothing on large ones.

    Args:
        num_workers: the configured value (0: load in the main process).
        cpus: cores to allow; defaults to :func:`available_cpus`.

    Returns:
        The capped number of workers.

    Raises:
        ValueError: naming ``num_workers`` when it is negative.

    Example:
        >>> fit_num_workers(4, cpus=2)
        2
    """
    if int(num_workers) < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
    cap = available_cpus() if cpus is None else int(cpus)
    fitted = min(int(num_workers), cap)
    if fitted < int(num_workers):
        logger.info("num_workers %d capped to %d (the CPU cores available).", num_workers, fitted)
    return fitted


def check_batch_fits(batch_size: int, num_items: int, split: str = "training", drop_last: bool = True,
                     key: str = "batch_size") -> int:
    """Check that a split gives at least one batch.

    Args:
        batch_size: the configured batch size.
        num_items: cases in the split.
        split: the split's name, for the message.
        drop_last: whether the data loader drops an incomplete last batch (then ``batch_size``
            must not exceed ``num_items``).
        key: the config key, for the message.

    Returns:
        The number of batches per epoch.

    Raises:
        ValueError: naming ``key``, the split size and the largest value that fits.

    Example:
        >>> check_batch_fits(4, 13)
        3
    """
    if int(batch_size) < 1:
        raise ValueError(f"{key} must be >= 1, got {batch_size}.")
    if int(num_items) < 1:
        raise ValueError(f"the {split} split is empty: it needs at least one case (add data or change the split).")
    if drop_last and int(batch_size) > int(num_items):
        raise ValueError(
            f"{key} {batch_size} is larger than the {split} split ({num_items} cases), so an epoch has no batch; "
            f"lower {key} to at most {num_items} (e.g. --{key} {num_items})."
        )
    return int(num_items) // int(batch_size) if drop_last else -(-int(num_items) // int(batch_size))


def _world_axes(direction: np.ndarray) -> list[int]:
    """For each voxel axis, the world axis (x, y, z) it runs along most."""
    return [int(np.argmax(np.abs(direction[:3, i]))) for i in range(3)]


def volume_extent_mm(path: str | os.PathLike) -> tuple[float, float, float]:
    """The physical size of a 3D volume along the world x, y, z axes, in mm, from its header only.

    NIfTI is read with nibabel, other formats (NRRD, MetaImage, a DICOM file) with ITK's image
    information; DICOM series folders are not supported.

    Args:
        path: a volume file.

    Returns:
        ``(x, y, z)`` extents in mm (voxel count times voxel size, axes mapped through the direction).
    """
    path = os.fspath(path)
    if path.lower().endswith((".nii", ".nii.gz")):
        import nibabel as nib

        image = nib.load(path)
        affine = np.asarray(image.affine, dtype=float)
        shape = image.shape[:3]
        sizes = np.linalg.norm(affine[:3, :3], axis=0)
        direction = affine[:3, :3] / np.where(sizes == 0, 1.0, sizes)
    else:
        import itk

        image_io = itk.ImageIOFactory.CreateImageIO(path, itk.CommonEnums.IOFileMode_ReadMode)
        if image_io is None:
            raise ValueError(f"{path} is not recognised by ITK.")
        image_io.SetFileName(path)
        image_io.ReadImageInformation()
        shape = [image_io.GetDimensions(i) for i in range(3)]
        sizes = np.array([image_io.GetSpacing(i) for i in range(3)], dtype=float)
        direction = np.array([image_io.GetDirection(i) for i in range(3)], dtype=float).T
    extent = [0.0, 0.0, 0.0]
    for axis, world in enumerate(_world_axes(direction)):
        extent[world] = max(extent[world], float(shape[axis]) * float(sizes[axis]))
    return extent[0], extent[1], extent[2]


def check_roi_fits(roi_size: Sequence[int], spacing: Sequence[float], datalist: Sequence[Mapping[str, Any]],
                   image_key: str = "image", key: str = "roi_size", divisor: int = 32) -> None:
    """Check that a training ROI is not larger than the data it is cropped from.

    The ROI covers ``roi_size * spacing`` mm. Volumes smaller than it are padded, so one small
    volume is only logged; when the ROI exceeds the largest volume along an axis, every crop is
    partly padding on that axis and the ROI is refused, unless its sides are already the smallest the
    encoder takes (then a warning). Items whose extent cannot be read from a
    header (DICOM series folders) are skipped.

    Args:
        roi_size: three sides in voxels.
        spacing: three voxel sizes in mm (after resampling).
        datalist: items with ``image_key`` paths.
        image_key: key of the image path.
        key: the config key, for the message.
        divisor: sides must stay multiples of this (the Swin encoder's 32).

    Raises:
        ValueError: naming ``key``, the ROI and data sizes in mm, and the largest ROI that fits.
    """
    roi_mm = np.asarray(roi_size, dtype=float) * np.asarray(spacing, dtype=float)
    extents, smaller = [], []
    for item in datalist:
        path = item.get(image_key)
        if not isinstance(path, (str, os.PathLike)) or os.path.isdir(path):
            continue
        try:
            extent = np.asarray(volume_extent_mm(path))
        except Exception as err:  # an unreadable header is validate_volumes' job to report
            logger.debug("no extent for %s: %s", path, err)
            continue
        extents.append(extent)
        if np.any(extent < roi_mm):
            smaller.append(os.path.basename(os.fspath(path)))
    if not extents:
        return
    largest = np.max(np.stack(extents), axis=0)
    if np.any(roi_mm > largest):
        spacing_arr = np.asarray(spacing, dtype=float)
        fit = [max(divisor, int(m // s) // divisor * divisor) for m, s in zip(largest, spacing_arr)]
        fit = [min(int(r), f) for r, f in zip(roi_size, fit)]
        if fit == [int(r) for r in roi_size]:  # already the smallest sides the encoder takes: pad, and say so
            logger.warning("%s %s at spacing %s mm covers %s mm, more than the largest volume (%s mm): every view is "
                           "partly padding; a finer spacing would fill it with data", key, list(roi_size),
                           list(spacing), np.round(roi_mm, 1).tolist(), np.round(largest, 1).tolist())
            return
        raise ValueError(
            f"{key} {list(roi_size)} at spacing {list(spacing)} mm covers {np.round(roi_mm, 1).tolist()} mm, larger "
            f"than the largest volume ({np.round(largest, 1).tolist()} mm); lower {key} to at most {fit} "
            f"(multiples of {divisor}) or use a finer spacing."
        )
    if smaller:
        logger.info("%d volume(s) smaller than the %s mm ROI are padded: %s", len(smaller),
                    np.round(roi_mm, 1).tolist(), smaller[:5])
