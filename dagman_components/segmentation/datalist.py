# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Datalists of image/label pairs for segmentation: MSD-style JSON, or folders of images and labels.

A segmentation datalist is a list of dicts ``{"image": path, "label": path, ...}``. It comes from a
JSON file (Medical Segmentation Decathlon ``dataset.json``, or any JSON with lists under keys such
as ``training`` / ``validation`` / ``test``; relative paths start from the JSON's folder), or from
two folders whose files are matched by name (an image ``lung_001_0000.nii.gz`` also matches a label
``lung_001.nii.gz``, the nnU-Net channel suffix). One folder holding a known pair of subfolders
(``imagesTr``/``labelsTr``, ``images``/``labels``, ``image``/``mask``, ...) works too.
:func:`split_by_group` keeps every group (a patient) on one side of a split.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dagman_components.atomic import atomic_write_text
from dagman_components.data import VOLUME_EXTENSIONS, DataSourceError, build_datalist
from dagman_components.data.datalist import format_listing, volume_stem

__all__ = [
    "FOLDER_PAIRS",
    "volume_stem",
    "find_image_label_folders",
    "pair_folders",
    "build_segmentation_datalist",
    "split_by_group",
    "segmentation_split",
    "write_datalist",
]

logger = logging.getLogger(__name__)

#: (images, labels) subfolder names recognised inside one dataset folder, in this order.
FOLDER_PAIRS: tuple[tuple[str, str], ...] = (
    ("imagesTr", "labelsTr"),
    ("images", "labels"),
    ("image", "label"),
    ("image", "mask"),
    ("images", "masks"),
)
_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")  # nnU-Net modality suffix of image names




def _volumes_in(folder: str) -> list[str]:
    """Volume files directly inside ``folder`` (hidden files such as macOS ``._x.nii.gz`` skipped)."""
    return sorted(
        n for n in os.listdir(folder)
        if not n.startswith(".") and n.lower().endswith(VOLUME_EXTENSIONS) and os.path.isfile(os.path.join(folder, n))
    )


def find_image_label_folders(root: str | os.PathLike) -> tuple[str, str]:
    """The image and label subfolders of a dataset folder (first match of :data:`FOLDER_PAIRS`).

    Raises:
        DataSourceError: when no known pair of subfolders exists, naming the folder and the pairs tried.
    """
    root = os.fspath(root)
    for images, labels in FOLDER_PAIRS:
        if os.path.isdir(os.path.join(root, images)) and os.path.isdir(os.path.join(root, labels)):
            return os.path.join(root, images), os.path.join(root, labels)
    tried = ", ".join(f"{image}/+{label}/" for image, label in FOLDER_PAIRS)
    raise DataSourceError(
        f"dataset_dir '{root}' holds no image/label subfolder pair (tried {tried}); point dataset_dir to a JSON "
        f"datalist, or give the image folder and label folder separately."
    )


def pair_folders(
    image_dir: str | os.PathLike, label_dir: str | os.PathLike, image_key: str = "image", label_key: str = "label"
) -> list[dict]:
    """Match the volumes of an image folder and a label folder by file name.

    A label matches an image of the same stem, or of the same stem plus an nnU-Net channel suffix
    (``_0000``). Every image needs exactly one label and every label an image.

    Args:
        image_dir: folder of images (not searched recursively).
        label_dir: folder of labels.
        image_key: key of the image path in each item.
        label_key: key of the label path in each item.

    Returns:
        Items ``{image_key: path, label_key: path}`` sorted by image name.

    Raises:
        DataSourceError: a folder is missing or empty, or files are left unmatched (all named).
    """
    image_dir, label_dir = os.path.abspath(os.fspath(image_dir)), os.path.abspath(os.fspath(label_dir))
    for what, folder in (("image", image_dir), ("label", label_dir)):
        if not os.path.isdir(folder):
            raise DataSourceError(f"{what} folder '{folder}' does not exist; fix the path.")
    images, labels = _volumes_in(image_dir), _volumes_in(label_dir)
    if not images:
        raise DataSourceError(f"image folder '{image_dir}' holds no volume ({', '.join(VOLUME_EXTENSIONS)}).")
    by_stem = {volume_stem(n): n for n in labels}
    items, unmatched, used = [], [], set()
    for name in images:
        stem = volume_stem(name)
        label = by_stem.get(stem) or by_stem.get(_CHANNEL_SUFFIX.sub("", stem))
        if label is None:
            unmatched.append(f"image {os.path.join(image_dir, name)} has no label named {stem}.* in {label_dir}")
            continue
        used.add(label)
        items.append({image_key: os.path.join(image_dir, name), label_key: os.path.join(label_dir, label)})
    unmatched += [f"label {os.path.join(label_dir, n)} has no image in {image_dir}" for n in labels if n not in used]
    if unmatched:
        raise DataSourceError(
            f"{len(unmatched)} file(s) of '{image_dir}' and '{label_dir}' cannot be paired by name; rename or remove "
            f"them:\n{format_listing(unmatched)}"
        )
    logger.info("Paired %d image/label volume(s) from '%s' and '%s'.", len(items), image_dir, label_dir)
    return items


def build_segmentation_datalist(
    source: str | os.PathLike,
    json_key: str = "training",
    label_dir: str | os.PathLike | None = None,
    image_key: str = "image",
    label_key: str = "label",
    require_labels: bool = True,
    base_dir: str | None = None,
) -> list[dict]:
    """Image/label items from a JSON datalist, a folder pair, or one folder holding a known pair.

    Args:
        source: a JSON datalist (MSD ``dataset.json`` style), an image folder (with ``label_dir``),
            or a dataset folder with image and label subfolders (see :data:`FOLDER_PAIRS`).
        json_key: the list to read from a JSON datalist.
        label_dir: the label folder when ``source`` is an image folder.
        image_key: key of the image path in each item.
        label_key: key of the label path in each item.
        require_labels: every item must have an existing label (off for inference lists).
        base_dir: folder that relative paths of a JSON datalist start from (default: its folder).

    Returns:
        The items, with absolute paths.

    Raises:
        DataSourceError: naming the file, key, item or folder that is wrong.

    Example:
        >>> build_segmentation_datalist("data/lidc_nodules_sample")[0]  # doctest: +SKIP
        {'image': '.../image/LIDC-IDRI-0001_R_1.nii.gz', 'label': '.../mask/LIDC-IDRI-0001_R_1.nii.gz'}
    """
    source = os.path.abspath(os.fspath(source))
    if label_dir is not None:
        return pair_folders(source, label_dir, image_key, label_key)
    if os.path.isdir(source):
        return pair_folders(*find_image_label_folders(source), image_key=image_key, label_key=label_key)
    items = build_datalist(source, image_key=image_key, json_key=json_key, base_dir=base_dir)
    if require_labels:
        problems = []
        for index, item in enumerate(items):
            label = item.get(label_key)
            if label is None:
                problems.append(f"item {index} ({item.get(image_key)}) has no '{label_key}'")
            elif not os.path.exists(label):
                problems.append(f"item {index}: label {label} (of image {item.get(image_key)}) does not exist")
        if problems:
            raise DataSourceError(
                f"datalist '{source}' under '{json_key}' has {len(problems)} item(s) without a usable label; fix the "
                f"paths (relative paths start from the JSON's folder):\n{format_listing(problems)}"
            )
    return items


def split_by_group(
    items: Sequence[Mapping[str, Any]],
    val_fraction: float = 0.2,
    group_key: str = "patient_id",
    seed: int = 0,
    image_key: str = "image",
) -> tuple[list[dict], list[dict]]:
    """Split items into training and validation with every group on one side.

    Items without ``group_key`` are their own group (named by their image path). The groups are
    sorted, shuffled with ``numpy.random.default_rng(seed)``, and ``round(val_fraction * n_groups)``
    of them (at least one when ``0 < val_fraction`` and there are two groups or more) go to validation.

    Args:
        items: the datalist.
        val_fraction: share of groups for validation, in [0, 1).
        group_key: item key naming the group (e.g. the patient).
        seed: seed of the shuffle; the same seed gives the same split.
        image_key: key used to name ungrouped items.

    Returns:
        ``(training, validation)`` items, each in the input order.

    Raises:
        ValueError: when ``val_fraction`` is not in [0, 1).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    names = [str(item.get(group_key, item.get(image_key, i))) for i, item in enumerate(items)]
    groups = sorted(set(names))
    n_val = int(round(val_fraction * len(groups)))
    if val_fraction > 0 and len(groups) > 1:
        n_val = min(max(n_val, 1), len(groups) - 1)
    order = np.random.default_rng(seed).permutation(len(groups))
    val_groups = {groups[i] for i in order[:n_val]}
    train = [dict(item) for item, g in zip(items, names) if g not in val_groups]
    val = [dict(item) for item, g in zip(items, names) if g in val_groups]
    return train, val


def _json_keys(path: str) -> set[str]:
    try:
        with open(path, encoding="utf-8") as stream:
            content = json.load(stream)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return set()  # build_datalist reports the problem with its own message
    return set(content) if isinstance(content, Mapping) else set()


def segmentation_split(
    source: str | os.PathLike,
    part: str = "training",
    val_fraction: float = 0.2,
    seed: int = 0,
    group_key: str = "patient_id",
    label_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """One part of a dataset, as the bundle configs read it.

    A JSON datalist that has a list under ``part`` gives that list. Otherwise (an MSD
    ``dataset.json`` with ``training`` only, or folders) all labelled items are split with
    :func:`split_by_group` (``val_fraction``, ``seed``, ``group_key``) and ``part`` picks
    ``training`` or ``validation``.

    Args:
        source: JSON datalist or folder(s) (see :func:`build_segmentation_datalist`).
        part: ``training``, ``validation``, or another JSON key (e.g. ``test``).
        val_fraction: validation share of groups when the source has no ``validation`` list.
        seed: seed of that split.
        group_key: item key that keeps groups together (patients).
        label_dir: the label folder when ``source`` is an image folder.

    Returns:
        The items of ``part``.

    Raises:
        DataSourceError: as :func:`build_segmentation_datalist`, or when ``part`` is neither in the
            JSON nor ``training`` / ``validation``.
    """
    source = os.path.abspath(os.fspath(source))
    is_json = os.path.isfile(source) and source.lower().endswith(".json")
    keys = _json_keys(source) if is_json else set()
    if part in keys and (part != "training" or "validation" in keys):
        labelled = part in ("training", "validation")  # other lists (e.g. MSD 'test') may hold images only
        return build_segmentation_datalist(source, json_key=part, label_dir=label_dir, require_labels=labelled)
    if part not in ("training", "validation"):
        raise DataSourceError(
            f"'{source}' has no list '{part}'" + (f" (keys: {', '.join(sorted(keys))})" if keys else "")
            + "; use a JSON datalist with that key, or part 'training' / 'validation'."
        )
    everything = build_segmentation_datalist(source, json_key="training", label_dir=label_dir)
    train, val = split_by_group(everything, val_fraction, group_key=group_key, seed=seed)
    logger.info("Split '%s' by '%s': %d training, %d validation item(s).", source, group_key, len(train), len(val))
    return train if part == "training" else val


def write_datalist(
    path: str | os.PathLike,
    content: Mapping[str, Any],
    path_keys: Sequence[str] = ("image", "label"),
    relative: bool = True,
) -> dict[str, Any]:
    """Write a JSON datalist atomically, with paths relative to its folder (portable) or absolute.

    Every list in ``content`` whose items are dicts (or path strings) has the entries under
    ``path_keys`` (or the strings) rewritten; other values are written as they are.

    Args:
        path: the JSON file.
        content: e.g. ``{"labels": {...}, "training": [...], "validation": [...]}``.
        path_keys: item keys holding file paths.
        relative: write paths relative to the JSON's folder (``build_datalist`` resolves them back).

    Returns:
        The content as written.
    """
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))

    def _fix(p: Any) -> Any:
        if not isinstance(p, (str, os.PathLike)):
            return p
        p = os.path.abspath(os.fspath(p))
        return os.path.relpath(p, folder) if relative else p

    out: dict[str, Any] = {}
    for key, value in content.items():
        if isinstance(value, list) and value and all(isinstance(v, (Mapping, str)) for v in value):
            out[key] = [
                _fix(v) if isinstance(v, str) else {k: (_fix(x) if k in path_keys else x) for k, x in v.items()}
                for v in value
            ]
        else:
            out[key] = value
    os.makedirs(folder, exist_ok=True)
    atomic_write_text(json.dumps(out, indent=2) + "\n", path)
    return out
