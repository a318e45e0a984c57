# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""The nodule table: one CSV row per nodule, read into a datalist with checked labels and files.

Two layouts are supported:

* nodule-centred crops (the LIDC set of this project): ``image/<patient>_R_<nodule>.nii.gz`` plus
  ``nodules.csv`` with ``patient_id``, ``nodule_id`` and ``Malignancy_value``;
* full CT volumes plus world-coordinate nodule centres, as LUNA16 users have them:
  ``seriesuid, coordX, coordY, coordZ`` (mm), one volume ``<seriesuid>.mhd`` (or ``.nii.gz``)
  per series; give ``center_columns`` and the centre is kept in each item for cropping.

Everything that can be wrong with a user's table raises :class:`NoduleTableError` naming the CSV,
the column or the rows (CSV line numbers, the header being line 1) and what to do.
"""

from __future__ import annotations

import logging
import math
import os
import string
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from dagman_components.data import build_datalist
from dagman_components.data.datalist import format_listing, volume_stem
from dagman_components.errors import DagmanError

__all__ = ["NoduleTableError", "LabelRule", "read_nodule_table", "inference_datalist", "LIDC_ID_TEMPLATE"]

logger = logging.getLogger(__name__)

#: Case id of a row of the LIDC table of this project; also the crop's file name without extension.
LIDC_ID_TEMPLATE = "{patient_id}_R_{nodule_id}"


class NoduleTableError(DagmanError, ValueError):
    """A nodule table, its rows or the files they name cannot be used; the message says which."""




def _as_text(value: Any) -> str:
    """A cell as text: integral floats lose their ``.0`` (pandas reads integer columns with gaps as float)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


@dataclass(frozen=True)
class LabelRule:
    """Map a label cell to 1 (malignant), 0 (benign) or ``None`` (excluded on purpose).

    Either a threshold rule on a numeric column (``positive_min`` / ``negative_max``; values strictly
    between them are excluded, e.g. ``negative_max=2`` drops the indeterminate score 3) or a
    categorical rule (``positive_values`` / ``negative_values``, compared as text, plus
    ``ignore_values`` to drop). The default is the paper's rule on LIDC's ``Malignancy_value``:
    malignant when >= 4, benign when <= 3. ``LabelRule(positive_values=("Malign",),
    negative_values=("Benign",))`` reads the ``Diagnosis`` column instead.

    Args:
        positive_min: numeric values >= this are malignant.
        negative_max: numeric values <= this are benign.
        positive_values: values (as text) that are malignant.
        negative_values: values (as text) that are benign.
        ignore_values: values (as text) whose rows are dropped (categorical rule only).

    Raises:
        ValueError: when both or neither kind of rule is given, the thresholds overlap, or a value is
            listed as both positive and negative.

    Example:
        >>> rule = LabelRule()
        >>> rule(5), rule(3), LabelRule(positive_values=("Malign",), negative_values=("Benign",))("Benign")
        (1, 0, 0)
    """

    positive_min: float | None = None
    negative_max: float | None = None
    positive_values: tuple[str, ...] = ()
    negative_values: tuple[str, ...] = ()
    ignore_values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("positive_values", "negative_values", "ignore_values"):
            object.__setattr__(self, name, tuple(_as_text(v) for v in getattr(self, name) or ()))
        numeric = self.positive_min is not None or self.negative_max is not None
        categorical = bool(self.positive_values or self.negative_values)
        if not numeric and not categorical:
            object.__setattr__(self, "positive_min", 4.0)
            object.__setattr__(self, "negative_max", 3.0)
            numeric = True
        if numeric and categorical:
            raise ValueError("label_rule: give either positive_min/negative_max or positive_values/negative_values.")
        if numeric:
            if self.positive_min is None or self.negative_max is None:
                raise ValueError("label_rule: a threshold rule needs both positive_min and negative_max.")
            if float(self.negative_max) >= float(self.positive_min):
                raise ValueError(
                    f"label_rule: negative_max ({self.negative_max}) must be below positive_min ({self.positive_min})."
                )
        elif not (self.positive_values and self.negative_values):
            raise ValueError("label_rule: a categorical rule needs both positive_values and negative_values.")
        both = set(self.positive_values) & (set(self.negative_values) | set(self.ignore_values))
        if both or set(self.negative_values) & set(self.ignore_values):
            raise ValueError(f"label_rule: value(s) {sorted(both)} listed under more than one class.")

    @classmethod
    def from_config(cls, config: LabelRule | Mapping[str, Any] | None) -> LabelRule:
        """A rule from a config mapping (unknown keys raise ``ValueError``), or the default for ``None``."""
        if isinstance(config, LabelRule):
            return config
        config = dict(config or {})
        unknown = set(config) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"label_rule: unknown key(s) {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}.")
        return cls(**config)

    @property
    def is_numeric(self) -> bool:
        return self.positive_min is not None

    def __call__(self, value: Any) -> int | None:
        """1, 0 or ``None`` (excluded); raises ``ValueError`` for a value the rule cannot place."""
        if self.is_numeric:
            number = float(value)  # ValueError for text
            if math.isnan(number):
                raise ValueError("empty")
            if number >= float(self.positive_min):  # type: ignore[arg-type]
                return 1
            return 0 if number <= float(self.negative_max) else None  # type: ignore[arg-type]
        text = _as_text(value)
        if text in self.positive_values:
            return 1
        if text in self.negative_values:
            return 0
        if text in self.ignore_values:
            return None
        raise ValueError(f"{text!r} is in none of positive_values, negative_values, ignore_values")


