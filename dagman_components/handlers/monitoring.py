"""Monitoring handlers: data-loading wait time, and the loss-curve history with its PNG."""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from ignite.engine import Engine, Events

from dagman_components.weights import atomic_write_text, _atomic_replace

__all__ = ["DataWaitTimer", "LossHistoryPlotter", "LossProgressBar", "plot_loss_history"]


class DataWaitTimer:
    """Measure how long each iteration waited for its batch and what share of the step that is.

    Sets ``engine.state.data_wait_s`` (this iteration), ``engine.state.data_wait_share`` (wait /
    (wait + compute), running over the epoch) and logs the epoch's share at its end, with a warning
    above ``warn_share`` (then use a cached dataset or more workers).

    Args:
        warn_share: share of the step time above which the epoch summary is a warning.
    """

    def __init__(self, warn_share: float = 0.1) -> None:
        self.warn_share = warn_share
        self.logger = logging.getLogger(__name__)
        self._t_get = self._t_done = 0.0
        self._wait = self._total = 0.0

    def attach(self, engine: Engine) -> None:
        if engine.has_event_handler(self._started, Events.GET_BATCH_STARTED):
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._completed)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_done)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._report)

    def _reset(self, engine: Engine) -> None:
        self._wait = self._total = 0.0

    def _started(self, engine: Engine) -> None:
        self._t_get = time.perf_counter()

    def _completed(self, engine: Engine) -> None:
        self._t_done = time.perf_counter()
        engine.state.data_wait_s = self._t_done - self._t_get

    def _iteration_done(self, engine: Engine) -> None:
        wait = float(getattr(engine.state, "data_wait_s", 0.0))
        self._wait += wait
        self._total += time.perf_counter() - self._t_done + wait
        engine.state.data_wait_share = self._wait / self._total if self._total > 0 else 0.0
        if isinstance(engine.state.output, dict) and isinstance(engine.state.output.get("scalars"), dict):
            engine.state.output["scalars"]["data_wait_s"] = wait

    def _report(self, engine: Engine) -> None:
        share = float(getattr(engine.state, "data_wait_share", 0.0))
        log = self.logger.warning if share > self.warn_share else self.logger.info
        log("epoch %d: data loading took %.1f%% of step time (%.2f s waiting in all)", engine.state.epoch,
            100 * share, self._wait)


def plot_loss_history(history: dict[str, list[float]], iterations: Sequence[int], path: str | os.PathLike,
                      title: str = "DAGMaN pretraining") -> None:
    """Plot every logged series against the iteration (total and terms on a log axis) to a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, values in history.items():
        ax.plot(iterations, values, label=name, lw=2.2 if name == "loss" else 1.2)
    if history and all(all(v > 0 for v in vals) for vals in history.values()):
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    _atomic_replace(Path(path), lambda f: f.write(buf.getvalue()))


class LossHistoryPlotter:
    """Record the total loss and each term every iteration and draw the loss curves as a PNG when
    training completes (and at each epoch end, so a long run shows its progress).

    It has ``state_dict`` / ``load_state_dict``: put it in the checkpoint and a resumed run's curve
    continues the killed run's. A CSV of the numbers is written next to the PNG.

    Args:
        png_path: where the PNG goes.
        keys: the names in ``engine.state.output["scalars"]`` to record.
    """

    def __init__(self, png_path: str | os.PathLike,
                 keys: Sequence[str] = ("loss", "loss_amip", "loss_ampd", "loss_aitd", "loss_gitd")) -> None:
        self.png_path = Path(png_path)
        self.keys = list(keys)
        self.iterations: list[int] = []
        self.history: dict[str, list[float]] = {k: [] for k in self.keys}

    def attach(self, engine: Engine) -> None:
        if engine.has_event_handler(self.record, Events.ITERATION_COMPLETED):
            return
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def record(self, engine: Engine) -> None:
        scalars = engine.state.output.get("scalars", {}) if isinstance(engine.state.output, dict) else {}
        self.iterations.append(int(engine.state.iteration))
        for k in self.keys:
            self.history[k].append(float(scalars.get(k, float("nan"))))

    def write(self, engine: Engine | None = None) -> None:
        from dagman_components.handlers.checkpoint import _is_main_process

        if not self.iterations or not _is_main_process():
            return
        plot_loss_history(self.history, self.iterations, self.png_path)
        rows = ["iteration," + ",".join(self.keys)]
        rows += [",".join([str(i)] + [f"{self.history[k][n]:.6g}" for k in self.keys]) for n, i in enumerate(self.iterations)]
        atomic_write_text("\n".join(rows) + "\n", self.png_path.with_suffix(".csv"))

    def state_dict(self) -> dict:
        return {"iterations": list(self.iterations), "history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.iterations = [int(i) for i in state["iterations"]]
        self.history = {k: [float(x) for x in state["history"].get(k, [])] for k in self.keys}


class LossProgressBar:
    """Ignite's tqdm progress bar showing the running loss (attachable from a bundle's handler list).

    Args:
        persist: keep each epoch's bar on screen.
        output_key: the ``engine.state.output`` entry shown.
    """

    def __init__(self, persist: bool = True, output_key: str = "loss") -> None:
        self.persist = persist
        self.output_key = output_key

    def attach(self, engine: Engine) -> None:
        from ignite.handlers import ProgressBar

        ProgressBar(persist=self.persist).attach(
            engine, output_transform=lambda out: {self.output_key: float(out[self.output_key])}
        )
