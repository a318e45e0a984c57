#!/usr/bin/env python
# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Cross-validate the nodule classification bundle: folds x few-shot fractions x (linear probe, fine-tune)
x encoder initialisations, into one JSON of all figures plus ROC-curve PNGs. Resumable.

Every run is the bundle itself (``configs/train.yaml`` then ``configs/evaluate.yaml``, in this
process, with the fold / fraction / mode / weights as overrides). Linear probing runs
``--mode linear_probe``: the bundle embeds each crop once with the frozen encoder and fits the project's
linear probe on the cached features (``probe_Cs``; one C by default). For paired comparisons of encoders
with confidence intervals of the difference, use ``scripts/evaluate_encoders.py``.

Every finished run is written to the JSON at once (atomically); rerunning the same command skips
finished runs, so a run killed by ``--max_minutes`` or by hand continues where it stopped. The
settings (with a hash of the bundle's train / evaluate configs) are stored in the JSON and a rerun
with other settings is refused; cached features are keyed by the same settings.

Example (the evidence of the bundle README; 2 CPU cores)::

    OMP_NUM_THREADS=1 python scripts/run_nodule_cv.py --dataset_dir /data/lidc_nodules \\
        --work_dir /scratch/nodule_cv --init random=random --init dagman=/scratch/pre/models/model.pt \\
        --set embed_dim=24 "num_heads=[3,6,12,24]" --ft_epochs 6 --max_minutes 14
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from monai.bundle import ConfigParser

import dagman_components.classification as nc
from dagman_components.atomic import atomic_write_text
from dagman_components.runtime.progress import progress

logger = logging.getLogger("run_nodule_cv")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO / "bundles" / "dagman_lung_nodule_ct_classification"
MODES = ("linear_probe", "finetune")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="the classification bundle folder")
    p.add_argument("--dataset_dir", required=True, help="folder with nodules.csv and image/ (bundle's dataset_dir)")
    p.add_argument("--work_dir", type=Path, required=True, help="run folders, feature caches and the results")
    p.add_argument("--init", action="append", required=True, metavar="NAME=PATH",
                   help="an encoder initialisation: NAME=random or NAME=<model.pt>; repeat to compare")
    p.add_argument("--folds", type=int, nargs="+", help="folds to run (default: all n_folds of the config)")
    p.add_argument("--fractions", type=float, nargs="+", default=list(nc.FEW_SHOT_FRACTIONS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every run (YAML values), e.g. embed_dim=24 'num_heads=[3,6,12,24]'")
    p.add_argument("--ft_epochs", type=int, default=6, help="fine-tuning epochs (bundle max_epochs)")
    p.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples per test report")
    p.add_argument("--max_minutes", type=float, default=0, help="start no new run after this (0: no limit)")
    p.add_argument("--output", type=Path, help="results JSON (default: <work_dir>/nodule_cv_results.json)")
    return p.parse_args(argv)


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def parse_inits(specs: Sequence[str]) -> dict[str, str]:
    inits = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        if not name or not path:
            raise SystemExit(f"--init expects NAME=PATH or NAME=random, got {spec!r}")
        if path != "random" and not os.path.isfile(path):
            raise SystemExit(f"--init {name}: weights '{path}' do not exist")
        inits[name] = path
    return inits


def make_parser(bundle: Path, files: Sequence[str], overrides: Mapping[str, Any]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / f) for f in files])
    parser.update(dict(overrides))
    return parser


def run_expressions(parser: ConfigParser, *ids: str) -> None:
    for i in ids:
        if i in parser:
            parser.get_parsed_content(i)


