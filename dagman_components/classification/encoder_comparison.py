# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""One paired evaluation of encoders on a labelled nodule folder: "did pretraining help?".

Every encoder is scored on the same cases, patient-grouped folds and seeds
(:func:`~dagman_components.classification.cv_split`, the classification bundle's split), by:

* ``lp``: the project's linear probe (:func:`~dagman_components.probing.fit_logistic_probe`) on the
  frozen features, at each few-shot fraction of the training labels;
* ``knn``: a kNN on the standardised frozen features;
* ``finetune``: the classification bundle itself (``mode: finetune``), trained and tested per cell.

Each (encoder, protocol, fraction, seed, fold) cell stores the test scores of its cases. The pooled
out-of-fold AUC of a seed scores every case once; the table gives each encoder's mean over seeds
and its paired difference to the first encoder with a patient-bootstrap 95 % interval
(:func:`~dagman_components.probing.paired_auc_difference`). Finished cells are kept in a JSON file
written atomically after each cell, so a rerun skips them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dagman_components.atomic import atomic_save, atomic_write_text
from dagman_components.classification.splits import cv_split
from dagman_components.classification.table import read_nodule_table
from dagman_components.classification.transforms import nodule_preprocessing
from dagman_components.data import HU_WINDOW, resolve_hu_window
from dagman_components.weights.encoder_io import card_path, card_preprocessing, prepare_encoder
from dagman_components.features.frozen_features import frozen_features, image_batches
from dagman_components.probing import DEFAULT_C, fit_logistic_probe, knn_scores, paired_auc_difference

__all__ = ["EncoderSpec", "parse_encoder_spec", "NoduleSet", "load_nodule_set", "EncoderComparison", "PROTOCOLS",
           "write_comparison", "BundleFinetune"]

logger = logging.getLogger(__name__)

#: What can be measured per encoder.
PROTOCOLS: tuple[str, ...] = ("lp", "knn", "finetune")
RANDOM = "random"


@dataclass(frozen=True)
class EncoderSpec:
    """An encoder to compare.

    Attributes:
        name: its label in the table.
        weights: a ``model.pt``, or ``None`` for random initialisation.
        like: for random initialisation, the weights (or card) whose model card gives the settings.
    """

    name: str
    weights: str | None
    like: str | None = None


def parse_encoder_spec(text: str) -> EncoderSpec:
    """``NAME=PATH`` (a ``model.pt``) or ``NAME=random:PATH`` (random init with the card of ``PATH``).

    Raises:
        ValueError: for another form or a missing file (the message names it).
    """
    name, sep, target = text.partition("=")
    if not sep or not name or not target:
        raise ValueError(f"--encoder expects NAME=PATH or NAME=random:PATH, got {text!r}.")
    if target.startswith(RANDOM + ":"):
        like = target[len(RANDOM) + 1 :]
        card = card_path(like)
        if card is None or not card.is_file():
            raise ValueError(f"--encoder {name}: no model card for {like!r} (expected {card}); point it at a model.pt "
                             "with model_card.json beside it, or at the card itself.")
        return EncoderSpec(name, None, str(like))
    if not os.path.isfile(target):
        raise ValueError(f"--encoder {name}: the weights {target!r} do not exist.")
    return EncoderSpec(name, target)


def _preprocess_nodules(items: Sequence[Mapping[str, Any]], hu_window: Sequence[float]) -> torch.Tensor:
    """(N, 1, D, H, W) float16 crops through the classification bundle's preprocessing at ``hu_window``."""
    from monai.transforms import Compose

    transform = Compose(nodule_preprocessing(hu_window=hu_window, track_meta=False))
    return torch.stack([torch.as_tensor(transform(dict(it))["image"]).float() for it in items]).half()


@dataclass
class NoduleSet:
    """A labelled nodule folder, preprocessed once per HU window.

    Attributes:
        items: the table's items (``id``, ``label``, ``patient``, ``image``).
        images: (N, 1, D, H, W) float16 images (the classification bundle's preprocessing at ``hu_window``).
        hu_window: the window of ``images``.
    """

    items: list[dict[str, Any]]
    images: torch.Tensor
    hu_window: tuple[float, float] = HU_WINDOW
    _by_window: dict[tuple[float, float], torch.Tensor] = field(default_factory=dict, repr=False)

    def images_for(self, hu_window: str | Sequence[float]) -> torch.Tensor:
        """The crops at another window (an encoder pretrained with it), preprocessed once and kept."""
        window = resolve_hu_window(hu_window)
        if window == tuple(self.hu_window):
            return self.images
        if window not in self._by_window:
            self._by_window[window] = _preprocess_nodules(self.items, window)
        return self._by_window[window]

    @property
    def labels(self) -> np.ndarray:
        return np.array([int(it["label"]) for it in self.items])

    @property
    def patients(self) -> np.ndarray:
        return np.array([str(it["patient"]) for it in self.items])

    @property
    def ids(self) -> list[str]:
        return [str(it["id"]) for it in self.items]


def load_nodule_set(folder: str | os.PathLike, cache: str | os.PathLike | None = None,
                    hu_window: str | Sequence[float] = HU_WINDOW) -> NoduleSet:
    """Read ``nodules.csv`` + ``image/`` and preprocess every crop (1 mm, 32^3, HU window), once.

    Args:
        folder: the LIDC-layout folder.
        cache: a ``.pt`` file keeping the preprocessed images (reused when it holds the same crops and window).
        hu_window: the window of the images made now; encoders pretrained with another window get their own
            (:meth:`NoduleSet.images_for`).

    Returns:
        The :class:`NoduleSet`.
    """
    folder = Path(folder)
    window = resolve_hu_window(hu_window)
    items = [dict(it) for it in read_nodule_table(folder / "nodules.csv", image_dir=folder / "image")]
    if cache is not None and Path(cache).is_file():
        stored = torch.load(cache, weights_only=True)
        if list(stored["ids"]) == [str(it["id"]) for it in items] and \
                tuple(stored.get("hu_window", HU_WINDOW)) == window:
            return NoduleSet(items, stored["images"], window)
    images = _preprocess_nodules(items, window)
    if cache is not None:
        atomic_save({"images": images, "ids": [str(it["id"]) for it in items], "hu_window": list(window)}, cache)
    return NoduleSet(items, images, window)


class EncoderComparison:
    """The cells, their results file and the paired table.

    Args:
        nodules: the labelled set.
        encoders: the encoders; the first is the reference of the paired differences.
        results_path: the JSON of finished cells (created or resumed).
        seeds: seeds (folds, validation split, few-shot subset and random initialisation).
        n_folds: patient-grouped folds per seed.
        fractions: few-shot shares of the training labels for ``lp``.
        protocols: subset of :data:`PROTOCOLS`.
        token: encoder output probed (``cls`` or ``global``).
        C: the linear probe's inverse L2 strength.
        n_neighbors: k of the kNN.
        finetune: ``callable(spec, seed, fold) -> {id: score}`` running the bundle (needed for
            ``finetune``).
        settings: extra values that must match on resume (e.g. the fine-tuning overrides).
        n_boot: bootstrap resamples of the paired intervals.
        device: where the encoders run.

    Raises:
        ValueError: an unknown protocol, or a results file written with other settings.
    """

    def __init__(self, nodules: NoduleSet, encoders: Sequence[EncoderSpec], results_path: str | os.PathLike,
                 seeds: Sequence[int] = (0, 1, 2), n_folds: int = 5, fractions: Sequence[float] = (0.01, 0.1, 1.0),
                 protocols: Sequence[str] = ("lp", "knn"), token: str = "cls", C: float = DEFAULT_C,
                 n_neighbors: int = 10, finetune: Callable[[EncoderSpec, int, int], Mapping[str, float]] | None = None,
                 settings: Mapping[str, Any] | None = None, n_boot: int = 1000, device: str = "cpu") -> None:
        unknown = [p for p in protocols if p not in PROTOCOLS]
        if unknown:
            raise ValueError(f"unknown protocol(s) {unknown}; choose from {list(PROTOCOLS)}.")
        if "finetune" in protocols and finetune is None:
            raise ValueError("the finetune protocol needs a fine-tuning runner.")
        self.nodules, self.encoders = nodules, list(encoders)
        self.results_path = Path(results_path)
        self.seeds, self.n_folds = [int(s) for s in seeds], int(n_folds)
        self.fractions, self.protocols = [float(f) for f in fractions], list(protocols)
        self.token, self.C, self.n_neighbors = token, float(C), int(n_neighbors)
        self.finetune, self.n_boot, self.device = finetune, int(n_boot), device
        self.settings = {"ids": nodules.ids, "n_folds": self.n_folds, "token": token, "C": self.C,
                         "n_neighbors": self.n_neighbors, **dict(settings or {})}
        self.cells: dict[str, dict[str, float]] = self._resume()
        self._features: dict[tuple[str, int], np.ndarray] = {}

    # -- the results file

    def _resume(self) -> dict[str, dict[str, float]]:
        if not self.results_path.is_file():
            return {}
        stored = json.loads(self.results_path.read_text())
        if stored.get("settings") != json.loads(json.dumps(self.settings)):
            raise ValueError(f"{self.results_path} holds cells of other settings (nodules, folds, token, C or "
                             "fine-tuning overrides); use another --output or delete it.")
        return dict(stored.get("cells", {}))

    def _save(self) -> None:
        atomic_write_text(json.dumps({"settings": self.settings, "cells": self.cells}), self.results_path)

    # -- cells

    def plan(self) -> list[tuple[str, str, float, int, int]]:
        """Every (encoder, protocol, fraction, seed, fold) cell, in run order."""
        cells = []
        for protocol in self.protocols:
            fractions = self.fractions if protocol == "lp" else [1.0]
            for fraction in fractions:
                for seed in self.seeds:
                    for fold in range(self.n_folds):
                        cells += [(e.name, protocol, fraction, seed, fold) for e in self.encoders]
        return cells

    @staticmethod
    def key(encoder: str, protocol: str, fraction: float, seed: int, fold: int) -> str:
        return f"{encoder}|{protocol}|{fraction:g}|{seed}|{fold}"

    def features(self, spec: EncoderSpec, seed: int) -> np.ndarray:
        """(N, C) frozen features (random encoders are seeded per seed; pretrained ones once)."""
        key = (spec.name, seed if spec.weights is None else -1)
        if key not in self._features:
            card = card_path(spec.like if spec.weights is None else spec.weights)
            encoder = prepare_encoder(spec.weights, card=card, seed=seed)
            images = self.nodules.images_for(card_preprocessing(card)["hu_window"])
            feats = frozen_features(encoder, (b.float() for b in image_batches(images, 32)),
                                    [self.token], self.device, f"{spec.name} features")[self.token]
            self._features[key] = feats.flatten(1).double().numpy()
        return self._features[key]

    def run_cell(self, spec: EncoderSpec, protocol: str, fraction: float, seed: int, fold: int) -> dict[str, float]:
        """The test scores ``{id: score}`` of one cell."""
        if protocol == "finetune":
            return dict(self.finetune(spec, seed, fold))
        split = cv_split(self.nodules.items, n_folds=self.n_folds, fold=fold, few_shot_fraction=fraction, seed=seed)
        index = {i: n for n, i in enumerate(self.nodules.ids)}
        train = [index[str(it["id"])] for it in split["train"]]
        test = [index[str(it["id"])] for it in split["test"]]
        x, y = self.features(spec, seed), self.nodules.labels
        if protocol == "knn":
            scores = knn_scores(x[train], y[train], x[test], self.n_neighbors)
        else:
            scores = fit_logistic_probe(x[train], y[train], C=self.C).probabilities(x[test])[:, 1]
        return {self.nodules.ids[i]: float(s) for i, s in zip(test, scores)}

    def run(self, max_minutes: float = 0.0) -> int:
        """Run the unfinished cells (saving after each); returns how many ran.

        Args:
            max_minutes: start no new cell after this long (0: no limit).
        """
        t0, ran = time.perf_counter(), 0
        specs = {e.name: e for e in self.encoders}
        todo = [c for c in self.plan() if self.key(*c) not in self.cells]
        if len(todo) < len(self.plan()):
            logger.info("%d of %d cells already done: skipped", len(self.plan()) - len(todo), len(self.plan()))
        for n, (name, protocol, fraction, seed, fold) in enumerate(todo):
            if max_minutes and time.perf_counter() - t0 > 60 * max_minutes:
                logger.info("--max_minutes reached: %d cell(s) left for the next run", len(todo) - n)
                break
            self.cells[self.key(name, protocol, fraction, seed, fold)] = self.run_cell(
                specs[name], protocol, fraction, seed, fold)
            self._save()
            ran += 1
            logger.info("cell %d/%d: %s %s %g seed %d fold %d", n + 1, len(todo), name, protocol, fraction, seed, fold)
        return ran

    # -- the table

    def seed_scores(self, encoder: str, protocol: str, fraction: float) -> np.ndarray | None:
        """(seeds, N) out-of-fold scores, or ``None`` while a cell is missing."""
        rows = []
        for seed in self.seeds:
            merged: dict[str, float] = {}
            for fold in range(self.n_folds):
                cell = self.cells.get(self.key(encoder, protocol, fraction, seed, fold))
                if cell is None:
                    return None
                merged.update(cell)
            rows.append([merged.get(i, np.nan) for i in self.nodules.ids])
        return np.asarray(rows, dtype=float)

    def table(self) -> list[dict[str, Any]]:
        """One row per (protocol, fraction, encoder) with finished cells: mean AUC over seeds, its
        spread, and the paired difference to the first encoder with its 95 % interval."""
        from dagman_components.probing import mean_auc

        rows, y, groups = [], self.nodules.labels, self.nodules.patients
        reference = self.encoders[0].name
        for protocol in self.protocols:
            for fraction in (self.fractions if protocol == "lp" else [1.0]):
                ref = self.seed_scores(reference, protocol, fraction)
                for spec in self.encoders:
                    scores = self.seed_scores(spec.name, protocol, fraction)
                    if scores is None:
                        continue
                    per_seed = [mean_auc(s, y) for s in scores]
                    row = {"protocol": protocol, "fraction": fraction, "encoder": spec.name,
                           "auc_mean": float(np.mean(per_seed)), "auc_std": float(np.std(per_seed)),
                           "auc_per_seed": per_seed, "seeds": len(self.seeds), "folds": self.n_folds}
                    if spec.name != reference and ref is not None:
                        d = paired_auc_difference(ref, scores, y, groups, n_boot=self.n_boot)
                        row.update({"difference": d.difference, "ci_low": d.low, "ci_high": d.high,
                                    "share_better": d.share_b_better})
                    rows.append(row)
        return rows


_COLUMNS = ("protocol", "fraction", "encoder", "auc_mean", "auc_std", "difference", "ci_low", "ci_high", "share_better",
            "seeds", "folds")


def _protocol_label(row: Mapping[str, Any]) -> str:
    name = {"lp": "linear probe", "knn": "kNN", "finetune": "fine-tuning"}[row["protocol"]]
    return f"{name} ({row['fraction']:.0%} of labels)" if row["protocol"] == "lp" else name


def write_comparison(rows: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike, reference: str,
                     title: str = "Encoders on held-out nodules") -> dict[str, Path]:
    """Write the table as ``comparison.csv`` and ``comparison.md`` and a PNG of the paired differences
    (``comparison.png``), atomically.

    Args:
        rows: :meth:`EncoderComparison.table`.
        output_dir: the folder.
        reference: the first encoder (the differences are against it).
        title: the figure's title.

    Returns:
        The three paths.
    """
    import csv
    import io

    from dagman_components.atomic import atomic_write_png
    from dagman_components.handlers.curves import pyplot

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(buf.getvalue(), out / "comparison.csv")

    lines = [f"| protocol | encoder | AUC (mean ± sd over seeds) | difference to {reference} [95 % CI] | "
             "resamples with a gain |", "|---|---|---|---|---|"]
    for row in rows:
        diff = ("–" if "difference" not in row else
                f"{row['difference']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]")
        share = "–" if "share_better" not in row else f"{row['share_better']:.0%}"
        lines.append(f"| {_protocol_label(row)} | {row['encoder']} | {row['auc_mean']:.3f} ± {row['auc_std']:.3f} | "
                     f"{diff} | {share} |")
    n = rows[0] if rows else {"seeds": 0, "folds": 0}
    lines.append("")
    lines.append(f"{n['seeds']} seed(s) x {n['folds']} patient-grouped folds; AUC of the pooled out-of-fold scores "
                 "of each seed; paired patient-bootstrap intervals of the difference.")
    atomic_write_text("\n".join(lines) + "\n", out / "comparison.md")

    plt = pyplot()
    paired = [r for r in rows if "difference" in r]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * max(4, len(rows)) + 1.2), dpi=120)
    labels = [f"{_protocol_label(r)}: {r['encoder']}" for r in rows]
    axes[0].errorbar([r["auc_mean"] for r in rows], range(len(rows)), xerr=[r["auc_std"] for r in rows], fmt="o")
    axes[0].set_yticks(range(len(rows)), labels, fontsize=8)
    axes[0].axvline(0.5, color="grey", ls=":")
    axes[0].set_xlabel("test AUC (mean ± sd over seeds)")
    axes[0].invert_yaxis()
    if paired:
        d = np.array([r["difference"] for r in paired])
        lo, hi = d - np.array([r["ci_low"] for r in paired]), np.array([r["ci_high"] for r in paired]) - d
        colours = ["C2" if r["ci_low"] > 0 else ("C3" if r["ci_high"] < 0 else "C7") for r in paired]
        for k, (x, c) in enumerate(zip(d, colours)):
            axes[1].errorbar([x], [k], xerr=[[lo[k]], [hi[k]]], fmt="o", color=c)
        axes[1].set_yticks(range(len(paired)), [f"{_protocol_label(r)}: {r['encoder']}" for r in paired], fontsize=8)
        axes[1].invert_yaxis()
    axes[1].axvline(0.0, color="grey", ls="--")
    axes[1].set_xlabel(f"AUC difference to {reference} (95 % CI; green: above 0)")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write_png(fig, out / "comparison.png", close=True)
    return {"csv": out / "comparison.csv", "md": out / "comparison.md", "png": out / "comparison.png"}


