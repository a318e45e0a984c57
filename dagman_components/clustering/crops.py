# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Cut labelled organ crops, OrganMNIST3D style, from a CT and its label map.

Geometry (all in voxels of the preprocessed volume, i.e. after
:func:`~dagman_components.data.ct_load_and_normalise`: RAS, 2 mm, HU window scaled to [0, 1]):

* a *structure* is the union of the label ids that the id -> name table gives the same name
  (e.g. the right lung lobes all named ``lung-right``); its bounding box is
  ``[start, stop)`` with ``stop`` exclusive; its centre is the box centre ``(start + stop) // 2``
  per axis when that voxel belongs to the structure, else the structure's voxel nearest to the
  box centre (first in C order on ties), so that a crop of a curved or thin structure (a lung
  base, a rib) is centred on the structure rather than beside it;
* a crop of side ``s`` around centre ``c`` (plus a jitter offset ``o``) covers
  ``[c + o - s // 2, c + o - s // 2 + s)`` per axis; voxels outside the volume are
  ``pad_value`` (0 = at or below the HU window's lower bound, i.e. air / fat);
* each crop is resized to ``output_size`` with MONAI ``Resize``: ``area`` (average pooling, no
  aliasing and no border effects) when shrinking, ``trilinear`` (``align_corners=False``) when
  enlarging; with ``s == output_size`` it is copied voxel for voxel.

Per structure, per side in ``sizes``: one centred crop, then ``jitters_per_size`` crops with
integer offsets drawn uniformly from ``[-max_jitter, max_jitter]`` per axis (``numpy`` generator
seeded with ``seed``). Jittered and resized crops of one structure overlap heavily: they are
near-duplicates, not independent samples.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import Compose, Resize

from dagman_components.clustering.organ_npz import OrganDataError
from dagman_components.data import DEFAULT_SPACING, HU_WINDOW, ct_load_and_normalise

__all__ = ["Structure", "OrganCrop", "find_structures", "extract_crop", "cut_organ_crops", "load_ct_and_labels"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Structure:
    """One named structure of a label map.

    Attributes:
        name: its name in the table.
        ids: the label ids merged into it.
        voxels: its voxel count.
        start: first voxel of its bounding box per axis.
        stop: one past the last voxel per axis.
        centre: the crop centre (see the module docstring).
    """

    name: str
    ids: tuple[int, ...]
    voxels: int
    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    centre: tuple[int, int, int]


@dataclass
class OrganCrop:
    """One crop: the image (``output_size`` per side, float32 in [0, 1]) and where it came from."""

    name: str
    image: np.ndarray
    size: int
    jitter_index: int
    offset: tuple[int, int, int]
    start: tuple[int, int, int]
    structure: Structure


def find_structures(
    label: np.ndarray,
    names: Mapping[int, str | None],
    ignore_unnamed: bool = False,
    min_voxels: int = 1,
    where: str = "the label map",
) -> list[Structure]:
    """The named structures of a label map, in the order of their smallest id.

    Args:
        label: 3D integer label map (0 = background).
        names: label id -> name; ids sharing a name are merged; a ``None`` name ignores the id.
        ignore_unnamed: skip ids that are not in ``names`` (logged) instead of failing.
        min_voxels: structures with fewer voxels are skipped (logged).
        where: the label map's name for messages.

    Returns:
        The :class:`Structure` list.

    Raises:
        OrganDataError: an id of the label map is not in ``names`` (and ``ignore_unnamed`` is False),
            or no structure is left.

    Example:
        >>> lab = np.zeros((8, 8, 8), int); lab[1:3, 2:6, 4:8] = 5
        >>> s = find_structures(lab, {5: "liver"})[0]
        >>> s.start, s.stop, s.centre, s.voxels
        ((1, 2, 4), (3, 6, 8), (2, 4, 6), 32)
    """
    label = np.asarray(label)
    if label.ndim != 3:
        raise OrganDataError(f"{where} must be a 3D label map, got shape {label.shape}.")
    present = [int(i) for i in np.unique(label) if i != 0]
    unnamed = [i for i in present if i not in names]
    if unnamed and not ignore_unnamed:
        raise OrganDataError(
            f"label id(s) {unnamed} of {where} are missing from the id -> name table; add them (a null name "
            "ignores an id) or pass --ignore-unnamed to cut only the named structures."
        )
    if unnamed:
        logger.info("%s: ignoring label ids without a name: %s", where, unnamed)
    groups: dict[str, list[int]] = {}
    for i in present:
        if names.get(i):
            groups.setdefault(str(names[i]), []).append(i)
    structures = []
    for name, ids in groups.items():
        mask = np.isin(label, ids)
        idx = np.nonzero(mask)
        voxels = int(idx[0].size)
        if voxels < min_voxels:
            logger.warning("%s: %s has %d voxel(s) (< min_voxels=%d): skipped", where, name, voxels, min_voxels)
            continue
        start = tuple(int(a.min()) for a in idx)
        stop = tuple(int(a.max()) + 1 for a in idx)
        box_centre = np.array([(a + b) // 2 for a, b in zip(start, stop)])
        if mask[tuple(box_centre)]:
            centre = tuple(int(c) for c in box_centre)
        else:
            coords = np.stack(idx, axis=1)
            centre = tuple(int(c) for c in coords[np.argmin(((coords - box_centre) ** 2).sum(axis=1))])
        structures.append(Structure(name, tuple(ids), voxels, start, stop, centre))  # type: ignore[arg-type]
    if not structures:
        raise OrganDataError(f"{where} holds no named structure with at least {min_voxels} voxels.")
    return structures


def extract_crop(volume: np.ndarray, start: Sequence[int], size: int, pad_value: float = 0.0) -> np.ndarray:
    """The cube ``volume[start : start + size]`` per axis, ``pad_value`` where it leaves the volume.

    Example:
        >>> extract_crop(np.ones((4, 4, 4)), (-1, 0, 2), 3)[:, 0, :].tolist()
        [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    """
    out = np.full((size,) * 3, pad_value, dtype=np.float32)
    src, dst = [], []
    for a, n in zip(start, volume.shape):
        lo, hi = max(int(a), 0), min(int(a) + size, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(a), hi - int(a)))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def cut_organ_crops(
    image: np.ndarray,
    label: np.ndarray,
    names: Mapping[int, str | None],
    sizes: Sequence[int] = (32,),
    output_size: int = 32,
    jitters_per_size: int = 0,
    max_jitter: int = 0,
    seed: int = 0,
    ignore_unnamed: bool = False,
    min_voxels: int = 1,
    pad_value: float = 0.0,
    where: str = "the label map",
) -> list[OrganCrop]:
    """Crops around every named structure (see the module docstring for the geometry).

    Args:
        image: 3D preprocessed CT (float, [0, 1]).
        label: 3D label map on the same grid.
        names: label id -> name (ids with one name are merged; ``None`` ignores an id).
        sizes: crop sides in voxels (several give several scales per structure).
        output_size: side of every output crop.
        jitters_per_size: extra jittered crops per structure and side.
        max_jitter: largest offset in voxels per axis.
        seed: seed of the jitter offsets.
        ignore_unnamed: skip label ids missing from ``names`` instead of failing.
        min_voxels: skip structures smaller than this.
        pad_value: value outside the volume.
        where: name of the label map for messages.

    Returns:
        The crops, structure by structure, size by size, the centred one first.

    Raises:
        OrganDataError: image and label shapes differ, or see :func:`find_structures`.
        ValueError: for a size or ``output_size`` below 1, or negative jitter settings.
    """
    image, label = np.asarray(image), np.asarray(label)
    if image.shape != label.shape:
        raise OrganDataError(f"the CT {image.shape} and {where} {label.shape} are not on the same voxel grid.")
    if not sizes or any(int(s) < 1 for s in sizes) or int(output_size) < 1:
        raise ValueError(f"sizes and output_size must be positive, got sizes={list(sizes)}, output_size={output_size}.")
    if jitters_per_size < 0 or max_jitter < 0:
        raise ValueError(f"jitters_per_size and max_jitter must be >= 0, got {jitters_per_size}, {max_jitter}.")
    structures = find_structures(label, names, ignore_unnamed=ignore_unnamed, min_voxels=min_voxels, where=where)
    rng = np.random.default_rng(seed)
    resizers = {
        int(s): Resize((int(output_size),) * 3, mode="area")
        if int(s) > int(output_size)
        else Resize((int(output_size),) * 3, mode="trilinear", align_corners=False)
        for s in sizes
        if int(s) != int(output_size)
    }
    crops = []
    for st in structures:
        for s in (int(v) for v in sizes):
            for j in range(jitters_per_size + 1):
                offset = (0, 0, 0) if j == 0 else tuple(int(v) for v in rng.integers(-max_jitter, max_jitter + 1, 3))
                start = tuple(c + o - s // 2 for c, o in zip(st.centre, offset))
                cube = extract_crop(image, start, s, pad_value)
                if s in resizers:
                    cube = np.asarray(resizers[s](torch.from_numpy(cube)[None]))[0]
                crop = OrganCrop(st.name, cube.astype(np.float32), s, j, offset, start, st)  # type: ignore[arg-type]
                crops.append(crop)
    logger.info("%s: %d crops of %d structures", where, len(crops), len(structures))
    return crops


def load_ct_and_labels(
    image_path: str | os.PathLike,
    label_path: str | os.PathLike,
    spacing: Sequence[float] = DEFAULT_SPACING,
    hu_window: str | Sequence[float] | None = HU_WINDOW,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a CT and its label map through the project's one CT preprocessing.

    Args:
        image_path: the CT (HU).
        label_path: its label map.
        spacing: voxel spacing in mm.
        hu_window: the window scaled to [0, 1]; ``None`` keeps Hounsfield units.

    Returns:
        ``(image, label, affine)``: the image (in [0, 1], or HU) and the integer label map, both 3D on the
        RAS grid at ``spacing`` mm, and the 4x4 voxel-to-world affine of that grid.

    Raises:
        OrganDataError: a file is missing, or the two do not share a voxel grid.
    """
    for p in (image_path, label_path):
        if not os.path.exists(p):
            raise OrganDataError(f"'{p}' does not exist.")
    pre = Compose(ct_load_and_normalise(keys="image", label_keys="label", spacing=spacing, hu_window=hu_window))
    out = pre({"image": os.fspath(image_path), "label": os.fspath(label_path)})
    image, label = out["image"], out["label"]
    if image.shape != label.shape or not np.allclose(np.asarray(image.affine), np.asarray(label.affine), atol=1e-3):
        raise OrganDataError(
            f"CT '{image_path}' {tuple(image.shape[1:])} and label map '{label_path}' {tuple(label.shape[1:])} are not "
            "on the same grid after resampling (shape or affine differ): the label map must be drawn on this CT."
        )
    affine = np.asarray(image.affine, dtype=np.float64)
    return (
        np.asarray(image[0], dtype=np.float32),
        np.rint(np.asarray(label[0])).astype(np.int64),
        affine,
    )
