# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Labelled 3D organ crops in MedMNIST's ``organmnist3d.npz`` layout: read, check and write.

The layout (MedMNIST v2 / MedMNIST+, ``organmnist3d.npz`` at 28^3 and ``organmnist3d_64.npz``):
six arrays ``train_images``, ``train_labels``, ``val_images``, ``val_labels``, ``test_images``,
``test_labels``; images ``(N, D, H, W)`` ``uint8`` in 0..255 (MedMNIST's loader divides by 255),
labels ``(N, 1)`` integers. OrganMNIST3D's labels 0..10 are :data:`ORGANMNIST3D_LABELS`.

Crop sets written by :func:`save_organ_npz` (e.g. by ``scripts/make_organ_crops.py``) use the same
six arrays, so MedMNIST's own loader reads them, plus two optional arrays that this reader uses
and MedMNIST's ignores: ``label_names`` (a string array, the name of label ``i`` at index ``i``)
and ``<split>_case_ids`` (a string per crop, e.g. ``example_ct_sm/liver/s32/j0``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dagman_components.atomic import atomic_write_bytes
from dagman_components.data.transforms import HU_WINDOW, resolve_hu_window
from dagman_components.errors import DagmanError

__all__ = [
    "ORGANMNIST3D_LABELS",
    "SPLITS",
    "OrganDataError",
    "OrganCropSet",
    "read_name_table",
    "load_organ_npz",
    "save_organ_npz",
]

logger = logging.getLogger(__name__)

#: OrganMNIST3D's label ids and names (MedMNIST ``INFO["organmnist3d"]["label"]``).
ORGANMNIST3D_LABELS: dict[int, str] = {
    0: "liver",
    1: "kidney-right",
    2: "kidney-left",
    3: "femur-right",
    4: "femur-left",
    5: "bladder",
    6: "heart",
    7: "lung-right",
    8: "lung-left",
    9: "spleen",
    10: "pancreas",
}
#: The splits of the layout, in MedMNIST's order.
SPLITS: tuple[str, ...] = ("train", "val", "test")


class OrganDataError(DagmanError, ValueError):
    """Organ crops or their name table cannot be used; the message names the file and what to do."""


@dataclass
class OrganCropSet:
    """Labelled 3D crops, all splits concatenated.

    Attributes:
        images: ``(N, D, H, W)``: ``int16`` Hounsfield units (crops cut by ``scripts/make_organ_crops.py``,
            windowed for each encoder by :meth:`float_images`), ``uint8`` (0..255, MedMNIST) or float in [0, 1].
        labels: ``(N,)`` integer label ids.
        names: label id -> name, covering every id in ``labels``.
        splits: ``(N,)`` the split of each crop (``train`` / ``val`` / ``test``).
        case_ids: ``(N,)`` a string per crop (``<split>/<index in split>`` when the file has none).
        source: where the crops came from (the npz path), for reports.
    """

    images: np.ndarray
    labels: np.ndarray
    names: dict[int, str]
    splits: np.ndarray
    case_ids: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def class_ids(self) -> list[int]:
        """The label ids present, sorted."""
        return sorted(int(i) for i in np.unique(self.labels))

    def class_counts(self) -> dict[str, int]:
        """Crops per class name, in label-id order."""
        return {self.names[i]: int((self.labels == i).sum()) for i in self.class_ids}

    @property
    def in_hounsfield(self) -> bool:
        """Whether the crops are stored in Hounsfield units (``int16``), so any window can be applied."""
        return self.images.dtype == np.int16

    def float_images(self, hu_window: str | Sequence[float] = HU_WINDOW) -> np.ndarray:
        """The images as float32 in [0, 1].

        Args:
            hu_window: for crops in Hounsfield units, the window clipped and scaled to [0, 1] (the encoder's,
                from its model card). Crops stored already scaled (``uint8`` divided by 255, as MedMNIST's
                loader does, or float) cannot be re-windowed and are returned as they are.

        Returns:
            ``(N, D, H, W)`` float32.
        """
        if self.in_hounsfield:
            low, high = resolve_hu_window(hu_window)
            return np.clip((self.images.astype(np.float32) - low) / (high - low), 0.0, 1.0)
        if self.images.dtype == np.uint8:
            return self.images.astype(np.float32) / 255.0
        return self.images.astype(np.float32, copy=False)


def read_name_table(table: Mapping[Any, Any] | str | os.PathLike) -> dict[int, str]:
    """Read an id -> name table: a JSON object file (``{"1": "spleen", ...}``) or a mapping.

    Ids are converted to int; names are stripped strings. A ``null`` name is kept as ``None``
    (callers may use it to ignore an id on purpose).

    Args:
        table: the mapping, or the path of a JSON file holding one.

    Returns:
        ``{id: name}`` with int ids.

    Raises:
        OrganDataError: the file is missing or not a JSON object, an id is not an integer, or a
            name is empty or not a string.

    Example:
        >>> read_name_table({"1": "spleen", 5: "liver"})
        {1: 'spleen', 5: 'liver'}
    """
    where = str(table) if isinstance(table, (str, os.PathLike)) else "the label name table"
    if isinstance(table, (str, os.PathLike)):
        if not os.path.isfile(table):
            raise OrganDataError(f"label name table '{table}' does not exist (a JSON object of id -> name).")
        try:
            with open(table, encoding="utf-8") as f:
                table = json.load(f)
        except (OSError, ValueError) as e:
            raise OrganDataError(f"cannot read label name table '{where}': {e}") from e
    if not isinstance(table, Mapping):
        raise OrganDataError(f"{where} must be a JSON object of id -> name, got {type(table).__name__}.")
    out: dict[int, str] = {}
    for key, name in table.items():
        try:
            idx = int(key)
        except (TypeError, ValueError):
            raise OrganDataError(f"{where}: key {key!r} is not an integer label id.") from None
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise OrganDataError(f"{where}: the name of id {idx} must be a non-empty string or null, got {name!r}.")
        out[idx] = name.strip() if isinstance(name, str) else name
    return out


def _decode_strings(arr: np.ndarray) -> np.ndarray:
    return np.asarray([a.decode() if isinstance(a, bytes) else str(a) for a in arr.reshape(-1)], dtype=object)


def _split_arrays(npz: Any, split: str, path: str) -> tuple[np.ndarray, np.ndarray]:
    img_key, lab_key = f"{split}_images", f"{split}_labels"
    missing = [k for k in (img_key, lab_key) if k not in npz.files]
    if missing:
        raise OrganDataError(
            f"'{path}' has no {missing} array(s); an organmnist3d-layout npz holds train/val/test _images and "
            f"_labels (found {sorted(npz.files)}). Download organmnist3d.npz from MedMNIST or cut crops with "
            "scripts/make_organ_crops.py."
        )
    images, labels = npz[img_key], npz[lab_key]
    if images.ndim != 4:
        raise OrganDataError(f"'{path}': {img_key} must be (N, D, H, W) 3D crops, got shape {images.shape}.")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise OrganDataError(
            f"'{path}': {lab_key} must be (N,) or (N, 1) with N = {images.shape[0]} (one label per image), "
            f"got shape {labels.shape}."
        )
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            raise OrganDataError(f"'{path}': {lab_key} must hold integer class ids, got {labels.dtype} values.")
    if images.dtype not in (np.uint8, np.int16):
        if not np.issubdtype(images.dtype, np.floating):
            raise OrganDataError(f"'{path}': {img_key} must be int16 (Hounsfield units), uint8 (0..255) or float in "
                                 f"[0, 1], got {images.dtype}.")
        if images.size and (float(images.min()) < -1e-3 or float(images.max()) > 1.0 + 1e-3):
            raise OrganDataError(
                f"'{path}': {img_key} is float with values in [{images.min():.4g}, {images.max():.4g}]; store uint8 "
                "0..255 (MedMNIST) or float scaled to [0, 1]."
            )
    return images, labels.astype(np.int64)


def load_organ_npz(
    path: str | os.PathLike,
    splits: Sequence[str] = SPLITS,
    label_names: Mapping[Any, Any] | str | os.PathLike | None = None,
    min_classes: int = 2,
) -> OrganCropSet:
    """Read organ crops from an npz in MedMNIST's organmnist3d layout (no download, ever).

    Label names come from ``label_names`` when given, else from the file's own ``label_names``
    array, else :data:`ORGANMNIST3D_LABELS`.

    Args:
        path: the npz (MedMNIST's ``organmnist3d.npz`` / ``organmnist3d_64.npz``, or a crop set).
        splits: which splits to read and concatenate, in this order.
        label_names: an id -> name table (mapping or JSON file) overriding the names.
        min_classes: the smallest number of distinct labels accepted.

    Returns:
        An :class:`OrganCropSet`.

    Raises:
        OrganDataError: the file is missing or not an npz, an expected array is missing or has the
            wrong shape / type, a split is unknown, the splits differ in crop size, a label id has
            no name, or fewer than ``min_classes`` classes are present.
    """
    path = str(path)
    splits = [str(s) for s in splits]
    bad = [s for s in splits if s not in SPLITS]
    if not splits or bad:
        raise OrganDataError(f"splits must be a non-empty subset of {list(SPLITS)}, got {splits}.")
    if not os.path.isfile(path):
        raise OrganDataError(
            f"organ crop file '{path}' does not exist. Download organmnist3d.npz from MedMNIST "
            "(https://zenodo.org/records/10519652) into the folder, or cut crops with scripts/make_organ_crops.py."
        )
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise OrganDataError(f"cannot read '{path}' as an npz file: {e}") from e
    if not hasattr(npz, "files"):
        raise OrganDataError(f"'{path}' holds a single array, not an npz of train/val/test _images and _labels.")
    with npz:
        parts = [_split_arrays(npz, s, path) for s in splits]
        shapes = {p[0].shape[1:] for p in parts if p[0].shape[0]}
        if len(shapes) > 1:
            raise OrganDataError(f"'{path}': the splits {splits} hold crops of different sizes {sorted(shapes)}.")
        dtypes = {p[0].dtype for p in parts if p[0].shape[0]}
        file_names = _decode_strings(npz["label_names"]) if "label_names" in npz.files else None
        case_ids = []
        for s, (images, _) in zip(splits, parts):
            key = f"{s}_case_ids"
            if key in npz.files and npz[key].shape[0] == images.shape[0]:
                case_ids.append(_decode_strings(npz[key]))
            else:
                case_ids.append(np.asarray([f"{s}/{i}" for i in range(images.shape[0])], dtype=object))
    non_empty = [p for p in parts if p[0].shape[0]]
    if not non_empty:
        raise OrganDataError(f"'{path}': the splits {splits} hold no crops.")
    if len(dtypes) == 1:
        images = np.concatenate([p[0] for p in non_empty])
    elif np.dtype(np.int16) in dtypes:
        raise OrganDataError(f"'{path}': some splits are in Hounsfield units (int16) and others are not ({sorted(map(str, dtypes))}); "
                             "cut all splits with scripts/make_organ_crops.py.")
    else:  # uint8 and float splits: bring all to float in [0, 1]
        images = np.concatenate([p[0] / np.float32(255.0 if p[0].dtype == np.uint8 else 1.0) for p in non_empty])
    labels = np.concatenate([p[1] for p in parts])
    split_of = np.concatenate([np.full(p[1].shape[0], s, dtype=object) for s, p in zip(splits, parts)])

    if label_names is not None:
        names = read_name_table(label_names)
        where = "label_names"
        if isinstance(label_names, (str, os.PathLike)):
            where = f"the label name table '{label_names}'"
    elif file_names is not None:
        names, where = dict(enumerate(str(n) for n in file_names)), f"the label_names array of '{path}'"
    else:
        names, where = dict(ORGANMNIST3D_LABELS), "the OrganMNIST3D label names (ids 0..10)"
    present = sorted(int(i) for i in np.unique(labels))
    unnamed = [i for i in present if not names.get(i)]
    if unnamed:
        raise OrganDataError(
            f"label id(s) {unnamed} of '{path}' have no name in {where}; give a name table (label_names) "
            "that names every id."
        )
    if len(present) < min_classes:
        raise OrganDataError(
            f"'{path}' (splits {splits}) holds {len(present)} class(es) {[names[i] for i in present]}; clustering "
            f"needs at least {min_classes}."
        )
    logger.info("read %d crops of %s (%d classes) from %s", len(labels), images.shape[1:], len(present), path)
    return OrganCropSet(
        images=images,
        labels=labels,
        names={i: names[i] for i in present},
        splits=split_of,
        case_ids=np.concatenate(case_ids),
        source=path,
    )


def save_organ_npz(
    path: str | os.PathLike,
    images: Mapping[str, np.ndarray],
    labels: Mapping[str, np.ndarray],
    label_names: Mapping[int, str] | None = None,
    case_ids: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Write crops in the organmnist3d layout (compressed npz, written atomically).

    Every split of :data:`SPLITS` is written; a split missing from ``images`` is stored empty
    with the crop size of the others.

    Args:
        path: output ``.npz``.
        images: split -> ``(N, D, H, W)`` crops, all ``int16`` (Hounsfield units) or all ``uint8`` (0..255).
        labels: split -> ``(N,)`` integer ids.
        label_names: id -> name, stored as the ``label_names`` string array (index = id); ids
            without a name get an empty string.
        case_ids: split -> one string per crop, stored as ``<split>_case_ids``.

    Raises:
        ValueError: for an unknown split, non-uint8 or non-3D images, or lengths that differ.
    """
    unknown = set(images) - set(SPLITS)
    if unknown or set(labels) != set(images):
        raise ValueError(f"images and labels must have the same splits from {list(SPLITS)}, got {sorted(images)}.")
    if not images:
        raise ValueError("no crops to write.")
    first = np.asarray(next(iter(images.values())))
    shape, dtype = first.shape[1:], first.dtype
    if dtype not in (np.uint8, np.int16):
        raise ValueError(f"images must be int16 (Hounsfield units) or uint8, got {dtype}.")
    arrays: dict[str, np.ndarray] = {}
    for split in SPLITS:
        img = np.asarray(images.get(split, np.zeros((0, *shape), dtype)))
        lab = np.asarray(labels.get(split, np.zeros((0,), np.int64))).reshape(-1, 1)
        if img.dtype != dtype or img.ndim != 4 or img.shape[1:] != shape:
            want = ", ".join(map(str, shape))
            raise ValueError(f"{split} images must be {dtype} (N, {want}), got {img.dtype} {img.shape}.")
        if lab.shape[0] != img.shape[0]:
            raise ValueError(f"{split}: {img.shape[0]} images but {lab.shape[0]} labels.")
        arrays[f"{split}_images"] = img
        arrays[f"{split}_labels"] = lab.astype(np.uint8 if lab.size == 0 or lab.max() < 256 else np.int64)
        if case_ids is not None:
            ids = np.asarray([str(c) for c in case_ids.get(split, [])], dtype=str)
            if ids.shape[0] != img.shape[0]:
                raise ValueError(f"{split}: {img.shape[0]} images but {ids.shape[0]} case ids.")
            arrays[f"{split}_case_ids"] = ids
    if label_names:
        top = max(int(i) for i in label_names)
        arrays["label_names"] = np.asarray([label_names.get(i, "") or "" for i in range(top + 1)], dtype=str)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(buf.getvalue(), Path(path))
