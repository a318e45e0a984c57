#!/usr/bin/env python
# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Time one linear-probe fold of the classification bundle with and without cached features.

Both arms run the bundle's ``configs/train.yaml`` (``--mode linear_probe``) and then
``configs/evaluate.yaml`` on the same fold, weights and settings; they differ only in
``cache_features``: ``false`` runs the frozen encoder on every crop in every epoch, ``true`` embeds
each crop once (``feature_views`` augmented views when ``augment`` is on) and trains the head on the
cached features. The arms alternate (uncached, cached, uncached, ...) so that a busy machine slows
both alike. The last line of the output is one JSON object: seconds of each run, the median time
ratio, and each run's validation AUC (the model-selection figure) and test AUC.

Example (the figures of the classification README; 2 CPU cores)::

    python scripts/benchmark_linear_probe.py --dataset_dir /data/lidc_nodules \\
        --pretrained_path bundles/dagman_ct_pretraining/models/model.pt --work_dir /tmp/lp_bench
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "dagman_lung_nodule_ct_classification"
logger = logging.getLogger("benchmark_linear_probe")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_dir", required=True, help="folder with nodules.csv and image/ (bundle's dataset_dir)")
    p.add_argument("--pretrained_path", required=True, help="DAGMaN encoder weights (model.pt beside model_card.json)")
    p.add_argument("--work_dir", type=Path, required=True, help="one bundle_root per run is made here")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="rounds of runs, one per arm each")
    p.add_argument("--arms", nargs="+", default=["uncached", "cached"], choices=("uncached", "cached"),
                   help="the arms of each round, in order")
    p.add_argument("--n_boot", type=int, default=200, help="bootstrap resamples of the test report")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="further train.yaml overrides (YAML values), e.g. augment=false max_epochs=30")
    return p.parse_args(argv)


def run_configs(files: Sequence[str], overrides: dict[str, Any]) -> None:
    """``monai.bundle run`` of the bundle's ``files`` with ``overrides``, in this process."""
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f) for f in files])
    parser.update(overrides)
    for section in ("initialize", "run", "finalize"):
        parser.get_parsed_content(section)


def run_fold(overrides: dict[str, Any], cached: bool, bundle_root: Path, n_boot: int) -> dict[str, Any]:
    """Train (with or without cached features) then evaluate one fold in ``bundle_root``; returns the seconds
    of training and both AUCs."""
    overrides = {**overrides, "bundle_root": str(bundle_root), "ckpt_dir": str(bundle_root / "models"),
                 "output_dir": str(bundle_root / "eval")}
    (bundle_root / "models").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run_configs(["train.yaml"], {**overrides, "cache_features": cached})
    train_seconds = time.perf_counter() - t0
    run_configs(["train.yaml", "evaluate.yaml"], {**overrides, "n_boot": n_boot})
    threshold = json.loads((bundle_root / "models" / "threshold.json").read_text())
    test = json.loads((bundle_root / "eval" / "test_metrics.json").read_text())
    return {"train_seconds": round(train_seconds, 1), "val_auc": threshold["val_auc"], "epoch": threshold["epoch"],
            "test_auc": test["auc"]["value"], "test_auc_ci95": test["auc"]["ci95"]}


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    overrides: dict[str, Any] = {"dataset_dir": os.path.abspath(args.dataset_dir), "mode": "linear_probe",
                                 "pretrained_path": os.path.abspath(args.pretrained_path), "fold": args.fold}
    for pair in args.set:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        overrides[key] = yaml.safe_load(value)
    runs: dict[str, list[dict[str, Any]]] = {"uncached": [], "cached": []}
    for r in range(args.repeats):
        for arm in args.arms:
            root = args.work_dir / f"{arm}_{r}"
            if root.exists():
                raise SystemExit(f"{root} exists: give an empty --work_dir (each run needs a fresh bundle_root).")
            run = run_fold(overrides, arm == "cached", root, args.n_boot)
            logger.info("%s %d: %.1f s, val AUC %.3f, test AUC %.3f", arm, r, run["train_seconds"], run["val_auc"],
                        run["test_auc"])
            runs[arm].append(run)
    ratios = [u["train_seconds"] / c["train_seconds"] for u, c in zip(runs["uncached"], runs["cached"])]
    result = {"overrides": {k: v for k, v in overrides.items() if k != "dataset_dir"}, "runs": runs,
              "speedup_median": round(statistics.median(ratios), 2) if ratios else None,
              "speedups": [round(x, 2) for x in ratios]}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
