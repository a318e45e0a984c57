#!/usr/bin/env python
# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Compare pretraining variants (the paper's Figure 4 / Table 1 protocol) with one command. Resumable.

Each chosen variant of the pretraining bundle (``dagman`` = the bundle as is, or a file of
``bundles/dagman_ct_pretraining/configs/variants/``; ``random_init`` = no pretraining, the
same seeded initialisation) is pretrained with the same CT data, seed, configs and budget into its
own ``bundle_root`` (``<output>/<variant>``), then evaluated:

- ``nodule_lp``: linear probe and kNN of nodule malignancy on frozen features, the cells of
  ``scripts/evaluate_encoders.py`` (the project's one probe, patient-grouped folds); after each variant
  the paired table of all variants against ``random_init`` goes to ``<output>/nodule_comparison/``;
- ``organ_clustering``: the clustering components' frozen-feature kNN accuracy, silhouette and
  k-means NMI/ARI with a UMAP plot;
- ``head_diversity``: attention-head diversity per Swin stage (JSON + box plots);
- ``attention_overlay``: the SA [CLS] attention on CT slices (PNG);
- ``attention_in_mask``: for the labelled nodule crops with masks (``mask/`` beside ``image/``), the
  share of the [CLS] attention S_ATT inside the nodule mask against the mask's share of the volume.

Seeds: run the script once per ``--seed`` into its own ``--output`` (the nodule folds stay fixed by
``--split_seed``), then ``--summarise OUT_SEED0 OUT_SEED1 ...`` writes one table of mean +/- std over
the seeds (``--output``/``results_seeds.md``, ``.json`` and ``.png``).

Every finished step is stored at once (atomically) in ``<output>/results.json``; a rerun skips
finished steps, and an interrupted pretraining resumes from its ``models/checkpoint.pt`` (the
bundle's own resume handler). The settings are stored too and a rerun with other settings is
refused. ``results.md`` (one table, variant x metric), ``results.png`` and each step's figures are
rewritten after every step.

Example (the run of docs/results.md; 2 CPU cores)::

    OMP_NUM_THREADS=1 python scripts/compare_pretraining.py --ct_dir ../shared/data/totalseg_example \\
        --nodules ../shared/data/lidc_nodules --organs bundles/dagman_organ_ct_clustering/sample_data/organ_crops_totalseg_28.npz \\
        --output /scratch/compare --variants random_init dagman smit no_noisy_teacher --max_epochs 20 \\
        --set "roi_size=[32,32,32]" embed_dim=12 "num_heads=[3,3,3,3]" sa_heads=3
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dagman_components.atomic import atomic_write_text
from dagman_components.runtime.progress import progress

logger = logging.getLogger("compare_pretraining")

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "dagman_ct_pretraining"
VARIANTS_DIR = BUNDLE / "configs" / "variants"
BASELINE = "dagman"
NO_PRETRAINING = "random_init"
STEPS = ("pretrain", "nodule_lp", "organ_clustering", "head_diversity", "attention_overlay", "attention_in_mask")


class SettingsMismatchError(ValueError):
    """A rerun in an output folder that holds results of other settings."""


def available_variants() -> list[str]:
    """``random_init``, ``dagman`` and every override file of the bundle's ``configs/variants``."""
    return [NO_PRETRAINING, BASELINE] + sorted(p.stem for p in VARIANTS_DIR.glob("*.yaml"))


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON when it parses (numbers, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ct_dir", help="unlabelled CT: a folder of volumes or a JSON datalist (pretraining)")
    p.add_argument("--nodules", help="folder with nodules.csv, image/ and (for attention_in_mask) mask/ (LIDC layout)")
    p.add_argument("--organs", help="organ crops npz in organmnist3d layout")
    p.add_argument("--summarise", nargs="+", type=Path, metavar="OUT",
                   help="only combine the table.json of these per-seed outputs into --output/results_seeds.*")
    p.add_argument("--split_seed", type=int, default=0, help="seed of the nodule probe's patient-grouped folds")
    p.add_argument("--output", required=True, type=Path, help="output folder (one bundle_root per variant)")
    p.add_argument("--variants", nargs="+", default=[NO_PRETRAINING, BASELINE, "smit"], help="see --list")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    p.add_argument("--base_configs", nargs="+", default=["train.yaml", "demo.yaml"], help="bundle configs under every variant")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of every variant's bundle run")
    p.add_argument("--max_epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    p.add_argument("--lp_token", default="cls", choices=("cls", "global"), help="nodule linear-probe feature")
    p.add_argument("--lp_folds", type=int, default=5)
    p.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples of the paired nodule table")
    p.add_argument("--organ_token", default="global", choices=("cls", "global"))
    p.add_argument("--diversity_volumes", type=int, default=4)
    p.add_argument("--diversity_roi", type=int, default=64,
                   help="crop side for head diversity and overlays (Swin only; ViT uses its roi_size)")
    p.add_argument("--max_minutes", type=float, default=0.0, help="start no new step after this long (0: no limit)")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """What must be equal across reruns in one output folder (the variant list may grow)."""
    return {
        "ct_dir": os.path.abspath(args.ct_dir),
        "nodules": os.path.abspath(args.nodules),
        "organs": os.path.abspath(args.organs),
        "base_configs": list(args.base_configs),
        "overrides": {k: v for k, v in (s.split("=", 1) for s in args.set)},
        "max_epochs": args.max_epochs,
        "seed": args.seed,
        "lp": {"token": args.lp_token, "folds": args.lp_folds, "split_seed": args.split_seed},
        "organ_token": args.organ_token,
        "diversity_volumes": args.diversity_volumes,
        "diversity_roi": args.diversity_roi,
    }


def load_results(path: Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The stored results, or a fresh record; refuses results of other settings.

    Raises:
        SettingsMismatchError: when ``path`` holds results of other settings.
    """
    if not path.is_file():
        return {"settings": dict(settings), "runs": {}}
    results = json.loads(path.read_text())
    if results.get("settings") != json.loads(json.dumps(settings)):
        old, new = results.get("settings", {}), json.loads(json.dumps(settings))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise SettingsMismatchError(
            f"{path} holds results of other settings (differing: {diff}); use another --output or the same settings."
        )
    return results


def variant_config_files(variant: str, base_configs: Sequence[str]) -> list[str]:
    """The bundle configs of one variant (base configs, then its override file).

    Raises:
        ValueError: for an unknown variant.
    """
    if variant not in available_variants():
        raise ValueError(f"unknown variant '{variant}'; choose from {available_variants()}.")
    files = [str(BUNDLE / "configs" / c) for c in base_configs]
    if variant not in (BASELINE, NO_PRETRAINING):
        files.append(str(VARIANTS_DIR / f"{variant}.yaml"))
    return files


def bundle_overrides(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """The overrides every variant's bundle run gets."""
    out = {k: parse_value(v) for k, v in settings_of(args)["overrides"].items()}
    out.update(bundle_root=str(run_dir), dataset_dir=os.path.abspath(args.ct_dir), max_epochs=args.max_epochs,
               seed=args.seed)
    return out


# ------------------------------------------------------------------------------------------------ steps


def pretrain_variant(variant: str, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Pretrain one variant by running the bundle (resumes from ``models/checkpoint.pt`` when present);
    ``random_init`` exports the seeded initial encoder instead."""
    files = variant_config_files(variant, args.base_configs)
    overrides = bundle_overrides(args, run_dir)
    t0 = time.perf_counter()
    if variant == NO_PRETRAINING:
        from monai.bundle import ConfigParser

        from dagman_components.weights.state_dict import export_encoder

        parser = ConfigParser()
        parser.read_config(files)
        parser.update(overrides)
        torch.manual_seed(args.seed)
        encoder = parser.get_parsed_content("network_def").encoder
        card = parser.get_parsed_content("model_card")
        card["training"] = {**card.get("training", {}), "max_epochs": 0, "note": "no pretraining (seeded init)"}
        export_encoder(encoder, run_dir / "models" / "model.pt", card)
        return {"model": str(run_dir / "models" / "model.pt"), "seconds": round(time.perf_counter() - t0, 1),
                "epochs": 0}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(files),
           "--logging_file", str(BUNDLE / "configs" / "logging.conf")]
    for k, v in overrides.items():
        cmd += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "pretrain.log"
    logger.info("%s: pretraining (%d epochs), log %s", variant, args.max_epochs, log_path)
    with open(log_path, "a") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(run_dir))
    model = run_dir / "models" / "model.pt"
    if rc != 0 or not model.is_file():
        raise RuntimeError(f"{variant}: the pretraining bundle failed (exit {rc}); see {log_path}.")
    loss = None
    curves = run_dir / "runs" / "loss_curves.csv"
    if curves.is_file():
        import pandas as pd

        df = pd.read_csv(curves)
        loss = {c: float(df[c].tail(max(1, len(df) // 10)).mean()) for c in df.columns if c.startswith("loss")}
    return {"model": str(model), "seconds": round(time.perf_counter() - t0, 1), "epochs": args.max_epochs,
            "final_loss_last10pct": loss}


def _encoder(run_dir: Path, args: argparse.Namespace) -> torch.nn.Module:
    from dagman_components.weights.encoder_io import prepare_encoder

    return prepare_encoder(run_dir / "models" / "model.pt", seed=args.seed).to(args.device)


def _nodule_comparison(args: argparse.Namespace, variants: Sequence[str]) -> Any:
    """The paired evaluation of ``scripts/evaluate_encoders.py`` over the variants' teacher encoders (one
    results file for all variants, so each variant's cells are computed once)."""
    from dagman_components.classification import encoder_comparison as ec

    out = args.output / "nodule_comparison"
    nodules = ec.load_nodule_set(args.nodules, cache=args.output / "cache" / "nodule_images.pt")
    specs = [ec.EncoderSpec(v, str(args.output / v / "models" / "model.pt")) for v in variants]
    return ec.EncoderComparison(nodules, specs, out / "cells.json", seeds=[args.split_seed], n_folds=args.lp_folds,
                                fractions=[1.0], protocols=["lp", "knn"], token=args.lp_token, n_boot=args.n_boot)


def evaluate_nodule_lp(variant: str, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Nodule malignancy from frozen features: the project's linear probe and kNN in patient-grouped
    stratified folds (``scripts/evaluate_encoders.py``'s cells); the paired table over the variants is
    written after every variant (:func:`write_nodule_comparison`)."""
    comparison = _nodule_comparison(args, [variant])
    comparison.run()
    rows = {r["protocol"]: r for r in comparison.table()}
    return {"auc_mean": rows["lp"]["auc_mean"], "knn_auc": rows["knn"]["auc_mean"], "cases": len(comparison.nodules.ids),
            "positives": int(comparison.nodules.labels.sum()), "folds": args.lp_folds, "token": args.lp_token,
            "classifier": "dagman_components.probing logistic probe (standardised, balanced, C=1); AUC of the pooled "
                          "out-of-fold scores"}


def write_nodule_comparison(results: Mapping[str, Any], args: argparse.Namespace) -> None:
    """The paired table of every variant with a nodule probe, against ``random_init`` when it ran."""
    from dagman_components.classification.encoder_comparison import write_comparison

    done = [v for v, r in results["runs"].items() if "nodule_lp" in r]
    if len(done) < 2 or not (args.output / "nodule_comparison" / "cells.json").is_file():
        return
    done.sort(key=lambda v: v != NO_PRETRAINING)
    comparison = _nodule_comparison(args, done)
    rows = comparison.table()
    if rows:
        write_comparison(rows, args.output / "nodule_comparison", done[0], title="pretraining variants: nodule probes")


def evaluate_organ_clustering(variant: str, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Organ clustering of frozen features (clustering components), with its UMAP PNG."""
    from dagman_components.clustering import (
        OrganClustering,
        OrganFeatureExtractor,
        load_organ_npz,
    )

    extractor = OrganFeatureExtractor(args.organ_token, roi_size=32, device=args.device, progress=False)
    m = OrganClustering(load_organ_npz(args.organs), _encoder(run_dir, args), extractor, run_dir / "organ_clustering",
                        seed=args.seed, description=f"compare_pretraining variant {variant}").run()
    fs = m["feature_space"]
    return {"knn_accuracy": fs["knn"]["accuracy_mean"], "silhouette": fs["silhouette"], "nmi": fs["kmeans"]["nmi"],
            "ari": fs["kmeans"]["ari"], "separation": fs.get("separation"), "crops": m["data"]["cases"],
            "classes": m["data"]["classes"], "token": args.organ_token, "figure": str(run_dir / "organ_clustering")}


def evaluate_head_diversity(variant: str, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Attention-head diversity per Swin stage on the pretraining CT (``skipped`` for the ViT)."""
    from dagman_components.metrics.diversity_report import diversity_report

    encoder = _encoder(run_dir, args)
    if not hasattr(encoder, "layers1"):
        return {"skipped": f"{type(encoder).__name__} has no Swin stages"}
    rep = diversity_report(run_dir / "models" / "model.pt", args.ct_dir, run_dir / "diversity",
                           roi_size=args.diversity_roi, max_volumes=args.diversity_volumes, device=args.device, seed=args.seed, title=variant,
                           progress=False)
    return {k: {"entropy_mean": v["distance_entropy_bits"]["mean"], "entropy_std": v["distance_entropy_bits"]["std"],
                "head_spread": v["head_spread_of_mean_distance"]["mean"]} for k, v in rep["stages"].items()}


def evaluate_attention_overlay(variant: str, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The SA [CLS] attention over CT slices (PNG)."""
    from dagman_components.visualize.attention_overlay import attention_overlay_figure

    roi = None if not hasattr(_encoder(run_dir, args), "layers1") else args.diversity_roi  # the ViT needs its own size
    return attention_overlay_figure(run_dir / "models" / "model.pt", args.ct_dir, run_dir / "attention_overlay.png",
                                    roi_size=roi, max_volumes=args.diversity_volumes, device=args.device)


def evaluate_attention_in_mask(variant: str, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Where S_ATT looks on the labelled nodules with masks: the share inside each centred nodule's mask
    against the mask's share, and, on crops whose nodule is shifted by up to 8 voxels per axis (so that a
    centre prior cannot pass), the cell AUROC and mass ratio of S_ATT (head mean and each head, clean and
    noisy teacher pass) next to a tissue prior and a centre prior."""
    import dagman_components.classification as nc
    from dagman_components.metrics.attention_in_mask import attention_in_mask_report, nodule_and_mask_transforms
    from dagman_components.metrics.attention_localisation import attention_localisation

    nodules = Path(args.nodules)
    items = nc.read_nodule_table(nodules / "nodules.csv", image_dir=nodules / "image")
    items = [{**it, "mask": str(nodules / "mask" / Path(it["image"]).name)} for it in items
             if (nodules / "mask" / Path(it["image"]).name).is_file()]
    encoder = _encoder(run_dir, args)
    rep = attention_in_mask_report(encoder, items, device=args.device)
    transform = nodule_and_mask_transforms()
    pairs = [transform(dict(it)) for it in items]
    images, masks = torch.stack([p["image"] for p in pairs]), torch.stack([p["mask"] for p in pairs])
    shifted = {f"shifted_{name}": attention_localisation(encoder, images, masks, max_shift=8, seed=args.split_seed,
                                                         patch_drop=drop, device=args.device)
               for name, drop in (("clean", 0.0), ("noisy", 0.7))}
    rep.update(shifted)
    atomic_write_text(json.dumps(rep), run_dir / "attention_in_mask.json")
    return {k: v for k, v in rep.items() if k not in ("ids", "mass_inside", "mask_share")}


#: Step name -> function(variant, run_dir, args) -> JSON-able dict. Looked up at call time (tests stub them).
STEP_FUNCTIONS: dict[str, Callable[[str, Path, argparse.Namespace], dict]] = {
    "pretrain": pretrain_variant,
    "nodule_lp": evaluate_nodule_lp,
    "organ_clustering": evaluate_organ_clustering,
    "head_diversity": evaluate_head_diversity,
    "attention_overlay": evaluate_attention_overlay,
    "attention_in_mask": evaluate_attention_in_mask,
}


# ------------------------------------------------------------------------------------------------ table


def _fmt(value: Any, std: Any = None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def table_rows(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]], dict[str, dict[str, Any]]]:
    """The variant x metric table: header, Markdown cells and the raw numbers."""
    stages = sorted({s for r in results["runs"].values() for s in (r.get("head_diversity") or {}) if s.startswith("stage")})
    header = ["variant", "pretrain (s)", "final loss", "nodule LP AUC", "organ kNN acc", "organ silhouette", "organ NMI",
              "S_ATT in nodule / nodule share"]
    header += [f"{s} dist. entropy (bits)" for s in stages]
    rows, numbers = [], {}
    for variant, r in results["runs"].items():
        pre, lp, org, div, att = (r.get(k) or {} for k in ("pretrain", "nodule_lp", "organ_clustering", "head_diversity",
                                                           "attention_in_mask"))
        last = pre.get("final_loss_last10pct") or {}
        loss = last.get("loss")
        num = {"pretrain_seconds": pre.get("seconds"), "final_loss": loss, "nodule_lp_auc": lp.get("auc_mean"),
               "nodule_lp_auc_std": lp.get("auc_std"), "organ_knn_accuracy": org.get("knn_accuracy"),
               "organ_silhouette": org.get("silhouette"), "organ_nmi": org.get("nmi"),
               "satt_mass_in_nodule": att.get("mean_mass_inside"), "nodule_share": att.get("mean_mask_share"),
               "satt_in_nodule_ratio": att.get("mean_ratio"),
               **{f"final_{k}": v for k, v in last.items() if k in ("loss_aitd", "loss_ampd", "loss_gitd")}}
        num.update({f"{s}_distance_entropy_bits": (div.get(s) or {}).get("entropy_mean") for s in stages})
        numbers[variant] = num
        cells = [variant, _fmt(pre.get("seconds"), digits=0), _fmt(loss), _fmt(lp.get("auc_mean"), lp.get("auc_std")),
                 _fmt(org.get("knn_accuracy")), _fmt(org.get("silhouette")), _fmt(org.get("nmi")),
                 _fmt(att.get("mean_ratio"))]
        cells += [_fmt((div.get(s) or {}).get("entropy_mean"), (div.get(s) or {}).get("entropy_std")) for s in stages]
        rows.append(cells)
    return header, rows, numbers


def write_outputs(results: Mapping[str, Any], out: Path) -> None:
    """``results.json`` (everything), ``table.json`` (variant x metric), ``results.md`` and ``results.png``."""
    atomic_write_text(json.dumps(results, indent=2, default=str), out / "results.json")
    header, rows, numbers = table_rows(results)
    atomic_write_text(json.dumps(numbers, indent=2), out / "table.json")
    s = results["settings"]
    lines = [
        "# Pretraining comparison",
        "",
        f"Same data, seed and budget for every variant: CT `{s['ct_dir']}`, {s['max_epochs']} epochs, seed {s['seed']}, "
        f"configs {s['base_configs']} + overrides `{s['overrides']}`. Nodule LP: {s['lp']['folds']}-fold patient-grouped "
        f"logistic regression on frozen `{s['lp']['token']}` features (`{s['nodules']}`); organs: kNN / silhouette / "
        f"k-means NMI on frozen `{s['organ_token']}` features (`{s['organs']}`); head diversity on "
        f"{s['diversity_volumes']} pretraining volume(s) cropped to {s.get('diversity_roi')}^3, mean ± std over volumes. AUC: mean ± std over folds.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(r + ["–"] * (len(header) - len(r))) + " |" for r in rows]
    atomic_write_text("\n".join(lines) + "\n", out / "results.md")
    try:
        plot_results(numbers, out / "results.png")
    except Exception as e:  # a figure must never lose the numbers
        logger.warning("results.png not written: %s", e)


def plot_results(numbers: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Left: nodule LP AUC and organ kNN accuracy per variant; right: distance entropy per stage (Figure 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dagman_components.atomic import atomic_write_png

    variants = list(numbers)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    xs = np.arange(len(variants))
    for off, key, label in ((-0.2, "nodule_lp_auc", "nodule LP AUC"), (0.2, "organ_knn_accuracy", "organ kNN acc")):
        vals = [numbers[v].get(key) if numbers[v].get(key) is not None else np.nan for v in variants]
        a.bar(xs + off, vals, width=0.4, label=label)
    a.set_xticks(xs, variants, rotation=30, ha="right", fontsize=8)
    a.set_ylim(0, 1)
    a.legend(fontsize=8)
    a.set_title("downstream (frozen features)", fontsize=9)
    for v in variants:
        st = sorted(k for k in numbers[v] if k.endswith("_distance_entropy_bits") and numbers[v][k] is not None)
        if st:
            b.plot([int(k[5]) for k in st], [numbers[v][k] for k in st], marker="o", label=v)
    b.set_xlabel("Swin stage")
    b.set_ylabel("attention-distance entropy (bits)")
    b.set_title("head diversity per stage", fontsize=9)
    if b.lines:
        b.legend(fontsize=7)
    fig.tight_layout()
    atomic_write_png(fig, path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ driver


def summarise_seeds(outputs: Sequence[Path], out: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Mean, standard deviation and count over per-seed outputs of every number in their ``table.json``.

    Args:
        outputs: the ``--output`` folders of runs that differ only in ``--seed``.
        out: where ``results_seeds.json``, ``results_seeds.md`` and ``results_seeds.png`` go.

    Returns:
        ``variant -> metric -> {"mean", "std", "n"}``.

    Raises:
        FileNotFoundError: when an output has no ``table.json``.
    """
    tables = []
    for folder in outputs:
        path = Path(folder) / "table.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: run the comparison into {folder} first.")
        tables.append(json.loads(path.read_text()))
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for variant in dict.fromkeys(v for t in tables for v in t):
        metrics = dict.fromkeys(k for t in tables for k in t.get(variant, {}))
        for metric in metrics:
            vals = [t[variant][metric] for t in tables if t.get(variant, {}).get(metric) is not None]
            if vals:
                summary.setdefault(variant, {})[metric] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)),
                                                          "n": len(vals)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(summary, indent=2), out / "results_seeds.json")
    cols = [("nodule_lp_auc", "nodule LP AUC"), ("organ_knn_accuracy", "organ kNN acc"),
            ("organ_silhouette", "organ silhouette"), ("satt_in_nodule_ratio", "S_ATT in nodule / nodule share"),
            ("final_loss_aitd", "final AITD"), ("final_loss_gitd", "final GITD"), ("final_loss_ampd", "final AMPD")]
    cols += sorted({(k, k.replace("_distance_entropy_bits", " dist. entropy (bits)")) for m in summary.values() for k in m
                    if k.endswith("_distance_entropy_bits")})
    lines = ["| variant | seeds | " + " | ".join(c[1] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for variant, m in summary.items():
        n = max((v["n"] for v in m.values()), default=0)
        cells = [_fmt(m[k]["mean"], m[k]["std"]) if k in m else "–" for k, _ in cols]
        lines.append(f"| {variant} | {n} | " + " | ".join(cells) + " |")
    atomic_write_text("Mean ± standard deviation over seeds.\n\n" + "\n".join(lines) + "\n", out / "results_seeds.md")
    try:
        plot_results({v: {k: s["mean"] for k, s in m.items()} for v, m in summary.items()}, out / "results_seeds.png")
        plot_attention_in_mask(outputs, list(summary), out / "attention_in_mask.png")
    except Exception as e:  # a figure must never lose the numbers
        logger.warning("a results_seeds figure was not written: %s", e)
    return summary


def plot_attention_in_mask(outputs: Sequence[Path], variants: Sequence[str], path: Path) -> None:
    """Per nodule: S_ATT mass inside the mask against the mask's share of the crop, one panel per
    variant, every seed's cases pooled (the diagonal is chance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dagman_components.atomic import atomic_write_png

    found = {v: [json.loads((Path(o) / v / "attention_in_mask.json").read_text()) for o in outputs
                 if (Path(o) / v / "attention_in_mask.json").is_file()] for v in variants}
    found = {v: reps for v, reps in found.items() if reps}
    if not found:
        return
    fig, axes = plt.subplots(1, len(found), figsize=(3.6 * len(found), 3.6), squeeze=False)
    for ax, (variant, reps) in zip(axes[0], found.items()):
        share = np.concatenate([r["mask_share"] for r in reps])
        mass = np.concatenate([r["mass_inside"] for r in reps])
        ax.scatter(share, mass, s=5, alpha=0.4)
        top = float(max(share.max(), mass.max()) * 1.05)
        ax.plot([0, top], [0, top], "k--", lw=0.8, label="chance")
        ax.set_title(f"{variant}: mean ratio {np.mean(mass / share):.3f}", fontsize=9)
        ax.set_xlabel("nodule share of the crop")
        ax.set_ylabel("S_ATT mass inside the nodule")
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write_png(fig, path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if args.list:
        print("\n".join(available_variants()))
        return 0
    if args.summarise:
        summarise_seeds(args.summarise, args.output.resolve())
        logger.info("table: %s", args.output / "results_seeds.md")
        return 0
    missing = [f"--{k}" for k in ("ct_dir", "nodules", "organs") if getattr(args, k) is None]
    if missing:
        logger.error("missing %s (needed unless --summarise)", ", ".join(missing))
        return 2
    for v in args.variants:
        variant_config_files(v, args.base_configs)  # unknown names fail before any work
    args.output = args.output.resolve()
    args.output.mkdir(parents=True, exist_ok=True)
    results = load_results(args.output / "results.json", settings_of(args))
    t0, failed, stopped = time.perf_counter(), [], False
    for variant in progress(args.variants, "variants", unit="variant"):
        run = results["runs"].setdefault(variant, {})
        for step in args.steps:
            if step in run:
                logger.info("%s/%s: done, skipped", variant, step)
                continue
            if step != "pretrain" and "pretrain" not in run:
                logger.warning("%s/%s: no pretrained weights yet, skipped", variant, step)
                continue
            if args.max_minutes and (time.perf_counter() - t0) / 60.0 > args.max_minutes:
                stopped = True
                break
            logger.info("%s/%s: running", variant, step)
            ts = time.perf_counter()
            try:
                run[step] = {**STEP_FUNCTIONS[step](variant, args.output / variant, args),
                             "step_seconds": round(time.perf_counter() - ts, 1)}
            except Exception as e:  # keep going with the other variants; the rerun retries this step
                logger.exception("%s/%s failed", variant, step)
                failed.append(f"{variant}/{step}: {e}")
                if step == "pretrain":
                    break
                continue
            write_outputs(results, args.output)
            if step == "nodule_lp":
                write_nodule_comparison(results, args)
        if stopped:
            logger.warning("--max_minutes %.1f reached: rerun the same command to continue", args.max_minutes)
            break
    write_outputs(results, args.output)
    for f in failed:
        logger.error("failed: %s", f)
    logger.info("table: %s", args.output / "results.md")
    return 1 if failed else (2 if stopped else 0)


if __name__ == "__main__":
    sys.exit(main())
