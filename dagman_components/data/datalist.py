# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Datalists of CT volumes: found in a folder or read from a JSON file, then checked.

A datalist is a list of dictionaries such as ``[{"image": "/data/ct_001.nii.gz"}, ...]`` that
MONAI's datasets and ``LoadImaged`` consume. Everything that can go wrong with the user's data
(missing folder, no volume found, a listed file that is absent, a corrupt or 2D file) raises
:class:`DataSourceError` with a message that names the file or setting and says what to do.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dagman_components.errors import DagmanError

__all__ = [
    "DataSourceError",
    "VOLUME_EXTENSIONS",
    "DICOM_EXTENSION",
    "build_datalist",
    "validate_volumes",
    "volume_stem",
]

logger = logging.getLogger(__name__)

#: File name endings read as one volume each (compared in lower case).
VOLUME_EXTENSIONS: tuple[str, ...] = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def volume_stem(name: str) -> str:
    """A volume file name without its extension (``.nii.gz``, ``.nrrd``, ...).

    Example:
        >>> volume_stem("lung_001.nii.gz")
        'lung_001'
    """
    lower = name.lower()
    for ext in sorted(VOLUME_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return name[: -len(ext)]
    return name


#: File name ending of DICOM files; files without this ending are recognised by their preamble.
DICOM_EXTENSION = ".dcm"

_NIFTI_EXTENSIONS = (".nii", ".nii.gz")
_DICOM_MAGIC_OFFSET = 128
_DICOM_MAGIC = b"DICM"
_MAX_LISTED = 20
_CHUNK_BYTES = 1 << 20
_SUPPORTED_TEXT = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or DICOM series"


class DataSourceError(DagmanError, ValueError):
    """A dataset folder, datalist or volume cannot be used; the message says which and why."""


def format_listing(lines: Sequence[str], limit: int = _MAX_LISTED) -> str:
    """Join ``lines`` as an indented list of at most ``limit`` entries plus "... and N more"."""
    shown = [f"  - {line}" for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"  ... and {len(lines) - limit} more")
    return "\n".join(shown)


def _describe(err: BaseException) -> str:
    """The exception's type and the first line of its message, shortened."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__


def _is_volume_file(name: str) -> bool:
    return name.lower().endswith(VOLUME_EXTENSIONS)


def _is_dicom_file(path: str) -> bool:
    """Whether ``path`` is a DICOM file: ``.dcm`` ending, or ``DICM`` at byte 128 (DICOMDIR excluded)."""
    name = os.path.basename(path)
    if name.upper() == "DICOMDIR":
        return False
    if name.lower().endswith(DICOM_EXTENSION):
        return True
    try:
        with open(path, "rb") as stream:
            stream.seek(_DICOM_MAGIC_OFFSET)
            return stream.read(len(_DICOM_MAGIC)) == _DICOM_MAGIC
    except OSError:
        return False


def _scan_folder(folder: str, image_key: str) -> list[dict]:
    """One item per volume file and per folder holding DICOM files, sorted by path."""
    paths: list[str] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        has_dicom = False
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            if _is_volume_file(name):
                paths.append(path)
            elif not has_dicom and _is_dicom_file(path):
                has_dicom = True
        if has_dicom:
            paths.append(root)
    return [{image_key: path} for path in sorted(paths)]


def _resolve(base_dir: str, path: Any) -> Any:
    """Join a relative path (or each of a list of paths) to ``base_dir``; other values unchanged."""
    if isinstance(path, (str, os.PathLike)):
        path = os.fspath(path)
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))
    if isinstance(path, (list, tuple)) and all(isinstance(p, (str, os.PathLike)) for p in path):
        return [_resolve(base_dir, p) for p in path]
    return path


def _read_json_datalist(json_path: str, image_key: str, json_key: str, base_dir: str | None) -> list[dict]:
    """Read a decathlon-style datalist, a JSON list of dicts or a JSON list of paths."""
    from monai.data import load_decathlon_datalist

    try:
        with open(json_path, encoding="utf-8") as stream:
            content = json.load(stream)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataSourceError(f"datalist '{json_path}' is not valid JSON ({err}); fix or regenerate the file.") from err
    base = os.path.abspath(base_dir if base_dir is not None else os.path.dirname(json_path))

    if isinstance(content, Mapping):
        if json_key not in content:
            keys = ", ".join(repr(k) for k in content) or "none"
            raise DataSourceError(
                f"datalist '{json_path}' has no key '{json_key}' (keys found: {keys}); "
                f"set the datalist key (json_key) to the list of items to use."
            )
        entries = content[json_key]
        if isinstance(entries, list) and entries and all(isinstance(e, Mapping) for e in entries):
            items = load_decathlon_datalist(json_path, is_segmentation=True, data_list_key=json_key, base_dir=base)
            for item in items:  # MONAI resolves "image" and "label" only
                if image_key in item:
                    item[image_key] = _resolve(base, item[image_key])
            return items
    else:
        entries = content

    where = f"'{json_path}'" + (f" under '{json_key}'" if isinstance(content, Mapping) else "")
    if not isinstance(entries, list) or not entries:
        raise DataSourceError(
            f"datalist {where} must be a non-empty list of items ({{'{image_key}': path}}) or of paths."
        )
    items = []
    for index, entry in enumerate(entries):
        if isinstance(entry, str):
            items.append({image_key: _resolve(base, entry)})
        elif isinstance(entry, Mapping):
            item = dict(entry)
            for key in (image_key, "label"):
                if key in item:
                    item[key] = _resolve(base, item[key])
            items.append(item)
        else:
            raise DataSourceError(
                f"datalist {where}: item {index} is a {type(entry).__name__}; "
                f"every item must be a path string or a dict with the key '{image_key}'."
            )
    return items


def _check_listed_paths(items: list[dict], image_key: str, source: str) -> None:
    """Raise one error listing every item without ``image_key`` and every listed path that is absent."""
    problems = []
    for index, item in enumerate(items):
        if image_key not in item:
            problems.append(f"item {index} has no key '{image_key}' (keys: {', '.join(map(str, item))})")
            continue
        value = item[image_key]
        for path in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(path, (str, os.PathLike)) or not os.path.exists(path):
                problems.append(f"{path} (item {index}) does not exist")
    if problems:
        raise DataSourceError(
            f"datalist '{source}' lists {len(problems)} missing image(s); fix the paths, or set base_dir to the "
            f"folder the relative paths start from:\n{format_listing(problems)}"
        )


def build_datalist(
    source: str | os.PathLike,
    image_key: str = "image",
    json_key: str = "training",
    base_dir: str | None = None,
) -> list[dict]:
    """Build a MONAI datalist from a folder of CT volumes or from a JSON datalist.

    A folder is searched recursively (hidden files and folders skipped): every NIfTI, NRRD and
    MetaImage file is one item, and every folder that holds DICOM files (``.dcm`` files, or files
    with the ``DICM`` preamble) is one item whose path is that folder, which MONAI's ``LoadImage``
    with ``ITKReader`` reads as a series (one series per folder). A ``.json`` file is read as a
    decathlon-style datalist (the list under ``json_key``), or as a plain JSON list of dicts or of
    paths; relative paths start from ``base_dir`` or else the JSON file's folder. A single volume
    file gives a one-item datalist.

    Args:
        source: folder of volumes, JSON datalist, or one volume file (the ``dataset_dir`` setting).
        image_key: key of the image path in each item.
        json_key: key of the list to use in a decathlon-style JSON datalist.
        base_dir: folder that relative paths in a JSON datalist start from.

    Returns:
        The items, each a dict with at least ``image_key``; sorted by path for a folder, in file
        order for a JSON datalist.

    Raises:
        DataSourceError: when ``source`` does not exist, holds no readable volume, the JSON is
            malformed or lacks ``json_key``, or listed images are missing (all named at once).

    Example:
        >>> build_datalist("data/totalseg_example")  # doctest: +SKIP
        [{'image': '.../example_ct.nii.gz'}, {'image': '.../example_ct_dicom'}, ...]
    """
    source = os.path.abspath(os.fspath(source))
    if not os.path.exists(source):
        raise DataSourceError(
            f"dataset_dir '{source}' does not exist; set dataset_dir to a folder of CT volumes "
            f"({_SUPPORTED_TEXT}) or to a JSON datalist."
        )
    if os.path.isdir(source):
        items = _scan_folder(source, image_key)
        if not items:
            raise DataSourceError(
                f"dataset_dir '{source}' holds no readable volume; looked recursively for files ending "
                f"{', '.join(VOLUME_EXTENSIONS)} and for folders of DICOM files ({DICOM_EXTENSION} or 'DICM' "
                f"preamble). Put CT volumes there or point dataset_dir elsewhere."
            )
        logger.info("Found %d volume(s) in '%s'.", len(items), source)
        return items
    if source.lower().endswith(".json"):
        items = _read_json_datalist(source, image_key, json_key, base_dir)
        _check_listed_paths(items, image_key, source)
        logger.info("Read %d item(s) from datalist '%s'.", len(items), source)
        return items
    if _is_volume_file(source) or _is_dicom_file(source):
        return [{image_key: source}]
    raise DataSourceError(
        f"dataset_dir '{source}' is a file but neither a JSON datalist nor a volume; set dataset_dir to a "
        f"folder of CT volumes ({_SUPPORTED_TEXT}) or to a .json datalist."
    )


def _shape_problem(shape: Sequence[int], components: int = 1) -> str | None:
    """Why an image of ``shape`` (spatial dims first) is not a single-channel 3D volume, or None."""
    shape = [int(s) for s in shape]
    if components > 1:
        return f"has {components} components per voxel; expected a single-channel 3D CT volume"
    if len(shape) < 3:
        return f"is {len(shape)}D (shape {tuple(shape)}); expected a 3D volume"
    if any(s != 1 for s in shape[3:]):
        return f"is {len(shape)}D (shape {tuple(shape)}) with several channels or time points; expected one 3D volume"
    if min(shape[:3]) < 2:
        return f"has a spatial size below 2 (shape {tuple(shape[:3])}); expected a 3D volume"
    return None


def _nifti_problem(path: str, check_payload: bool) -> str | None:
    import nibabel as nib

    image = nib.load(path)
    problem = _shape_problem(image.shape)
    if problem or not check_payload:
        return problem
    header = image.header
    expected = int(header.get_data_offset()) + int(np.prod(image.shape)) * header.get_data_dtype().itemsize
    if path.lower().endswith(".gz"):
        size = 0
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(_CHUNK_BYTES):
                size += len(chunk)
    else:
        size = os.path.getsize(path)
    if size < expected:
        return f"is truncated ({size} of {expected} bytes of voxel data); re-export or re-download it"
    return None


def _itk_problem(path: str, check_payload: bool) -> str | None:
    import itk

    image_io = itk.ImageIOFactory.CreateImageIO(path, itk.CommonEnums.IOFileMode_ReadMode)
    if image_io is None:
        return "is not recognised by ITK; expected " + _SUPPORTED_TEXT
    image_io.SetFileName(path)
    image_io.ReadImageInformation()
    shape = [image_io.GetDimensions(i) for i in range(image_io.GetNumberOfDimensions())]
    problem = _shape_problem(shape, image_io.GetNumberOfComponents())
    if problem is None and check_payload:
        itk.imread(path)  # reads the voxels: raises on missing or truncated data
    return problem


def _dicom_series_problem(folder: str) -> str | None:
    """Why a folder of DICOM files is not one series (MONAI's ``ITKReader`` would read only the first), or None."""
    import pydicom

    series: dict[str, int] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(path) or not _is_dicom_file(path):
            continue
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        uid = str(header.get("SeriesInstanceUID", "unknown"))
        series[uid] = series.get(uid, 0) + 1
    if len(series) < 2:
        return None
    listed = ", ".join(f"{uid} ({count} files)" for uid, count in sorted(series.items()))
    return (f"holds {len(series)} DICOM series mixed in one folder ({listed}); only one would be read. "
            f"Move each series into its own folder")


def _readable(path: str) -> bool:
    """Whether this process may read the file (or list the folder): permissions and ACLs, by trying."""
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            with open(path, "rb"):
                pass
    except PermissionError:
        return False
    return True


def _loader_problem(path: str, reader: Any) -> str | None:
    from monai.transforms import LoadImage

    image = LoadImage(reader=reader, image_only=True, ensure_channel_first=False)(path)
    return _shape_problem(image.shape)


def validate_volumes(
    datalist: Sequence[Mapping[str, Any]],
    image_key: str = "image",
    reader: Any = None,
    check_payload: bool = True,
) -> None:
    """Check that every image of a datalist is a readable, single-channel 3D volume.

    By default only headers are opened (nibabel for NIfTI, ITK image information for NRRD and
    MetaImage), plus a pass over the voxel bytes that catches truncated files without building
    arrays (``check_payload``). DICOM series folders are loaded with MONAI's ``LoadImage`` and
    ``ITKReader``, after checking that the folder holds one series only. With ``reader`` set, every image is loaded with ``LoadImage(reader=reader)``,
    the way training will read it. A trailing singleton 4th dimension is accepted.

    Args:
        datalist: items as returned by :func:`build_datalist`.
        image_key: key of the image path (or list of paths) in each item.
        reader: optional MONAI reader (name, class or instance) to load every image with.
        check_payload: also check that the voxel data is complete (reads each file once).

    Raises:
        DataSourceError: listing every unreadable, corrupt, non-3D or too small image and every
            folder with several DICOM series (at most 20 named, then "and N more").

    Example:
        >>> validate_volumes(build_datalist("data/lidc_nodules_sample/image"))  # doctest: +SKIP
    """
    problems: list[str] = []
    for index, item in enumerate(datalist):
        if image_key not in item:
            problems.append(f"item {index} has no key '{image_key}'")
            continue
        value = item[image_key]
        for path in value if isinstance(value, (list, tuple)) else [value]:
            path = os.fspath(path)
            try:
                if not os.path.exists(path):
                    problem: str | None = "does not exist"
                elif not _readable(path):
                    problem = "cannot be read (permission denied); make it readable (chmod a+r) or run as its owner"
                elif reader is not None:
                    problem = _loader_problem(path, reader)
                elif os.path.isdir(path):
                    problem = _dicom_series_problem(path) or _loader_problem(path, "ITKReader")
                elif path.lower().endswith(_NIFTI_EXTENSIONS):
                    problem = _nifti_problem(path, check_payload)
                else:
                    problem = _itk_problem(path, check_payload)
            except Exception as err:  # any reader failure means the file cannot be used
                problem = f"is unreadable or corrupt ({_describe(err)})"
            if problem is not None:
                problems.append(f"{path} {problem}")
    if problems:
        raise DataSourceError(
            f"{len(problems)} image(s) cannot be used for training; remove them from the dataset or fix them:\n"
            f"{format_listing(problems)}"
        )
    logger.info("Validated %d item(s).", len(datalist))
