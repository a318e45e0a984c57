#!/usr/bin/env python
# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Prepare a segmentation datalist from local files: MSD Task06_Lung, or any image/label folder pair.

Accepted sources (nothing is downloaded):

- an MSD task folder (e.g. ``Task06_Lung/`` with ``dataset.json``, ``imagesTr/``, ``labelsTr/``,
  ``imagesTs/``): the ``training`` list of its ``dataset.json``, plus its ``test`` images;
- a dataset folder holding one known image/label subfolder pair (``imagesTr``/``labelsTr``,
  ``images``/``labels``, ``image``/``label``, ``image``/``mask``, ``images``/``masks``);
- ``--images DIR --labels DIR``: two folders matched by file name (``case_0000.nii.gz`` matches ``case.nii.gz``);
- ``--json FILE``: an existing JSON datalist (its ``training`` list is re-split).

The labelled cases are checked (readable, same grid, values within ``--num_classes``) and split
into ``training`` / ``validation``; with a ``--group_key`` present in the items (e.g. a patient id),
groups never straddle the split. The JSON is written atomically, with paths relative to it.

Example:
    python scripts/prepare_segmentation_datalist.py --source /data/Task06_Lung --output /data/task06.json
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dagman_components.data import DataSourceError, build_datalist
from dagman_components.segmentation import (
    build_segmentation_datalist,
    split_by_group,
    validate_image_label_pairs,
    write_datalist,
)

logger = logging.getLogger("prepare_segmentation_datalist")


def collect(source: str | None, images: str | None, labels: str | None, json_path: str | None) -> tuple[list, list, dict]:
    """Labelled items, unlabelled test items, and the label names (from ``dataset.json`` when present)."""
    import json

    if json_path is None and source is not None and os.path.isfile(os.path.join(source, "dataset.json")):
        json_path = os.path.join(source, "dataset.json")
    if json_path is not None:
        with open(json_path, encoding="utf-8") as stream:
            meta = json.load(stream)
        labelled = build_segmentation_datalist(json_path, json_key="training")
        test = build_datalist(json_path, json_key="test") if meta.get("test") else []
        return labelled, test, dict(meta.get("labels", {}))
    if images is not None:
        if labels is None:
            raise DataSourceError("--images needs --labels (the folder of label maps matched by file name).")
        return build_segmentation_datalist(images, label_dir=labels), [], {}
    if source is None:
        raise DataSourceError("give --source, --json, or --images with --labels.")
    labelled = build_segmentation_datalist(source)
    test_dir = os.path.join(source, "imagesTs")
    test = build_datalist(test_dir) if os.path.isdir(test_dir) else []
    return labelled, test, {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", help="MSD task folder or a dataset folder with image/label subfolders")
    parser.add_argument("--images", help="folder of images (with --labels)")
    parser.add_argument("--labels", help="folder of label maps (with --images)")
    parser.add_argument("--json", dest="json_path", help="an existing JSON datalist (its 'training' list)")
    parser.add_argument("--output", required=True, help="JSON datalist to write")
    parser.add_argument("--val_fraction", type=float, default=0.2, help="share of groups (cases) for validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    parser.add_argument("--group_key", default="patient_id", help="item key that keeps cases of one group together")
    parser.add_argument("--num_classes", type=int, default=2, help="classes including background (label values)")
    parser.add_argument("--absolute", action="store_true", help="write absolute paths (default: relative to the JSON)")
    parser.add_argument("--no_check", action="store_true", help="skip the image/label pair checks (faster)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not 0.0 <= args.val_fraction < 1.0:
        parser.error("--val_fraction must be in [0, 1).")
    try:
        labelled, test, label_names = collect(args.source, args.images, args.labels, args.json_path)
        if not args.no_check:
            validate_image_label_pairs(labelled, num_classes=args.num_classes)
    except DataSourceError as err:
        logger.error("%s", err)
        return 1
    train, val = split_by_group(labelled, args.val_fraction, group_key=args.group_key, seed=args.seed)
    content = {
        "labels": label_names or {"0": "background", "1": "tumour"},
        "split": {"group_key": args.group_key, "seed": args.seed, "val_fraction": args.val_fraction},
        "training": train,
        "validation": val,
    }
    if test:
        content["test"] = test
    write_datalist(args.output, content, relative=not args.absolute)
    logger.info("wrote %s: %d training, %d validation, %d test", os.path.abspath(args.output), len(train), len(val),
                len(test))
    return 0


if __name__ == "__main__":
    sys.exit(main())