def _template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _check_columns(df: pd.DataFrame, needed: Mapping[str, str], csv_path: str) -> None:
    """``needed`` maps a column name to the setting that names it."""
    missing = {col: key for col, key in needed.items() if col not in df.columns}
    if missing:
        listed = "; ".join(f"'{col}' (from {key})" for col, key in missing.items())
        raise NoduleTableError(
            f"{csv_path}: unknown column(s) {listed}. The table has: {', '.join(map(str, df.columns))}. "
            "Fix the setting or the CSV header."
        )


def read_nodule_table(
    csv_path: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    id_column: str = LIDC_ID_TEMPLATE,
    patient_column: str = "patient_id",
    label_column: str | None = "Malignancy_value",
    label_rule: LabelRule | Mapping[str, Any] | None = None,
    image_column: str | None = None,
    image_template: str = "{id}.nii.gz",
    center_columns: Sequence[str] | None = None,
    require_labels: bool = True,
    check_files: bool = True,
) -> list[dict[str, Any]]:
    """Read a nodule CSV into a datalist ``[{"image", "label", "id", "patient", "row"[, "center"]}, ...]``.

    Args:
        csv_path: the CSV, one row per nodule (comma- or semicolon-separated; a UTF-8 byte-order mark is skipped).
        image_dir: folder that relative image paths are resolved against (default: the CSV's folder).
        id_column: a column holding a unique case id, or a template of columns such as
            ``"{patient_id}_R_{nodule_id}"`` (the LIDC default) or ``"{seriesuid}_{row}"`` (``row`` is
            the CSV line number).
        patient_column: column with the patient id (splits keep each patient's nodules together); may
            be absent when ``require_labels`` is False (each case is then its own patient).
        label_column: column the label rule reads; ``None`` (with ``require_labels=False``) for inference.
        label_rule: a :class:`LabelRule` or its config mapping; ``None`` gives the paper's rule.
        image_column: column holding each image path; when ``None`` the path is ``image_template``
            formatted with the row's columns, ``id`` and ``row``.
        image_template: file name template under ``image_dir`` (e.g. ``"{seriesuid}.mhd"`` for LUNA16).
        center_columns: three columns with the nodule centre in world mm (e.g. ``["coordX", "coordY",
            "coordZ"]``) for full CT volumes; kept as ``item["center"]``.
        require_labels: when False a missing ``label_column`` is allowed and items have no ``label``.
        check_files: check that every image exists.

    Returns:
        The items, in CSV order, rows excluded by the label rule left out (their count is logged).

    Raises:
        NoduleTableError: the CSV is missing or empty; a named column does not exist; a label,
            patient or centre cell is empty or unreadable; ids or images are listed twice; images
            are missing (all such rows listed).

    Example:
        >>> items = read_nodule_table("data/lidc_nodules_sample/nodules.csv",
        ...                           "data/lidc_nodules_sample/image")  # doctest: +SKIP
        >>> len(items), items[0]["id"], items[0]["label"]  # doctest: +SKIP
        (24, 'LIDC-IDRI-0001_R_1', 1)
    """
    csv_path = str(csv_path)
    if not os.path.isfile(csv_path):
        raise NoduleTableError(f"nodule table '{csv_path}' does not exist; set csv_path (or dataset_dir).")
    try:
        df = pd.read_csv(csv_path, dtype=object, keep_default_na=True, encoding="utf-8-sig", sep=_separator(csv_path))
    except Exception as e:  # empty file, bad encoding, ragged rows
        raise NoduleTableError(f"cannot read nodule table '{csv_path}': {e}") from e
    if df.empty:
        raise NoduleTableError(f"nodule table '{csv_path}' has no rows.")
    rule = LabelRule.from_config(label_rule)
    base = str(image_dir) if image_dir is not None else os.path.dirname(os.path.abspath(csv_path))
    is_template = "{" in id_column
    use_patient = require_labels or patient_column in df.columns  # unlabelled inference may lack patients
    needed: dict[str, str] = {patient_column: "patient_column"} if use_patient else {}
    for col in _template_fields(id_column) if is_template else [id_column]:
        if col != "row":
            needed[col] = "id_column"
    if image_column:
        needed[image_column] = "image_column"
    else:
        for col in _template_fields(image_template):
            if col not in ("id", "row"):
                needed[col] = "image_template"
    for col in center_columns or ():
        needed[col] = "center_columns"
    if center_columns is not None and len(center_columns) != 3:
        raise NoduleTableError(f"center_columns must name three columns (x, y, z), got {list(center_columns)}.")
    use_labels = label_column is not None and (require_labels or label_column in df.columns)
    if require_labels and label_column is None:
        raise NoduleTableError("label_column is None but labels are required (training / evaluation).")
    if use_labels:
        needed[label_column] = "label_column"  # type: ignore[index]
    _check_columns(df, needed, csv_path)

    items: list[dict[str, Any]] = []
    bad_cells: list[str] = []
    excluded = 0
    for index, row in df.iterrows():
        line = int(index) + 2  # type: ignore[call-overload]
        cells = {k: _as_text(v) for k, v in row.items() if not pd.isna(v)}
        cells["row"] = str(line)
        empty = [c for c in needed if c not in cells and c != label_column]
        if empty:
            bad_cells.append(f"line {line}: empty column(s) {empty}")
            continue
        case_id = id_column.format(**cells) if is_template else cells[id_column]
        item: dict[str, Any] = {"id": case_id, "patient": cells[patient_column] if use_patient else case_id,
                                "row": line}
        if use_labels:
            try:
                label = rule(row[label_column])
            except (TypeError, ValueError) as e:
                bad_cells.append(f"line {line} ({case_id}): {label_column}={row[label_column]!r} cannot be labelled ({e})")
                continue
            if label is None:
                excluded += 1
                continue
            item["label"] = label
        image = cells[image_column] if image_column else image_template.format(**cells, id=case_id)
        item["image"] = os.path.abspath(image if os.path.isabs(image) else os.path.join(base, image))
        if center_columns:
            try:
                item["center"] = [float(cells[c]) for c in center_columns]
            except ValueError:
                bad_cells.append(f"line {line} ({case_id}): centre {[cells[c] for c in center_columns]} is not numeric")
                continue
        items.append(item)
    if bad_cells:
        raise NoduleTableError(f"{csv_path}: {len(bad_cells)} row(s) cannot be used:\n{format_listing(bad_cells)}")
    if not items:
        raise NoduleTableError(f"{csv_path}: no row is left after the label rule {rule} on '{label_column}'.")
    _check_duplicates(items, csv_path, by_center=bool(center_columns))
    if check_files:
        missing = [f"line {it['row']} ({it['id']}): {it['image']}" for it in items if not os.path.exists(it["image"])]
        if missing:
            raise NoduleTableError(
                f"{csv_path}: {len(missing)} of {len(items)} row(s) name an image that does not exist "
                f"(image_dir '{base}', image_template '{image_template}'):\n{format_listing(missing)}"
            )
    if excluded:
        logger.info("%s: %d row(s) excluded by the label rule %s on '%s'.", csv_path, excluded, rule, label_column)
    n_pos = sum(it.get("label", 0) for it in items)
    logger.info("%s: %d nodules of %d patients (%d malignant).", csv_path, len(items),
                len({it["patient"] for it in items}), n_pos)
    return items


