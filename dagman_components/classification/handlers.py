# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Ignite handlers of the nodule classification bundle.

* :class:`ScoreCollector` keeps each case's id, malignancy probability and label during an evaluator run.
* :class:`ValidationThreshold` is the ``threshold.json`` that
  :class:`~dagman_components.handlers.BestMetricSaver` stages with the best model (validation AUC) and
  publishes to ``models/`` when training finished, so a failed run never replaces an earlier one's files.
* :class:`ClassificationReportWriter` writes per-case predictions (CSV) and, with labels, the AUC /
  sensitivity / specificity report with bootstrap intervals (JSON) and the ROC curve (PNG).
* :class:`AttentionOverlayWriter` saves the [CLS]-to-patch attention of each case as NIfTI + PNG.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from monai.data import decollate_batch
from monai.utils import convert_to_tensor

from dagman_components.atomic import atomic_write_text, save_nifti_atomic
from dagman_components.classification.metrics import (
    binary_report,
    roc_curve,
    sensitivity_specificity,
    youden_threshold,
)
from dagman_components.classification.plots import (
    plot_attention_montage,
    plot_roc_curves,
)
from dagman_components.runtime.distributed import is_main_process
from dagman_components.networks import unwrap
from dagman_components.weights.state_dict import sha256_of

__all__ = [
    "ScoreCollector",
    "ValidationThreshold",
    "ClassificationReportWriter",
    "AttentionOverlayWriter",
    "load_threshold",
]

logger = logging.getLogger(__name__)


def _as_list(data: Any) -> list:
    return data if isinstance(data, list) else decollate_batch(data, detach=True)


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


class ScoreCollector:
    """Collect (id, probability of malignancy, label) of every case of an evaluator's epoch.

    The probability is channel ``positive_index`` of the post-processed ``pred`` (softmax); the
    label is the item's raw ``label`` (absent for unlabelled inference), the id its ``id_key``.

    Args:
        pred_key: output key of the class probabilities.
        label_key: item key of the {0, 1} label.
        id_key: item key of the case id.
        positive_index: channel of the malignant class.
    """

    def __init__(self, pred_key: str = "pred", label_key: str = "label", id_key: str = "id",
                 positive_index: int = 1) -> None:
        self.pred_key, self.label_key, self.id_key = pred_key, label_key, id_key
        self.positive_index = positive_index
        self.ids: list[str] = []
        self.scores: list[float] = []
        self.labels: list[int] = []

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self.reset, Events.EPOCH_STARTED):
            engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def reset(self, engine: Engine | None = None) -> None:
        self.ids, self.scores, self.labels = [], [], []

    def __call__(self, engine: Engine) -> None:
        outputs, items = _as_list(engine.state.output), _as_list(engine.state.batch)
        for out, item in zip(outputs, items):
            pred = torch.as_tensor(out[self.pred_key]).reshape(-1)
            self.scores.append(float(pred[self.positive_index] if pred.numel() > 1 else pred[0]))
            self.ids.append(str(_scalar(item.get(self.id_key, len(self.ids)))))
            if self.label_key in item:
                self.labels.append(int(_scalar(item[self.label_key])))

    @property
    def has_labels(self) -> bool:
        return bool(self.labels) and len(self.labels) == len(self.scores)


def load_threshold(threshold_path: str | os.PathLike, model_path: str | os.PathLike | None = None) -> dict:
    """Read a ``threshold.json`` written by :class:`ValidationThreshold` and check that it belongs to
    ``model_path`` (same sha256).

    Raises:
        FileNotFoundError: when the file is missing (train first, or set the threshold path).
        ValueError: when it was chosen for another ``model.pt``.
    """
    threshold_path = str(threshold_path)
    if not os.path.isfile(threshold_path):
        raise FileNotFoundError(f"threshold file '{threshold_path}' does not exist: run the train config first "
                                "(it chooses the threshold on the validation split).")
    with open(threshold_path) as f:
        info = json.load(f)
    if model_path is not None and info.get("model_sha256") and info["model_sha256"] != sha256_of(model_path):
        raise ValueError(f"'{threshold_path}' was chosen for another model than '{model_path}' (sha256 differs); "
                         "rerun training or point threshold_path to the matching file.")
    return info