class BundleFinetune:
    """Fine-tune and test one cell with the classification bundle (``configs/train.yaml`` then
    ``configs/evaluate.yaml``, in this process), in its own ``bundle_root``.

    Args:
        bundle: the classification bundle folder (its configs are read from there).
        dataset_dir: the labelled folder.
        work_dir: one ``bundle_root`` per cell is made under it.
        n_folds: the comparison's folds.
        overrides: more bundle settings (e.g. ``max_epochs``, ``layer_decay``).
    """

    def __init__(self, bundle: str | os.PathLike, dataset_dir: str | os.PathLike, work_dir: str | os.PathLike,
                 n_folds: int, overrides: Mapping[str, Any] | None = None) -> None:
        self.bundle, self.dataset_dir, self.work_dir = Path(bundle), str(dataset_dir), Path(work_dir)
        self.n_folds, self.overrides = int(n_folds), dict(overrides or {})

    def __call__(self, spec: EncoderSpec, seed: int, fold: int) -> dict[str, float]:
        import pandas as pd
        from monai.bundle import run

        root = self.work_dir / f"{spec.name}_seed{seed}_fold{fold}"
        (root / "models").mkdir(parents=True, exist_ok=True)
        weights = {"pretrained_path": spec.weights or "null",  # monai.bundle.run drops None overrides
                   "model_card": str(card_path(spec.weights or spec.like))}
        common = {"bundle_root": str(root), "dataset_dir": self.dataset_dir, "n_folds": self.n_folds, "fold": fold,
                  "seed": seed, "mode": "finetune", **self.overrides}
        configs = [str(self.bundle / "configs" / c) for c in ("train.yaml", "evaluate.yaml")]
        run(config_file=configs[:1], logging_file=False, **common, **weights)
        run(config_file=configs, logging_file=False, **common)
        table = pd.read_csv(root / "eval" / "test_predictions.csv", dtype={"id": str})
        return dict(zip(table["id"], table["probability_malignant"].astype(float)))