def _separator(csv_path: str) -> str:
    """``;`` when the header line has semicolons and no commas (spreadsheets in many European locales
    save CSV so), else ``,``. A byte-order mark is skipped."""
    try:
        with open(csv_path, encoding="utf-8-sig") as stream:
            header = stream.readline()
    except (OSError, UnicodeDecodeError):
        return ","  # pandas reports the problem with the file
    return ";" if ";" in header and "," not in header else ","


def _check_duplicates(items: Sequence[Mapping[str, Any]], csv_path: str, by_center: bool) -> None:
    by_id: dict[str, list[int]] = defaultdict(list)
    by_image: dict[tuple, list[int]] = defaultdict(list)
    for it in items:
        by_id[it["id"]].append(it["row"])
        key = (it["image"], tuple(it["center"])) if by_center else (it["image"],)
        by_image[key].append(it["row"])
    dup_ids = [f"id '{k}' on lines {v}" for k, v in by_id.items() if len(v) > 1]
    dup_images = [f"{k[0]}{' at ' + str(list(k[1])) if by_center else ''} on lines {v}"
                  for k, v in by_image.items() if len(v) > 1]
    if dup_ids or dup_images:
        raise NoduleTableError(
            f"{csv_path}: nodules listed twice (each must appear once, or the split and metrics count it twice):\n"
            f"{format_listing(dup_ids + dup_images)}"
        )