class ValidationThreshold:
    """The ``threshold.json`` written beside the best model by
    :class:`~dagman_components.handlers.BestMetricSaver` (one of its ``companions``): the Youden
    threshold of the validation scores that made the model the best.

    It records the threshold, the validation AUC, sensitivity, specificity, epoch, number of cases and
    the sha256 of the ``model.pt`` it belongs to.

    Args:
        collector: the :class:`ScoreCollector` attached to the validation evaluator.
        path: the final ``threshold.json``.
    """

    def __init__(self, collector: ScoreCollector, path: str | os.PathLike) -> None:
        self.collector = collector
        self.path = Path(path)

    def __call__(self, model_sha256: str, metric_name: str, value: float, epoch: int) -> str:
        scores, labels = np.asarray(self.collector.scores), np.asarray(self.collector.labels)
        threshold = youden_threshold(scores, labels)
        sens, spec = sensitivity_specificity(scores, labels, threshold)
        info = {"threshold": threshold, "rule": "Youden J on the validation split", metric_name: value,
                "val_sensitivity": sens, "val_specificity": spec, "epoch": epoch,
                "n_val": int(len(labels)), "n_val_malignant": int(labels.sum()), "model_sha256": model_sha256}
        logger.info("threshold %.4f chosen on the validation split of epoch %d", threshold, epoch)
        return json.dumps(info, indent=2) + "\n"


class ClassificationReportWriter:
    """When the evaluator completes, write ``<name>_predictions.csv`` (id, probability, prediction at
    the threshold, label) and, when labels are known, ``<name>_metrics.json`` (AUC, sensitivity and
    specificity with bootstrap 95 % intervals at the validation-chosen threshold) and ``<name>_roc.png``.

    Args:
        collector: the :class:`ScoreCollector` of the evaluator.
        output_dir: folder of the outputs.
        threshold_path: ``threshold.json`` of the model. ``None``: the CSV has no prediction column and
            the metrics use a threshold chosen on these very cases, flagged as optimistic in the JSON.
        model_path: the evaluated ``model.pt``, checked against the threshold file.
        threshold_optional: a ``threshold_path`` that does not exist counts as ``None`` (inference on weights
            shared without it) and is logged; ``False``: a missing file is an error naming it.
        name: file prefix (``test``, ``inference``).
        n_boot: bootstrap resamples.
        seed: bootstrap seed.
        extra: additional JSON fields (e.g. the run's settings).
    """

    def __init__(self, collector: ScoreCollector, output_dir: str | os.PathLike,
                 threshold_path: str | os.PathLike | None = None, model_path: str | os.PathLike | None = None,
                 name: str = "test", n_boot: int = 1000, seed: int = 0, extra: dict | None = None,
                 threshold_optional: bool = False) -> None:
        self.collector = collector
        self.output_dir = Path(output_dir)
        self.threshold_path = threshold_path
        self.model_path = model_path
        self.name = name
        self.n_boot = n_boot
        self.seed = seed
        self.extra = dict(extra or {})
        self.threshold_optional = bool(threshold_optional)
        self.report: dict | None = None

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        if not is_main_process():
            return
        c = self.collector
        threshold_path = self.threshold_path
        if threshold_path and self.threshold_optional and not os.path.isfile(threshold_path):
            logger.info("no threshold file at %s: the predictions have no prediction column", threshold_path)
            threshold_path = None
        info = load_threshold(threshold_path, self.model_path) if threshold_path else None
        threshold = info["threshold"] if info else None
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["id", "probability_malignant", "prediction", "label"])
        for i, (case, score) in enumerate(zip(c.ids, c.scores)):
            pred = "" if threshold is None else int(score >= threshold)
            writer.writerow([case, f"{score:.6f}", pred, c.labels[i] if c.has_labels else ""])
        atomic_write_text(buf.getvalue(), self.output_dir / f"{self.name}_predictions.csv")
        if not c.has_labels:
            logger.info("%d predictions written to %s", len(c.scores), self.output_dir / f"{self.name}_predictions.csv")
            return
        chosen_here = threshold is None
        if chosen_here:
            threshold = youden_threshold(c.scores, c.labels)
        report = binary_report(c.scores, c.labels, threshold, n_boot=self.n_boot, seed=self.seed)
        report["threshold_source"] = "chosen on these cases (optimistic)" if chosen_here else str(threshold_path)
        report.update(self.extra)
        self.report = report
        atomic_write_text(json.dumps(report, indent=2) + "\n", self.output_dir / f"{self.name}_metrics.json")
        fpr, tpr, _ = roc_curve(c.scores, c.labels)
        plot_roc_curves({self.name: (fpr, tpr, report["auc"]["value"])}, self.output_dir / f"{self.name}_roc.png",
                        title=f"{self.name}: n={report['n']} ({report['n_malignant']} malignant)",
                        points={self.name: (1 - report["specificity"]["value"], report["sensitivity"]["value"])})
        logger.info("%s: AUC %.3f [%.3f, %.3f], sensitivity %.3f, specificity %.3f at threshold %.3f", self.name,
                    report["auc"]["value"], *report["auc"]["ci95"], report["sensitivity"]["value"],
                    report["specificity"]["value"], threshold)


