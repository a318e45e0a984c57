# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Handlers of the segmentation bundle: best-metric model saved atomically, curves and Dice plots.

MONAI's ``CheckpointSaver`` writes ``model.pt`` in place after deleting the previous best, so a
kill at the wrong moment leaves no model or a truncated one; :class:`BestMetricModelSaver` writes
the same content (``{"model": state_dict}``, what MONAI Label loads) through a temporary file and
a rename.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from dagman_components.atomic import atomic_save, atomic_write_png, atomic_write_text
from dagman_components.distributed import is_main_process
from dagman_components.networks.pretrain import unwrap

__all__ = [
    "BestMetricModelSaver",
    "FinalValidationHandler",
    "SegmentationCurvePlotter",
    "MetricDetailsPlotter",
    "SegmentationProgressBar",
    "handlers_for_rank",
    "CurveHistory",
]

logger = logging.getLogger(__name__)


class BestMetricModelSaver:
    """Save ``save_dict``'s state dicts to ``save_path`` whenever the evaluator's key metric improves.

    Attach it to the validation evaluator. The file holds ``{name: state_dict}`` for each entry of
    ``save_dict`` (``{"model": network}`` gives the ``model`` key MONAI Label and the inference
    config load), wrappers such as ``DistributedDataParallel`` removed, written atomically by rank 0.

    Args:
        save_path: the file (e.g. ``models/model.pt``).
        save_dict: name -> module.
        key_metric_name: metric in ``engine.state.metrics``; default the engine's key metric.
        greater_is_better: whether a larger value is better.
    """

    def __init__(
        self,
        save_path: str | os.PathLike,
        save_dict: Mapping[str, torch.nn.Module],
        key_metric_name: str | None = None,
        greater_is_better: bool = True,
    ) -> None:
        if not save_dict:
            raise ValueError("save_dict must name at least one module to save.")
        self.save_path = Path(save_path)
        self.save_dict = dict(save_dict)
        self.key_metric_name = key_metric_name
        self.sign = 1.0 if greater_is_better else -1.0
        self.best = -math.inf

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        name = self.key_metric_name or getattr(engine.state, "key_metric_name", None)
        if name is None or name not in engine.state.metrics:
            raise KeyError(f"BestMetricModelSaver: metric '{name}' not in the evaluator's metrics "
                           f"{sorted(engine.state.metrics)}; set key_metric_name.")
        value = float(engine.state.metrics[name])
        if math.isnan(value) or self.sign * value <= self.best:
            return
        self.best = self.sign * value
        if is_main_process():
            atomic_save({k: unwrap(v).state_dict() for k, v in self.save_dict.items()}, self.save_path)
            logger.info("new best %s %.4f: saved %s", name, value, self.save_path)

    def state_dict(self) -> dict:
        """The best value so far, for a resumed run."""
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = float(state["best"])


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


class CurveHistory:
    """The training loss per epoch and the validation metric per validated epoch, with
    ``state_dict`` / ``load_state_dict`` for the training checkpoint (a resumed run continues its
    curves, each epoch once)."""

    def __init__(self) -> None:
        self.loss_epochs: list[int] = []
        self.losses: list[float] = []
        self.metric_epochs: list[int] = []
        self.metrics: list[float] = []
        self.metric_label = "validation metric"

    def state_dict(self) -> dict:
        return {"loss_epochs": self.loss_epochs, "losses": self.losses, "metric_epochs": self.metric_epochs,
                "metrics": self.metrics, "metric_label": self.metric_label}

    def load_state_dict(self, state: dict) -> None:
        self.loss_epochs, self.losses = [int(e) for e in state["loss_epochs"]], [float(v) for v in state["losses"]]
        self.metric_epochs, self.metrics = [int(e) for e in state["metric_epochs"]], [float(v) for v in state["metrics"]]
        self.metric_label = str(state["metric_label"])


