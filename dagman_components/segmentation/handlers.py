# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Handlers of the segmentation bundle: a last validation, Dice plots and rank filtering.

The best model is saved by :class:`dagman_components.handlers.BestMetricSaver`, the training curves
are drawn by :class:`dagman_components.handlers.EpochCurveWriter`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from dagman_components.atomic import atomic_write_png
from dagman_components.runtime.distributed import is_main_process
from dagman_components.handlers.curves import CurveWriter
from dagman_components.visualize.backend import pyplot

__all__ = [
    "FinalValidationHandler",
    "MetricDetailsPlotter",
    "SegmentationProgressBar",
    "logging_handler_types",
]

logger = logging.getLogger(__name__)


class FinalValidationHandler:
    """Run the validator once more when training completes on an epoch that ``ValidationHandler``
    skipped (``max_epochs`` not a multiple of ``interval``), so that the last epochs are validated
    and the best model is saved even by a run shorter than ``interval`` epochs.

    Args:
        validator: the evaluator that ``ValidationHandler`` runs.
        interval: the ``ValidationHandler``'s epoch interval.
    """

    def __init__(self, validator: Engine, interval: int) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}.")
        self.validator = validator
        self.interval = int(interval)

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.epoch % self.interval:
            self.validator.run(engine.state.epoch)


class MetricDetailsPlotter:
    """After an evaluation, plot the per-case values of a metric (sorted bars, mean line) to a PNG.

    Needs the metric to keep its details (MONAI metrics with ``save_details=True``, the default):
    ``engine.state.metric_details[metric_name]`` of shape (cases, classes).

    Args:
        png_path: where the PNG goes.
        metric_name: the metric.
    """

    def __init__(self, png_path: str | os.PathLike, metric_name: str) -> None:
        self.png_path = Path(png_path)
        self.metric_name = metric_name

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        details = getattr(engine.state, "metric_details", {}).get(self.metric_name)
        if details is None or not is_main_process():
            return
        values = torch.as_tensor(details, dtype=torch.float32).reshape(len(details), -1).nanmean(dim=1)
        values = sorted(v for v in values.tolist() if not math.isnan(v))
        if not values:
            return
        plt = pyplot()
        mean = sum(values) / len(values)
        fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
        ax.bar(range(len(values)), values, color="tab:blue")
        ax.axhline(mean, color="tab:red", lw=1.2, label=f"mean {mean:.3f} (n={len(values)})")
        ax.set(xlabel="case (sorted)", ylabel=self.metric_name, ylim=(0, 1), title=f"{self.metric_name} per case")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        atomic_write_png(fig, self.png_path, close=True)


class SegmentationProgressBar:
    """Ignite's tqdm progress bar with the running loss, for engines whose output is a list of dicts.

    Args:
        output_transform: turns ``engine.state.output`` into the loss (default ``loss`` of the first item).
        persist: keep each epoch's bar on screen.
    """

    def __init__(self, output_transform: Callable[[Any], Any] | None = None, persist: bool = False) -> None:
        from monai.handlers import from_engine

        self.output_transform = output_transform or from_engine(["loss"], first=True)
        self.persist = persist

    def attach(self, engine: Engine) -> None:
        from ignite.handlers import ProgressBar

        def _loss(output: Any) -> dict[str, float]:
            value = self.output_transform(output)
            return {"loss": float(value.item() if isinstance(value, torch.Tensor) else value)}

        ProgressBar(persist=self.persist).attach(engine, output_transform=_loss)


def logging_handler_types() -> tuple[type, ...]:
    """The handler types that run on rank 0 only under DDP (``HandlerGroup(main_process_types=...)`` in
    ``multi_gpu_train.yaml``): MONAI's ``StatsHandler`` and ``TensorBoardStatsHandler``, the curve
    writers, this module's plotter and progress bar, which would repeat or collide across processes."""
    from monai.handlers import StatsHandler, TensorBoardStatsHandler

    return (StatsHandler, TensorBoardStatsHandler, CurveWriter, MetricDetailsPlotter, SegmentationProgressBar)
