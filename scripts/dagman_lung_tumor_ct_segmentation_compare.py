#!/usr/bin/env python
# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Compare per-case Dice of segmentation runs (e.g. random vs DAGMaN-initialised encoder): PNG + JSON.

Reads the ``val_mean_dice_raw.csv`` that ``configs/evaluate.yaml`` writes (one row per case), pairs the
cases by file name, and reports each run's mean / median Dice and, for every run against the first,
the mean paired difference with a 95 % percentile-bootstrap interval that resamples patients (the
``LIDC-IDRI-NNNN`` part of the file name, else the file) so that nodules of one patient move together.

Example:
    python scripts/dagman_lung_tumor_ct_segmentation_compare.py --run random=/tmp/ft_random/eval \\
        --run dagman=/tmp/ft_dagman/eval --output /tmp/compare
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import sys

import numpy as np

from dagman_components.atomic import atomic_write_png, atomic_write_text

logger = logging.getLogger("dagman_lung_tumor_ct_segmentation_compare")
_PATIENT = re.compile(r"(LIDC-IDRI-\d+)")


def read_dice(eval_dir: str, metric: str = "val_mean_dice") -> dict[str, float]:
    """File name -> Dice from ``<eval_dir>/<metric>_raw.csv``.

    Raises:
        FileNotFoundError: naming the CSV when it is missing.
    """
    path = os.path.join(eval_dir, f"{metric}_raw.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"'{path}' does not exist; run configs/evaluate.yaml with that bundle_root first.")
    with open(path, newline="", encoding="utf-8") as stream:
        return {os.path.basename(row["filename"]): float(row["mean"]) for row in csv.DictReader(stream)}


def patient_bootstrap(diff: np.ndarray, groups: list[str], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of ``diff``, resampling whole groups with replacement."""
    rng = np.random.default_rng(seed)
    names = sorted(set(groups))
    index = {g: np.flatnonzero(np.asarray(groups) == g) for g in names}
    means = [np.concatenate([index[names[i]] for i in rng.integers(0, len(names), len(names))]) for _ in range(n)]
    values = np.array([diff[m].mean() for m in means])
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def compare(runs: dict[str, dict[str, float]]) -> tuple[dict, dict[str, np.ndarray]]:
    """Summary of every run and paired differences against the first run (common cases only)."""
    names = list(runs)
    cases = sorted(set.intersection(*(set(r) for r in runs.values())))
    if not cases:
        raise ValueError("the runs share no case (file names differ).")
    groups = [(m.group(1) if (m := _PATIENT.search(c)) else c) for c in cases]
    values = {n: np.array([runs[n][c] for c in cases]) for n in names}
    out = {"cases": len(cases), "patients": len(set(groups)), "runs": {}, "paired_vs_" + names[0]: {}}
    for n in names:
        v = values[n]
        out["runs"][n] = {"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()),
                          "zero_dice_cases": int((v == 0).sum())}
    for n in names[1:]:
        diff = values[n] - values[names[0]]
        low, high = patient_bootstrap(diff, groups)
        out["paired_vs_" + names[0]][n] = {"mean_difference": float(diff.mean()), "ci95_patient_bootstrap": [low, high],
                                           "per_case_correlation": float(np.corrcoef(values[n], values[names[0]])[0, 1])}
    return out, values


def plot(values: dict[str, np.ndarray], path: str, title: str) -> None:

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(values)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=120)
    axes[0].boxplot([values[n] for n in names], tick_labels=names, showmeans=True)
    for i, n in enumerate(names, start=1):
        axes[0].scatter(np.full(len(values[n]), i) + np.random.default_rng(i).uniform(-0.12, 0.12, len(values[n])),
                        values[n], s=5, alpha=0.4)
    axes[0].set(ylabel="Dice (nodule, native grid)", ylim=(0, 1), title=title)
    ref = names[0]
    for n in names[1:]:
        axes[1].scatter(values[ref], values[n], s=8, alpha=0.6, label=n)
    axes[1].plot([0, 1], [0, 1], color="grey", lw=0.8)
    axes[1].set(xlabel=f"Dice, {ref}", ylabel="Dice, other run", xlim=(0, 1), ylim=(0, 1), title="per case")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write_png(fig, path, close=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, help="name=eval_dir; the first is the reference")
    parser.add_argument("--output", required=True, help="prefix of <output>.png and <output>.json")
    parser.add_argument("--title", default="LIDC nodule crops, test patients")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    runs = {}
    for spec in args.run:
        if "=" not in spec:
            parser.error(f"--run '{spec}' must be name=eval_dir.")
        name, folder = spec.split("=", 1)
        runs[name] = read_dice(folder)
    summary, values = compare(runs)
    plot(values, args.output + ".png", args.title)
    atomic_write_text(json.dumps(summary, indent=2) + "\n", args.output + ".json")
    logger.info("%s", json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