class AttentionOverlayWriter:
    """Save each case's [CLS]-to-patch attention on its input grid as ``<id>_attention.nii.gz`` (sums to
    1 over the volume, same affine as the preprocessed input, so it overlays the CT in any viewer),
    the preprocessed input as ``<id>_input.nii.gz``, and a PNG montage ``<id>_attention.png``.

    Args:
        network: a :class:`~dagman_components.classification.NoduleClassifier`.
        output_dir: folder of the files.
        image_key: item key of the network input.
        id_key: item key of the case id.
        n_slices: panels of the montage.
        save_input: also save the preprocessed input.
        mask_key: item key of a nodule mask on the input grid; its outline is drawn when present.
    """

    def __init__(self, network: nn.Module, output_dir: str | os.PathLike, image_key: str = "image",
                 id_key: str = "id", n_slices: int = 8, save_input: bool = True, mask_key: str = "mask") -> None:
        self.network = network
        self.output_dir = Path(output_dir)
        self.image_key, self.id_key = image_key, id_key
        self.n_slices = n_slices
        self.save_input = save_input
        self.mask_key = mask_key

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        if not is_main_process():
            return
        net = unwrap(self.network)
        device = next(net.parameters()).device
        items, outputs = _as_list(engine.state.batch), _as_list(engine.state.output)
        images = torch.stack([convert_to_tensor(it[self.image_key], track_meta=False) for it in items]).to(device)
        was_training = net.training
        net.eval()
        attention = net.attention_map(images).cpu().numpy()
        net.train(was_training)
        for i, item in enumerate(items):
            case = str(_scalar(item.get(self.id_key, f"case{engine.state.iteration}_{i}")))
            img = item[self.image_key]
            affine = np.asarray(img.affine) if hasattr(img, "affine") else np.eye(4)
            array = torch.as_tensor(img)[0].cpu().numpy()
            save_nifti_atomic(attention[i, 0], affine, self.output_dir / f"{case}_attention.nii.gz")
            if self.save_input:
                save_nifti_atomic(array, affine, self.output_dir / f"{case}_input.nii.gz")
            prob = torch.as_tensor(outputs[i]["pred"]).reshape(-1)[-1].item() if "pred" in outputs[i] else float("nan")
            mask = item.get(self.mask_key)
            mask = torch.as_tensor(mask)[0].cpu().numpy() if mask is not None and not isinstance(mask, str) else None
            stride = int(net.encoder.sa_stride)
            voxel_mm = np.linalg.norm(affine[:3, :3], axis=0)
            plot_attention_montage(array, attention[i, 0], self.output_dir / f"{case}_attention.png",
                                   title=f"{case}: p(malignant)={prob:.3f}", n_slices=self.n_slices, mask=mask,
                                   sa_grid=[n // stride for n in array.shape],
                                   cell_mm=[round(stride * float(v), 2) for v in voxel_mm])
