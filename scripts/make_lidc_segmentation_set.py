#!/usr/bin/env python
# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Build the LIDC-IDRI nodule segmentation set: crops + masks -> a JSON datalist split by patient.

Reads a folder laid out as ``image/<patient>_R_<nodule>.nii.gz``, ``mask/<same name>`` and
``nodules.csv`` (the project's ``data/lidc_nodules_sample`` or the full ``lidc_nodules`` set), checks
every image/mask pair (readable, same grid, mask values 0/1), and writes a datalist whose
``training`` / ``validation`` (/ ``test``) lists never share a patient. Local files only.

Example:
    python scripts/make_lidc_segmentation_set.py --source ../shared/data/lidc_nodules \\
        --output /tmp/lidc_seg/datalist.json --val_fraction 0.2 --seed 0
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
from collections import Counter

from dagman_components.data import DataSourceError
from dagman_components.segmentation import (
    build_segmentation_datalist,
    split_by_group,
    validate_image_label_pairs,
    volume_stem,
    write_datalist,
)

logger = logging.getLogger("make_lidc_segmentation_set")

DEFAULT_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "lidc_nodules_sample")
LABELS = {"0": "background", "1": "nodule"}
CSV_COLUMNS = ("patient_id", "nodule_id")


def read_nodule_table(csv_path: str) -> dict[str, dict]:
    """Map ``<patient>_R_<nodule>`` to the row's patient, nodule id, diameter and malignancy.

    Raises:
        DataSourceError: when the file lacks the ``patient_id`` / ``nodule_id`` columns.
    """
    with open(csv_path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataSourceError(f"'{csv_path}' lacks the column(s) {missing}; expected the LIDC nodules.csv.")
        table = {}
        for row in reader:
            name = f"{row['patient_id']}_R_{row['nodule_id']}"
            entry = {"patient_id": row["patient_id"], "nodule_id": int(row["nodule_id"])}
            for column, cast in (("diameter_mm", float), ("Malignancy_value", int)):
                if row.get(column, "") != "":
                    entry[column] = cast(float(row[column]))
            table[name] = entry
    return table


def build(source: str, val_fraction: float, test_fraction: float, seed: int, check: bool) -> dict:
    """The datalist content: labels, split settings and the patient-disjoint lists."""
    items = build_segmentation_datalist(source)
    csv_path = os.path.join(source, "nodules.csv")
    table = read_nodule_table(csv_path) if os.path.isfile(csv_path) else {}
    if not table:
        logger.warning("no nodules.csv in '%s': patients are taken from the file names (<patient>_R_<nodule>).", source)
    for item in items:
        name = volume_stem(os.path.basename(item["image"]))
        item.update(table.get(name, {"patient_id": name.split("_R_")[0]}))
    if check:
        validate_image_label_pairs(items, num_classes=2)
    rest, test = split_by_group(items, test_fraction, group_key="patient_id", seed=seed) if test_fraction else (items, [])
    train, val = split_by_group(rest, val_fraction / (1.0 - test_fraction), group_key="patient_id", seed=seed + 1)
    content = {
        "name": "LIDC-IDRI nodule segmentation (crops)",
        "description": "Nodule-centred CT crops (HU) with binary masks; lists are patient-disjoint.",
        "reference": "Armato SG III et al., Data From LIDC-IDRI, TCIA 2015, doi:10.7937/K9/TCIA.2015.LO9QL9SX",
        "licence": "CC BY 3.0 (LIDC-IDRI)",
        "source": os.path.abspath(source),
        "labels": LABELS,
        "split": {"group_key": "patient_id", "seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction},
        "training": train,
        "validation": val,
    }
    if test:
        content["test"] = test
    return content


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=DEFAULT_SOURCE, help="folder with image/, mask/ and nodules.csv")
    parser.add_argument("--output", required=True, help="JSON datalist to write")
    parser.add_argument("--val_fraction", type=float, default=0.2, help="share of patients for validation")
    parser.add_argument("--test_fraction", type=float, default=0.0, help="share of patients for a test list")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient split")
    parser.add_argument("--absolute", action="store_true", help="write absolute paths (default: relative to the JSON)")
    parser.add_argument("--no_check", action="store_true", help="skip the image/mask pair checks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not 0.0 <= args.test_fraction < 1.0 or not 0.0 <= args.val_fraction < 1.0 - args.test_fraction:
        parser.error("need 0 <= test_fraction < 1 and 0 <= val_fraction < 1 - test_fraction.")
    try:
        content = build(os.path.abspath(args.source), args.val_fraction, args.test_fraction, args.seed,
                        not args.no_check)
    except DataSourceError as err:
        logger.error("%s", err)
        return 1
    if not args.absolute:
        content["source"] = os.path.relpath(content["source"], os.path.dirname(os.path.abspath(args.output)))
    write_datalist(args.output, content, relative=not args.absolute)
    for part in ("training", "validation", "test"):
        if part in content:
            patients = Counter(item["patient_id"] for item in content[part])
            logger.info("%s: %d nodules of %d patients", part, len(content[part]), len(patients))
    logger.info("wrote %s", os.path.abspath(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