def inference_datalist(
    source: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    read_table: Callable[..., list[dict[str, Any]]] | None = None,
    **table_kwargs: Any,
) -> list[dict[str, Any]]:
    """Items to predict: a nodule CSV (labels optional, see :func:`read_nodule_table`) or a folder of
    nodule-centred crops (each file one case, its id the file name without extension).

    Args:
        source: a ``.csv`` file (any case of the suffix) or a folder of crops.
        image_dir: for a CSV, the folder of its images (default: the CSV's folder).
        read_table: the bundle's configured table reader (``read_nodule_table`` with its column
            settings, ``_mode_: callable``), called as ``read_table(source, image_dir, require_labels=False)``;
            default: :func:`read_nodule_table` with ``table_kwargs``.
        table_kwargs: column settings for the default reader.

    Raises:
        NoduleTableError: as :func:`read_nodule_table`.
        dagman_components.data.DataSourceError: for a folder without volumes.
    """
    source = str(source)
    if source.lower().endswith(".csv"):
        if read_table is None:
            return read_nodule_table(source, image_dir, require_labels=False, **table_kwargs)
        return read_table(source, image_dir, require_labels=False)
    items = build_datalist(source)
    for it in items:
        it["id"] = volume_stem(os.path.basename(os.path.normpath(it["image"])))
    return items
