"""Monitoring handlers: data-loading wait time, the pretraining loss curves (a
:class:`~dagman_components.handlers.curves.CurveWriter`) and the loss progress bar."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ignite.engine import Engine, Events

from dagman_components.runtime.distributed import is_main_process
from dagman_components.handlers.curves import CurveWriter
from dagman_components.handlers.events import LoggedScalars
from dagman_components.visualize.backend import pyplot
from dagman_components.losses.diagnostics import DIAGNOSTIC_NAMES

__all__ = ["DataWaitTimer", "LossHistoryPlotter", "LossProgressBar", "draw_loss_history", "LOSS_KEYS",
           "DIAGNOSTIC_KEYS"]


class DataWaitTimer:
    """Measure how long each iteration waited for its batch and what share of the step that is, and log
    both itself: the epoch's share at its end (a warning above ``warn_share``: then use a cached dataset
    or more workers) and, with ``log_dir``, each iteration's wait as the TensorBoard scalar
    ``data_wait_s`` (rank 0). The trainer's output is left as it is.

    Args:
        warn_share: share of the step time above which the epoch summary is a warning.
        log_dir: TensorBoard folder of the per-iteration wait; ``None``: the epoch summary only.
    """

    def __init__(self, warn_share: float = 0.1, log_dir: str | os.PathLike | None = None) -> None:
        self.warn_share = warn_share
        self.log_dir = log_dir
        self.logger = logging.getLogger(__name__)
        self._t_get = self._t_done = 0.0
        self._wait = self._total = 0.0
        self.last_wait_s = 0.0
        self._writer: Any = None

    @property
    def share(self) -> float:
        """Waiting share of the step time so far in this epoch."""
        return self._wait / self._total if self._total > 0 else 0.0

    def attach(self, engine: Engine) -> None:
        if engine.has_event_handler(self._started, Events.GET_BATCH_STARTED):
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._completed)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_done)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._report)
        engine.add_event_handler(Events.COMPLETED, self._close)

    def _reset(self, engine: Engine) -> None:
        self._wait = self._total = 0.0

    def _started(self, engine: Engine) -> None:
        self._t_get = time.perf_counter()

    def _completed(self, engine: Engine) -> None:
        self._t_done = time.perf_counter()
        self.last_wait_s = self._t_done - self._t_get

    def _iteration_done(self, engine: Engine) -> None:
        self._wait += self.last_wait_s
        self._total += time.perf_counter() - self._t_done + self.last_wait_s
        if self.log_dir is not None and is_main_process():
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.log_dir))
            self._writer.add_scalar("data_wait_s", self.last_wait_s, engine.state.iteration)

    def _report(self, engine: Engine) -> None:
        log = self.logger.warning if self.share > self.warn_share else self.logger.info
        log("epoch %d: data loading took %.1f%% of step time (%.2f s waiting in all)", engine.state.epoch,
            100 * self.share, self._wait)
        if self._writer is not None:
            self._writer.flush()

    def _close(self, engine: Engine) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


#: The loss series the curves record by default.
LOSS_KEYS = ("loss", "loss_amip", "loss_ampd", "loss_aitd", "loss_gitd", "loss_koleo")
#: The collapse diagnostics the curves record by default (see dagman_components.losses.diagnostics).
DIAGNOSTIC_KEYS = tuple(f"{t}/{n}" for t in ("aitd", "ampd", "gitd") for n in DIAGNOSTIC_NAMES) + (
    "satt/entropy", "satt/max", "satt/log_n", "collapse_alarm")
_TERM_COLOURS = {"aitd": "tab:red", "ampd": "tab:green", "gitd": "tab:purple"}


def _series(history: dict[str, list[float]], key: str) -> list[float] | None:
    values = history.get(key)
    return values if values and any(math.isfinite(v) for v in values) else None


def _plot_diagnostics(axes: Sequence, history: dict[str, list[float]], iterations: Sequence[int],
                      num_prototypes: int | None) -> None:
    """The second panel: target entropies, KL, feature spread / centre norm and S_ATT."""
    ax_h, ax_kl, ax_spread, ax_att = axes
    log_k = math.log(num_prototypes) if num_prototypes else None
    for term, colour in _TERM_COLOURS.items():
        for key, ax, style, label in ((f"{term}/teacher_entropy", ax_h, "-", f"{term} teacher"),
                                      (f"{term}/student_entropy", ax_h, "--", f"{term} student"),
                                      (f"{term}/kl", ax_kl, "-", term), (f"{term}/spread", ax_spread, "-", term),
                                      (f"{term}/center_norm", ax_spread, ":", f"{term} |centre|")):
            values = _series(history, key)
            if values is not None:
                ax.plot(iterations, values, style, color=colour, lw=1.1, label=label)
    if log_k is not None:
        ax_h.axhline(log_k, color="k", lw=0.8, label="ln K")
        ax_h.axhline(0.97 * log_k, color="k", lw=0.8, ls=":", label="alarm 0.97 ln K")
    ax_h.set_title("teacher / student entropy (nats)", fontsize=9)
    ax_kl.set_title("KL(teacher || student) = CE - H(teacher)", fontsize=9)
    ax_spread.set_title("feature spread (1 = isotropic, 0 = collapsed); |centre| dotted", fontsize=9)
    entropy, log_n = _series(history, "satt/entropy"), _series(history, "satt/log_n")
    if entropy is not None and log_n is not None:  # what moves: nats below uniform (0 = uniform attention)
        ax_att.plot(iterations, [n - h for n, h in zip(log_n, entropy)], color="tab:blue", lw=1.1,
                    label="log N - S_ATT entropy (nats, left)")
        ax_att.set_ylim(bottom=0.0)
    peak = _series(history, "satt/max")
    if peak is not None and log_n is not None:  # the largest cell's attention over a uniform cell's (1 = uniform)
        twin = ax_att.twinx()
        twin.plot(iterations, [p * math.exp(n) for p, n in zip(peak, log_n)], color="tab:orange", lw=1.0,
                  label="max S_ATT x N (right)")
        twin.set_ylim(bottom=0.0)
        twin.legend(fontsize=7, loc="lower right")
    ax_att.set_title("[CLS] attention S_ATT", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xlabel("iteration", fontsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2)


def draw_loss_history(history: dict[str, list[float]], iterations: Sequence[int], title: str = "DAGMaN pretraining",
                      num_prototypes: int | None = None) -> Any:
    """The figure of the loss terms against the iteration (log axis when positive) and, when the history
    holds collapse diagnostics, a second panel of them.

    Args:
        history: series name -> one value per iteration (NaN where not logged).
        iterations: the iterations.
        title: figure title.
        num_prototypes: K, for the ln K reference lines of the diagnostics panel.

    Returns:
        A matplotlib ``Figure``.
    """
    plt = pyplot()
    losses = {k: v for k, v in history.items() if k.startswith("loss")}
    with_diagnostics = any(_series(history, k) is not None for k in history if "/" in k)
    if with_diagnostics:
        fig = plt.figure(figsize=(11, 10), dpi=110)
        grid = fig.add_gridspec(3, 2, height_ratios=[1.3, 1, 1])
        ax = fig.add_subplot(grid[0, :])
        _plot_diagnostics([fig.add_subplot(grid[r, c]) for r in (1, 2) for c in (0, 1)], history, iterations,
                          num_prototypes)
    else:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, values in losses.items():
        ax.plot(iterations, values, label=name, lw=2.2 if name == "loss" else 1.2)
    if num_prototypes:
        ax.axhline(math.log(num_prototypes), color="k", lw=0.8, ls="--", label="ln K")
    if losses and all(all(v > 0 for v in vals if math.isfinite(v)) for vals in losses.values()):
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


class LossHistoryPlotter(CurveWriter):
    """Record the total loss, each term and the collapse diagnostics every iteration and draw them as
    a PNG (loss curves, then a panel of diagnostics) when training completes, and at each epoch end
    and every ``plot_interval`` iterations, so a long run shows its progress: the pretraining bundle's
    :class:`~dagman_components.handlers.curves.CurveWriter`.

    It has ``state_dict`` / ``load_state_dict``: put it in the checkpoint and a resumed run's curve
    continues the killed run's. A CSV of the numbers (``iteration`` and one column per key) is written
    next to the PNG.

    Args:
        png_path: where the PNG goes.
        keys: the names to record (missing ones are NaN at that iteration).
        num_prototypes: K of the projection heads (ln K reference lines); ``None`` draws none.
        plot_interval: iterations between redraws (0: epoch ends and completion only).
        scalars: what an iteration's numbers are, from ``engine.state.output``: the bundle's
            :class:`~dagman_components.handlers.events.LoggedScalars` (the trainer's scalars and the
            diagnostic handlers'); ``None`` reads the output's ``scalars`` dict only.
    """

    x_name = "iteration"

    def __init__(self, png_path: str | os.PathLike, keys: Sequence[str] = LOSS_KEYS + DIAGNOSTIC_KEYS,
                 num_prototypes: int | None = None, plot_interval: int = 0,
                 scalars: Callable[[Any], Mapping[str, Any]] | None = None) -> None:
        super().__init__(png_path, plot_interval=plot_interval)
        self.keys = list(keys)
        self.num_prototypes = num_prototypes
        self.scalars = scalars if scalars is not None else LoggedScalars()

    def record(self, engine: Engine) -> None:
        scalars = self.scalars(engine.state.output)
        for k in self.keys:
            self.history.add(k, engine.state.iteration, float(scalars.get(k, float("nan"))))

    def columns(self) -> list[str]:
        return self.keys

    def draw(self, plt: Any) -> Any:
        iterations = self.history.xs(self.keys[0])
        return draw_loss_history({k: self.history.values(k) for k in self.keys}, iterations,
                                 num_prototypes=self.num_prototypes)

    def load_state_dict(self, state: dict) -> None:
        """Restore; series the checkpoint lacks (a key added to ``keys`` since it was written) are NaN-filled."""
        super().load_state_dict(state)
        iterations = max((self.history.xs(k) for k in self.history.series), key=len, default=[])
        for k in self.keys:
            if k not in self.history.series:
                self.history.series[k] = (list(iterations), [float("nan")] * len(iterations))


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
