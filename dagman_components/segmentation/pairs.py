# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Check image/label pairs before training: readable, same grid, label values in range.

Every problem is named by both files, because the fix is usually to re-export one of the two or to
remove the pair: ``image '<a>' / label '<b>': shapes differ ...``. All problems are collected and
raised together as one :class:`~dagman_components.data.DataSourceError`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dagman_components.data import DataSourceError, validate_volumes
from dagman_components.data.datalist import format_listing

__all__ = ["read_geometry", "validate_image_label_pairs"]

logger = logging.getLogger(__name__)

_NIFTI = (".nii", ".nii.gz")


def _is_nifti(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(_NIFTI)


def read_geometry(path: str, use_nibabel: bool = True) -> tuple[tuple[int, ...], np.ndarray]:
    """Spatial shape and 4x4 affine of a volume, from its header when it is NIfTI.

    Args:
        path: a volume file or DICOM series folder.
        use_nibabel: read NIfTI headers with nibabel (fast); otherwise load with MONAI's ``LoadImage``.

    Returns:
        ``(shape, affine)``: the first three dimensions and the voxel-to-world affine. Both files of a
        pair must be read the same way for the affines to be comparable.
    """
    if use_nibabel and _is_nifti(path):
        import nibabel as nib

        image = nib.load(path)
        return tuple(int(s) for s in image.shape[:3]), np.asarray(image.affine, dtype=np.float64)
    from monai.transforms import LoadImage

    image = LoadImage(image_only=True, ensure_channel_first=False)(path)
    return tuple(int(s) for s in image.shape[:3]), np.asarray(image.affine, dtype=np.float64)


def _label_values(path: str) -> np.ndarray:
    if _is_nifti(path):
        import nibabel as nib

        return np.unique(np.asanyarray(nib.load(path).dataobj))
    from monai.transforms import LoadImage

    return np.unique(np.asarray(LoadImage(image_only=True)(path)))


def _volume_problem(path: str, key: str, check_payload: bool) -> str | None:
    volume_logger = logging.getLogger("dagman_components.data.datalist")
    level = volume_logger.level
    volume_logger.setLevel(max(level, logging.WARNING))  # one "Validated 1 item(s)" per file is noise here
    try:
        validate_volumes([{key: path}], image_key=key, check_payload=check_payload)
    except DataSourceError as err:
        detail = str(err).splitlines()[-1].strip().removeprefix("- ").removeprefix(path).strip()
        return f"the {key} {detail}"
    finally:
        volume_logger.setLevel(level)
    return None


def validate_image_label_pairs(
    datalist: Sequence[Mapping[str, Any]],
    image_key: str = "image",
    label_key: str = "label",
    num_classes: int | None = 2,
    check_values: bool = True,
    check_payload: bool = True,
    affine_atol: float = 1e-3,
) -> None:
    """Check every image/label pair of a datalist, naming both files in each problem.

    Checks, per pair: both keys present and both files exist; each file is a readable, complete
    3D volume (:func:`~dagman_components.data.validate_volumes`); the label has the image's
    spatial shape and affine (within ``affine_atol`` mm); and, with ``check_values``, the label
    holds only the integers ``0 .. num_classes - 1``.

    Args:
        datalist: items with ``image_key`` and ``label_key``.
        image_key: key of the image path.
        label_key: key of the label path.
        num_classes: number of classes including background; ``None`` skips the range check.
        check_values: load each label to check its values (one read per label).
        check_payload: also check that each file's voxel data is complete.
        affine_atol: largest accepted difference between the two affines' entries (mm).

    Raises:
        DataSourceError: listing every bad pair (at most 20 named, then "and N more").

    Example:
        >>> validate_image_label_pairs([{"image": "ct.nii.gz", "label": "seg.nii.gz"}])  # doctest: +SKIP
    """
    problems: list[str] = []
    for index, item in enumerate(datalist):
        image, label = item.get(image_key), item.get(label_key)
        if image is None or label is None:
            problems.append(f"item {index} lacks '{image_key if image is None else label_key}' (keys: {sorted(item)})")
            continue
        image, label = os.fspath(image), os.fspath(label)
        pair = f"image '{image}' / label '{label}'"
        found = [p for p in (_volume_problem(image, image_key, check_payload),
                             _volume_problem(label, label_key, check_payload)) if p]
        if found:
            problems.append(f"{pair}: {'; '.join(found)}")
            continue
        try:
            both_nifti = _is_nifti(image) and _is_nifti(label)
            (ishape, iaff), (lshape, laff) = read_geometry(image, both_nifti), read_geometry(label, both_nifti)
        except Exception as err:  # any reader failure: the pair cannot be used
            problems.append(f"{pair}: cannot read the geometry ({type(err).__name__}: {str(err)[:200]})")
            continue
        if ishape != lshape:
            problems.append(f"{pair}: shapes differ (image {ishape}, label {lshape}); the label must be drawn on the "
                            f"image's grid")
            continue
        if not np.allclose(iaff, laff, atol=affine_atol, rtol=0.0):
            worst = float(np.abs(iaff - laff).max())
            problems.append(f"{pair}: affines differ by up to {worst:.4g} mm (spacing, origin or direction); re-export "
                            f"the label with the image's header")
            continue
        if check_values:
            try:
                values = _label_values(label)
            except Exception as err:  # truncated payloads that the header check could not see
                problems.append(f"{pair}: the label cannot be read ({type(err).__name__}: {str(err)[:200]})")
                continue
            bad = [v for v in values.tolist() if float(v) != int(v) or (num_classes is not None and not
                                                                      0 <= int(v) < num_classes)]
            if bad:
                allowed = f"0..{num_classes - 1}" if num_classes is not None else "integers"
                classes = f" (num_classes {num_classes}, the classes of channel_def)" if num_classes is not None else ""
                problems.append(f"{pair}: the label holds values {bad[:8]} outside {allowed}{classes}; is it a label "
                                f"map (not an image or a probability map), or does num_classes need raising?")
    if problems:
        raise DataSourceError(
            f"{len(problems)} of {len(datalist)} image/label pair(s) cannot be used; fix or remove them:\n"
            + format_listing(problems)
        )
    logger.info("Validated %d image/label pair(s).", len(datalist))
