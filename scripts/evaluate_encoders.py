#!/usr/bin/env python
# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Did pretraining help? One paired evaluation of encoders on a labelled nodule folder. Resumable.

Every encoder is scored on the same patient-grouped folds and seeds by the project's linear probe
(at each few-shot share of the labels), a kNN and, with ``--protocols ... finetune``, the
classification bundle's fine-tuning. The table gives each encoder's test AUC (mean over seeds of the
pooled out-of-fold AUC) and its paired difference to the FIRST encoder with a patient-bootstrap 95 %
interval: ``comparison.csv``, ``comparison.md`` and ``comparison.png`` in ``--output``.
Finished cells are kept in ``--output/cells.json``; rerunning the same command skips them.

Example::

    python scripts/evaluate_encoders.py --nodules /data/lidc_heldout --output /scratch/eval \\
        --encoder random=random:/scratch/recipe/models/model.pt --encoder recipe=/scratch/recipe/models/model.pt \\
        --seeds 0 1 2 --folds 5
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "dagman_lung_nodule_ct_classification"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodules", required=True, help="labelled folder: nodules.csv + image/ (LIDC layout)")
    p.add_argument("--encoder", action="append", required=True, metavar="NAME=PATH",
                   help="NAME=<model.pt> or NAME=random:<model.pt or card> (random init, that card's settings); "
                        "repeat; the first is the reference of the differences")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--folds", type=int, default=5, help="patient-grouped stratified folds per seed")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0],
                   help="few-shot shares of the training labels for the linear probe")
    p.add_argument("--protocols", nargs="+", default=["lp", "knn"], choices=["lp", "knn", "finetune"])
    p.add_argument("--token", default="cls", choices=["cls", "global"])
    p.add_argument("--n_neighbors", type=int, default=10)
    p.add_argument("--finetune_set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="classification bundle overrides for fine-tuning (YAML values), e.g. max_epochs=10")
    p.add_argument("--n_boot", type=int, default=1000)
    p.add_argument("--max_minutes", type=float, default=0.0, help="start no new cell after this long (0: no limit)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from dagman_components.classification import encoder_comparison as ec

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        encoders = [ec.parse_encoder_spec(e) for e in args.encoder]
        overrides = {}
        for pair in args.finetune_set:
            key, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"--finetune_set expects KEY=VALUE, got {pair!r}.")
            overrides[key] = yaml.safe_load(value)
        if len({e.name for e in encoders}) < len(encoders):
            raise ValueError("--encoder names must differ.")
        args.output.mkdir(parents=True, exist_ok=True)
        nodules = ec.load_nodule_set(args.nodules, cache=args.output / "nodules.pt")
        finetune = ec.BundleFinetune(BUNDLE, args.nodules, args.output / "finetune", args.folds, overrides)
        comparison = ec.EncoderComparison(
            nodules, encoders, args.output / "cells.json", seeds=args.seeds, n_folds=args.folds,
            fractions=args.fractions, protocols=args.protocols, token=args.token, n_neighbors=args.n_neighbors,
            finetune=finetune, settings={"finetune": overrides},
            n_boot=args.n_boot)
    except (ValueError, FileNotFoundError) as e:
        print(f"evaluate_encoders: {e}", file=sys.stderr)
        return 2
    comparison.run(args.max_minutes)
    rows = comparison.table()
    if rows:
        paths = ec.write_comparison(rows, args.output, encoders[0].name)
        print(paths["md"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
