#!/usr/bin/env python
# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Split a nodule folder (LIDC layout: nodules.csv, image/, mask/) by patient into an unlabelled
pretraining datalist and a held-out labelled folder for probing, so that no probed patient is seen
in pretraining.

Writes ``<output>/pretrain_datalist.json`` (``{"training": [{"image": ...}, ...]}``, absolute paths)
and ``<output>/heldout/`` (``nodules.csv`` with the held-out rows, ``image/`` and ``mask/`` as
symbolic links to the source files, and the source README with its licence). The split is a seeded
random choice of ``--heldout_fraction`` of the sorted patient ids.

Example (the split behind the small-budget recipe and docs/results.md)::

    python scripts/split_lidc_by_patient.py --nodules ../shared/data/lidc_nodules --output /scratch/lidc_split
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dagman_components.atomic import atomic_write_text


def split_patients(patients: Sequence[str], heldout_fraction: float, seed: int) -> set[str]:
    """The held-out patients: ``int(len * fraction)`` of the sorted unique ids, chosen with ``seed``.

    Raises:
        ValueError: for a fraction outside (0, 1) or a split that leaves one side empty.
    """
    unique = sorted(set(patients))
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"--heldout_fraction must be in (0, 1), got {heldout_fraction}.")
    n = int(len(unique) * heldout_fraction)
    if n < 1 or n >= len(unique):
        raise ValueError(f"{len(unique)} patient(s) cannot be split with --heldout_fraction {heldout_fraction}.")
    rng = np.random.default_rng(seed)
    return set(rng.choice(unique, size=n, replace=False).tolist())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodules", required=True, type=Path, help="folder with nodules.csv, image/ and mask/")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--heldout_fraction", type=float, default=1 / 3)
    p.add_argument("--seed", type=int, default=20261202)
    p.add_argument("--patient_column", default="patient_id")
    p.add_argument("--name_template", default="{patient_id}_R_{nodule_id}.nii.gz")
    args = p.parse_args(argv)
    csv = args.nodules / "nodules.csv"
    if not csv.is_file():
        print(f"error: {csv} does not exist (--nodules must hold nodules.csv, image/ and mask/)", file=sys.stderr)
        return 2
    table = pd.read_csv(csv)
    held = split_patients(table[args.patient_column].astype(str).tolist(), args.heldout_fraction, args.seed)
    is_held = table[args.patient_column].astype(str).isin(held)
    names = [args.name_template.format(**row) for row in table.to_dict("records")]
    missing = [n for n in names if not (args.nodules / "image" / n).is_file()]
    if missing:
        print(f"error: {len(missing)} image(s) listed in {csv} are missing under image/, e.g. {missing[:3]}",
              file=sys.stderr)
        return 2
    out = args.output
    held_dir = out / "heldout"
    for sub in ("image", "mask"):
        (held_dir / sub).mkdir(parents=True, exist_ok=True)
    for name, h in zip(names, is_held):
        for sub in ("image", "mask") if h else ():
            src, dst = (args.nodules / sub / name).resolve(), held_dir / sub / name
            if src.is_file() and not dst.exists():
                os.symlink(src, dst)
    atomic_write_text(table[is_held].to_csv(index=False), held_dir / "nodules.csv")
    if (args.nodules / "README.md").is_file():
        shutil.copyfile(args.nodules / "README.md", held_dir / "README.md")  # the licence travels with the data
    train = [{"image": str((args.nodules / "image" / n).resolve())} for n, h in zip(names, is_held) if not h]
    atomic_write_text(json.dumps({"training": train}, indent=1), out / "pretrain_datalist.json")
    print(f"{len(train)} pretraining crops of {table[~is_held][args.patient_column].nunique()} patients -> "
          f"{out / 'pretrain_datalist.json'}; {int(is_held.sum())} held-out nodules of {len(held)} patients -> {held_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
