"""The one curve writer of the bundles: named series recorded during training, drawn as a PNG with a
CSV of the numbers beside it, both written atomically by rank 0.

* :class:`CurveHistory` holds the series (``state_dict`` / ``load_state_dict``: in a training
  checkpoint, a resumed run continues its curves, each point once).
* :class:`CurveWriter` records into a history and writes ``<png_path>`` and ``<png_path>.csv`` at
  each epoch end, at completion and every ``plot_interval`` iterations; what it records and how the
  PNG is drawn are its two hooks.
* :class:`EpochCurveWriter` (the downstream bundles): the mean training loss per epoch and the
  evaluator's key metric per validation, side by side, panel labels configurable.
* The pretraining bundle's :class:`~dagman_components.handlers.monitoring.LossHistoryPlotter` records
  every loss term and diagnostic per iteration with the same writer, and
  :class:`~dagman_components.handlers.probe.ProbeCurveWriter` draws the in-loop probe's AUC.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from dagman_components.atomic import atomic_write_png, atomic_write_text
from dagman_components.runtime.distributed import is_main_process
from dagman_components.visualize.backend import pyplot

__all__ = ["CurveHistory", "CurveWriter", "EpochCurveWriter"]


class CurveHistory:
    """Named series of ``(x, value)`` points (x: an epoch or an iteration), in the order recorded.

    Args:
        x_name: the CSV header of the x column.
    """

    def __init__(self, x_name: str = "epoch") -> None:
        self.x_name = x_name
        self.series: dict[str, tuple[list[int], list[float]]] = {}

    def add(self, name: str, x: int, value: float) -> None:
        """Append the point ``(x, value)`` to series ``name`` (created when new)."""
        xs, values = self.series.setdefault(name, ([], []))
        xs.append(int(x))
        values.append(float(value))

    def xs(self, name: str) -> list[int]:
        return self.series.get(name, ([], []))[0]

    def values(self, name: str) -> list[float]:
        return self.series.get(name, ([], []))[1]

    def __len__(self) -> int:
        return sum(len(xs) for xs, _ in self.series.values())

    def csv(self, columns: Sequence[str]) -> str:
        """The series ``columns`` as CSV text: one row per x of any of them (ascending), ``.6g`` values,
        empty where a series has no point at that x."""
        at = {name: dict(zip(*self.series.get(name, ([], [])))) for name in columns}
        rows = [",".join([self.x_name, *columns])]
        for x in sorted({x for name in columns for x in at[name]}):
            rows.append(",".join([str(x)] + [f"{at[n][x]:.6g}" if x in at[n] else "" for n in columns]))
        return "\n".join(rows) + "\n"

    def state_dict(self) -> dict:
        return {"x_name": self.x_name, "series": {k: (list(xs), list(v)) for k, (xs, v) in self.series.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.x_name = str(state["x_name"])
        self.series = {str(k): ([int(x) for x in xs], [float(v) for v in vals])
                       for k, (xs, vals) in state["series"].items()}


class CurveWriter:
    """Record series into a :class:`CurveHistory` and write them as ``png_path`` (drawn by :meth:`draw`)
    and ``png_path`` with ``.csv`` (the ``columns``) at each epoch end, at completion and every
    ``plot_interval`` iterations. Rank 0 writes; every rank records.

    Subclasses implement :meth:`record` (called at every iteration) and :meth:`draw`.

    Args:
        png_path: the PNG file; the CSV takes the same name with ``.csv``.
        history: where the series are kept (e.g. an object of the training checkpoint); default a new one.
        plot_interval: iterations between writes (0: epoch ends and completion only).
    """

    x_name = "epoch"

    def __init__(self, png_path: str | os.PathLike, history: CurveHistory | None = None,
                 plot_interval: int = 0) -> None:
        self.png_path = Path(png_path)
        self.history = history if history is not None else CurveHistory(self.x_name)
        self.history.x_name = self.x_name
        self.plot_interval = int(plot_interval)

    def attach(self, engine: Engine) -> None:
        if engine.has_event_handler(self.record, Events.ITERATION_COMPLETED):
            return
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.write)
        if self.plot_interval:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.plot_interval), self.write)

    def record(self, engine: Engine) -> None:
        """Record this iteration's values."""
        raise NotImplementedError

    def epoch_completed(self, engine: Engine) -> None:
        """Write the files (subclasses first close the epoch's points)."""
        self.write()

    def columns(self) -> list[str]:
        """The series written to the CSV, in column order."""
        return list(self.history.series)

    def draw(self, plt: Any) -> Any:
        """The figure of the history (a matplotlib ``Figure``)."""
        raise NotImplementedError

    def write(self, engine: Engine | None = None) -> None:
        """Write the PNG and the CSV (rank 0; nothing before the first point)."""
        if not len(self.history) or not is_main_process():
            return
        atomic_write_png(self.draw(pyplot()), self.png_path, close=True)
        atomic_write_text(self.history.csv(self.columns()), self.png_path.with_suffix(".csv"))

    def state_dict(self) -> dict:
        """The curves so far, for a resumed run to continue them."""
        return self.history.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.history.load_state_dict(state)