def read_predictions(csv_path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    import pandas as pd

    df = pd.read_csv(csv_path, dtype={"id": str})
    return df["id"].tolist(), df["probability_malignant"].to_numpy(float), df["label"].to_numpy(int)


# ------------------------------------------------------------------------------------- fine-tuning (bundle)


def persistent_datasets(cache_dir: Path) -> dict[str, Any]:
    """Overrides that keep the preprocessed crops on disk (MONAI ``PersistentDataset``), shared by every run:
    train, validation and test use the same deterministic preprocessing, so one cache serves them all."""
    return {f"{section}#dataset": {"_target_": "PersistentDataset", "data": f"@{section}#datalist",
                                   "transform": f"@{section}#preprocessing", "cache_dir": str(cache_dir)}
            for section in ("train", "validate")}


def bundle_run(bundle: Path, overrides: Mapping[str, Any], run_dir: Path, n_boot: int) -> dict:
    """Train then evaluate one fold with the bundle's configs; returns the test report plus predictions."""
    paths = {"bundle_root": str(run_dir), "ckpt_dir": str(run_dir / "models"), "output_dir": str(run_dir / "eval")}
    (run_dir / "models").mkdir(parents=True, exist_ok=True)
    train = make_parser(bundle, ["train.yaml"], {**overrides, **paths})
    run_expressions(train, "initialize", "run", "finalize")
    del train
    evaluate = make_parser(bundle, ["train.yaml", "evaluate.yaml"], {**overrides, **paths, "n_boot": n_boot})
    run_expressions(evaluate, "initialize", "run", "finalize")
    report = json.loads((run_dir / "eval" / "test_metrics.json").read_text())
    ids, scores, labels = read_predictions(run_dir / "eval" / "test_predictions.csv")
    threshold = json.loads((run_dir / "models" / "threshold.json").read_text())
    return {"test": report, "val": {k: threshold[k] for k in ("val_auc", "epoch", "n_val")},
            "predictions": {"id": ids, "score": scores.tolist(), "label": labels.tolist()}}


# ------------------------------------------------------------------------------------------------ driver


def summarise(runs: Mapping[str, dict]) -> dict:
    """Per (init, mode, fraction): mean / std over folds, and the AUC of the pooled out-of-fold predictions."""
    groups: dict[str, list[dict]] = {}
    for key, run in runs.items():
        init, mode, fraction, _ = key.split("|")
        groups.setdefault(f"{init}|{mode}|{fraction}", []).append(run)
    out = {}
    for key, group in sorted(groups.items()):
        pooled_s = np.concatenate([r["predictions"]["score"] for r in group])
        pooled_y = np.concatenate([r["predictions"]["label"] for r in group])
        out[key] = {"folds": len(group), **nc.summarise_folds([r["test"] for r in group]),
                    "pooled_auc": nc.roc_auc(pooled_s, pooled_y) if len(set(pooled_y.tolist())) == 2 else None}
    return out


def plot_rocs(runs: Mapping[str, dict], out_dir: Path) -> list[str]:
    """One PNG per (mode, fraction): the pooled out-of-fold ROC of each initialisation."""
    panels: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for key, run in runs.items():
        init, mode, fraction, _ = key.split("|")
        panels.setdefault((mode, fraction), {}).setdefault(init, []).append(run)
    written = []
    for (mode, fraction), by_init in sorted(panels.items()):
        curves = {}
        for init, group in sorted(by_init.items()):
            s = np.concatenate([r["predictions"]["score"] for r in group])
            y = np.concatenate([r["predictions"]["label"] for r in group])
            fpr, tpr, _ = nc.roc_curve(s, y)
            curves[f"{init} ({len(group)} folds)"] = (fpr, tpr, nc.roc_auc(s, y))
        path = out_dir / f"roc_{mode}_{float(fraction):g}.png"
        nc.plot_roc_curves(curves, path, title=f"{mode}, {float(fraction):g} of training cases (pooled test folds)")
        written.append(str(path))
    return written


def summary_markdown(results: Mapping[str, Any]) -> str:
    """A markdown table of the summary (mean +/- std over folds) and of every run (value [95 % CI])."""
    lines = ["| mode | fraction | init | folds | AUC | sensitivity | specificity | pooled AUC |",
             "|---|---|---|---|---|---|---|---|"]
    for key, s in sorted(results.get("summary", {}).items(), key=lambda kv: (kv[0].split("|")[1], kv[0].split("|")[2],
                                                                             kv[0].split("|")[0])):
        init, mode, fraction = key.split("|")
        cells = [f"{s[m]['mean']:.3f} +/- {s[m]['std']:.3f}" for m in ("auc", "sensitivity", "specificity")]
        pooled = f"{s['pooled_auc']:.3f}" if s["pooled_auc"] is not None else "-"
        lines.append(f"| {mode} | {float(fraction):g} | {init} | {s['folds']} | " + " | ".join(cells) + f" | {pooled} |")
    lines += ["", "| run (init, mode, fraction, fold) | test AUC [95 % CI] | sensitivity | specificity | best val AUC "
              "(epoch) | minutes |", "|---|---|---|---|---|---|"]
    for key, run in sorted(results.get("runs", {}).items()):
        t = run["test"]
        ci = lambda m: f"{t[m]['value']:.3f} [{t[m]['ci95'][0]:.3f}, {t[m]['ci95'][1]:.3f}]"  # noqa: E731
        lines.append(f"| {key.replace('|', ', ')} | {ci('auc')} | {ci('sensitivity')} | {ci('specificity')} | "
                     f"{run['val']['val_auc']:.3f} ({run['val']['epoch']}) | {run.get('minutes', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    start = time.monotonic()
    inits = parse_inits(args.init)
    overrides = {"dataset_dir": os.path.abspath(args.dataset_dir), "num_workers": 0, **parse_overrides(args.set)}
    output = args.output or args.work_dir / "nodule_cv_results.json"
    configs = {f: hashlib.sha256((args.bundle / "configs" / f).read_bytes()).hexdigest()[:16]
               for f in ("train.yaml", "evaluate.yaml")}
    settings = {"bundle": str(args.bundle.resolve()), "config_sha256": configs, "overrides": overrides, "inits": inits,
                "ft_epochs": args.ft_epochs, "n_boot": args.n_boot}
    results = json.loads(output.read_text()) if output.is_file() else {"settings": settings, "runs": {}}
    if results["settings"] != settings:
        raise SystemExit(f"{output} holds results of other settings ({results['settings']}); "
                         "use another --output / --work_dir or move it away.")
    n_folds = int(make_parser(args.bundle, ["train.yaml"], overrides).get_parsed_content("n_folds"))
    folds = args.folds if args.folds is not None else list(range(n_folds))
    plan = [(i, m, f, k) for m in args.modes for i in inits for f in args.fractions for k in folds]
    todo = [p for p in plan if "|".join(map(str, p)) not in results["runs"]]
    logger.info("%d runs planned, %d done, %d to do", len(plan), len(plan) - len(todo), len(todo))
    for n, (init, mode, fraction, fold) in enumerate(progress(todo, "CV runs", unit="run"), start=1):
        if args.max_minutes and time.monotonic() - start > 60 * args.max_minutes:
            logger.warning("--max_minutes %.0f reached: %d run(s) left; rerun the same command to continue",
                           args.max_minutes, len(todo) - n + 1)
            break
        key = "|".join(map(str, (init, mode, fraction, fold)))
        logger.info("run %d/%d: %s", n, len(todo), key)
        t0 = time.monotonic()
        weights = None if inits[init] == "random" else inits[init]
        run_over = {**overrides, "fold": fold, "few_shot_fraction": fraction, "pretrained_path": weights}
        extra = {"max_epochs": args.ft_epochs} if mode == "finetune" else {}
        run_dir = args.work_dir / "runs" / key.replace("|", "_")
        cache = persistent_datasets(args.work_dir / "preprocessed")
        run = bundle_run(args.bundle, {**run_over, **extra, **cache, "mode": mode}, run_dir, args.n_boot)
        run["minutes"] = round((time.monotonic() - t0) / 60, 2)
        results["runs"][key] = run
        results["summary"] = summarise(results["runs"])
        results["roc_pngs"] = plot_rocs(results["runs"], output.parent)
        atomic_write_text(json.dumps(results, indent=1) + "\n", output)
        atomic_write_text(summary_markdown(results), output.with_suffix(".md"))
        t = run["test"]
        logger.info("%s: test AUC %.3f [%.3f, %.3f] (%.1f min)", key, t["auc"]["value"], *t["auc"]["ci95"],
                    run["minutes"])
    for key, s in results.get("summary", {}).items():
        logger.info("%-40s AUC %.3f +/- %.3f over %d folds (pooled %.3f)", key, s["auc"]["mean"], s["auc"]["std"],
                    s["folds"], s["pooled_auc"] or float("nan"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