class SegmentationCurvePlotter:
    """Record the mean training loss per epoch (trainer) and the validation key metric (evaluator),
    and draw both as a PNG with a CSV next to it at every epoch end and at completion.

    Attach it to the trainer; it reads the evaluator's metric after each validation run.

    Args:
        png_path: where the PNG goes (the CSV takes the same name with ``.csv``).
        evaluator: the validation evaluator (``None``: loss only).
        loss_transform: turns the trainer's ``engine.state.output`` into the loss value.
        metric_name: the evaluator metric plotted (default its key metric).
        history: where the curves are kept (a :class:`CurveHistory` that a checkpoint saves, so that a
            resumed run continues them); default a new one.
    """

    def __init__(
        self,
        png_path: str | os.PathLike,
        evaluator: Engine | None = None,
        loss_transform: Callable[[Any], Any] | None = None,
        metric_name: str | None = None,
        history: CurveHistory | None = None,
    ) -> None:
        from monai.handlers import from_engine

        self.png_path = Path(png_path)
        self.evaluator = evaluator
        self.loss_transform = loss_transform or from_engine(["loss"], first=True)
        self.metric_name = metric_name
        self._sum = 0.0
        self._count = 0
        self.history = history if history is not None else CurveHistory()
        self.history.metric_label = metric_name or self.history.metric_label

    def attach(self, engine: Engine) -> None:
        if engine.has_event_handler(self._record, Events.ITERATION_COMPLETED):
            return
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._record)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_done)
        engine.add_event_handler(Events.COMPLETED, self.write)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.COMPLETED, self._read_metric, engine)

    def _read_metric(self, evaluator: Engine, trainer: Engine) -> None:
        name = self.metric_name or getattr(evaluator.state, "key_metric_name", None)
        if name in evaluator.state.metrics:
            self.history.metric_label = name
            self.history.metric_epochs.append(int(trainer.state.epoch))
            self.history.metrics.append(float(evaluator.state.metrics[name]))
            self.write()

    def _record(self, engine: Engine) -> None:
        loss = self.loss_transform(engine.state.output)
        self._sum += float(loss.item() if isinstance(loss, torch.Tensor) else loss)
        self._count += 1

    def _epoch_done(self, engine: Engine) -> None:
        if self._count:
            self.history.loss_epochs.append(int(engine.state.epoch))
            self.history.losses.append(self._sum / self._count)
        self._sum, self._count = 0.0, 0
        self.write()

    def write(self, engine: Engine | None = None) -> None:
        if not self.history.losses or not is_main_process():
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
        ax1.plot(self.history.loss_epochs, self.history.losses, marker="o", ms=3)
        ax1.set(xlabel="epoch", ylabel="training loss (Dice + CE)", title="training loss")
        ax2.plot(self.history.metric_epochs, self.history.metrics, marker="o", ms=3, color="tab:green")
        ax2.set(xlabel="epoch", ylabel=self.history.metric_label, title="validation", ylim=(0, 1))
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_write_png(fig, self.png_path, close=True)
        metric_at = dict(zip(self.history.metric_epochs, self.history.metrics))
        rows = [f"epoch,train_loss,{self.history.metric_label}"]
        rows += [f"{e},{l:.6g},{metric_at.get(e, '')}" for e, l in zip(self.history.loss_epochs, self.history.losses)]
        atomic_write_text("\n".join(rows) + "\n", self.png_path.with_suffix(".csv"))


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
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

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


def handlers_for_rank(
    handlers: Sequence[Any] | None,
    rank: int,
    main_only: Sequence[type] | None = None,
) -> list[Any]:
    """The handlers a process of rank ``rank`` attaches: all on rank 0; on other ranks, all but the
    logging and plotting ones (``main_only``: MONAI's ``StatsHandler`` and ``TensorBoardStatsHandler``,
    and this module's plotters and progress bar), which would repeat or collide across processes.

    Args:
        handlers: the handler list of a config (e.g. ``@train#handlers``).
        rank: the process rank.
        main_only: handler types kept on rank 0 only.

    Returns:
        The handlers to attach.
    """
    if main_only is None:
        from monai.handlers import StatsHandler, TensorBoardStatsHandler

        main_only = (StatsHandler, TensorBoardStatsHandler, SegmentationCurvePlotter, MetricDetailsPlotter,
                     SegmentationProgressBar)
    handlers = list(handlers or [])
    if rank == 0:
        return handlers
    return [h for h in handlers if not isinstance(h, tuple(main_only))]