def _loss_of(output: Any) -> Any:
    """``loss`` of an engine output: a dict, or a list of dicts (decollated batch) whose first holds it."""
    return (output[0] if isinstance(output, list) else output)["loss"]


class EpochCurveWriter(CurveWriter):
    """The mean training loss per epoch (``train_loss``) and the evaluator's metric after each
    validation, side by side. Attach it to the trainer; it reads the evaluator's metric when the
    evaluator completes, for the trainer's current epoch.

    Args:
        png_path: where the PNG goes (the CSV, columns ``epoch,train_loss,<metric>``, beside it).
        evaluator: the validation evaluator (``None``: loss only).
        metric_name: the evaluator metric plotted (default its key metric).
        loss_transform: turns the trainer's ``engine.state.output`` into the loss (default ``loss``
            of the output, or of its first item for a list).
        history: where the curves are kept (an object of the training checkpoint); default a new one.
        loss_axis: y label of the loss panel.
        loss_title: title of the loss panel.
        metric_axis: y label of the metric panel (default the metric's name).
        metric_title: title of the metric panel.
        metric_ylim: y range of the metric panel (``None``: automatic).
        dpi: resolution of the PNG.
    """

    def __init__(
        self,
        png_path: str | os.PathLike,
        evaluator: Engine | None = None,
        metric_name: str | None = None,
        loss_transform: Callable[[Any], Any] | None = None,
        history: CurveHistory | None = None,
        loss_axis: str = "training loss",
        loss_title: str = "training loss",
        metric_axis: str | None = None,
        metric_title: str = "validation",
        metric_ylim: Sequence[float] | None = (0.0, 1.0),
        dpi: int = 120,
    ) -> None:
        super().__init__(png_path, history)
        self.evaluator = evaluator
        self.metric_name = metric_name
        self.loss_transform = loss_transform or _loss_of
        self.loss_axis, self.loss_title = loss_axis, loss_title
        self.metric_axis, self.metric_title = metric_axis, metric_title
        self.metric_ylim = tuple(metric_ylim) if metric_ylim is not None else None
        self.dpi = dpi
        self._sum, self._count = 0.0, 0

    def attach(self, engine: Engine) -> None:
        if engine.has_event_handler(self.record, Events.ITERATION_COMPLETED):
            return
        super().attach(engine)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.COMPLETED, self._read_metric, engine)

    def _metric(self) -> str | None:
        if self.metric_name:
            return self.metric_name
        return getattr(getattr(self.evaluator, "state", None), "key_metric_name", None)

    def _read_metric(self, evaluator: Engine, trainer: Engine) -> None:
        name = self._metric()
        if name in evaluator.state.metrics:
            self.history.add(name, trainer.state.epoch, float(evaluator.state.metrics[name]))
            self.write()

    def record(self, engine: Engine) -> None:
        loss = self.loss_transform(engine.state.output)
        self._sum += float(loss.detach().item() if isinstance(loss, torch.Tensor) else loss)
        self._count += 1

    def epoch_completed(self, engine: Engine) -> None:
        if self._count:
            self.history.add("train_loss", engine.state.epoch, self._sum / self._count)
        self._sum, self._count = 0.0, 0
        self.write()

    def columns(self) -> list[str]:
        recorded = [name for name in self.history.series if name != "train_loss"]
        return ["train_loss", *(recorded or [self._metric() or "validation metric"])]

    def draw(self, plt: Any) -> Any:
        fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=self.dpi)
        ax_loss.plot(self.history.xs("train_loss"), self.history.values("train_loss"), marker="o", ms=3)
        ax_loss.set(xlabel="epoch", ylabel=self.loss_axis, title=self.loss_title)
        name = self.columns()[1]
        ax_metric.plot(self.history.xs(name), self.history.values(name), marker="o", ms=3, color="tab:green")
        ax_metric.set(xlabel="epoch", ylabel=self.metric_axis or name, title=self.metric_title)
        if self.metric_ylim is not None:
            ax_metric.set_ylim(*self.metric_ylim)
        for ax in (ax_loss, ax_metric):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        return fig

