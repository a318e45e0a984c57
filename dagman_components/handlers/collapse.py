"""Collapse alarm: a logged warning when a distillation term has collapsed for a while."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from ignite.engine import Engine, Events

from dagman_components.handlers.events import DiagnosticEvents, register_diagnostic_events

__all__ = ["CollapseAlarm", "DISTILLATION_TERMS"]

#: The distillation terms the trainer reports diagnostics for, with what each one distils.
DISTILLATION_TERMS = {"aitd": "[CLS] token", "ampd": "SA patch tokens", "gitd": "global token"}

_ONE_HOT_ADVICE = (
    "Try, one at a time: Sinkhorn-Knopp targets (teacher_targets: sinkhorn), which share the prototypes out within "
    "every batch, a higher teacher temperature (teacher_temp), a higher teacher momentum (base_momentum), "
    "a lower learning rate, or a KoLeo weight (loss_weights.koleo) to spread the features. "
    "See 'Collapse diagnostics and alarm' in the bundle README."
)
_ADVICE = (
    "Try, one at a time: Sinkhorn-Knopp targets (teacher_targets: sinkhorn) instead of centring on small batches, "
    "a lower teacher temperature (teacher_temp / warmup_teacher_temp, e.g. 0.04 -> 0.02), "
    "fewer prototypes (head_out_dim), a lower learning rate or a longer warm-up, a lower start of the "
    "teacher momentum (base_momentum, e.g. 0.99) on short runs, or a larger effective batch "
    "(accumulate_steps); configs/small_cpu.yaml is a recipe that learns on 2 CPU cores. "
    "See 'Collapse diagnostics and alarm' in the bundle README."
)


class CollapseAlarm:
    """Watch the trainer's collapse diagnostics and log a warning when a term has collapsed.

    After ``warmup_iterations`` optimizer steps, a term (aitd, ampd, gitd) is flagged when, for
    ``patience`` consecutive steps,

    - its teacher-target entropy stays above ``entropy_ratio * ln K`` (uniform collapse: the centred,
      sharpened targets are flat), or
    - the spread of its teacher bottleneck features (``<term>/spread``, 1 = spread over the sphere,
      0 = identical) stays below ``min_spread`` (feature collapse), or
    - the entropy of its batch-averaged target (``<term>/batch_entropy``) stays below
      ``min_batch_entropy_ratio * ln K`` (one-hot collapse: every image is sent to the same few prototypes).

    Each episode is reported once, when it starts (a term that recovers and collapses again is
    reported again), with what collapsed, the values and what to try. The handler's ``alarms`` lists
    ``(iteration, term, kind)`` of every warning (kept with the streaks in ``state_dict``), and
    :attr:`~dagman_components.handlers.events.DiagnosticEvents.COLLAPSE_ALARM` is fired on the engine
    after each new warning. Its ``scalars`` (a
    :class:`~dagman_components.handlers.events.DiagnosticSource`) hold ``collapse_alarm``, the number of
    terms in alarm at the current step, which TensorBoard and the loss curves log through
    :class:`~dagman_components.handlers.events.LoggedScalars`.

    Args:
        num_prototypes: K of the projection heads (ln K is the entropy of a uniform target).
        warmup_iterations: steps before the alarm looks (the early phase is noisy by nature).
        entropy_ratio: alarm above this share of ln K (0.97).
        min_spread: alarm below this feature spread.
        min_batch_entropy_ratio: alarm when the batch-averaged target's entropy is below this share of ln K.
        patience: consecutive steps the condition must hold.
        terms: the terms watched (those with a zero loss weight can be left out).

    Raises:
        ValueError: for ``num_prototypes < 2``, an ``entropy_ratio`` outside (0, 1] or ``patience < 1``.
    """

    def __init__(self, num_prototypes: int, warmup_iterations: int = 100, entropy_ratio: float = 0.97,
                 min_spread: float = 0.05, patience: int = 20, min_batch_entropy_ratio: float = 0.1, terms: Sequence[str] = tuple(DISTILLATION_TERMS)) -> None:
        if num_prototypes < 2:
            raise ValueError(f"num_prototypes must be >= 2, got {num_prototypes}.")
        if not 0.0 < entropy_ratio <= 1.0 or patience < 1:
            raise ValueError(f"need 0 < entropy_ratio <= 1 and patience >= 1, got {entropy_ratio}, {patience}.")
        unknown = set(terms) - set(DISTILLATION_TERMS)
        if unknown:
            raise ValueError(f"unknown term(s) {sorted(unknown)}; valid: {list(DISTILLATION_TERMS)}.")
        self.log_k = math.log(num_prototypes)
        self.warmup_iterations = int(warmup_iterations)
        self.entropy_ratio = float(entropy_ratio)
        self.min_spread = float(min_spread)
        self.min_batch_entropy_ratio = float(min_batch_entropy_ratio)
        self.patience = int(patience)
        self.terms = list(terms)
        self.logger = logging.getLogger(__name__)
        self._streak = {(t, kind): 0 for t in self.terms for kind in ("uniform", "feature", "one_hot")}
        self._reported: set[tuple[str, str]] = set()
        #: ``(iteration, term, kind)`` of every warning, in order.
        self.alarms: list[tuple[int, str, str]] = []
        #: ``{"collapse_alarm": terms in alarm}`` at the last step checked (empty before the first).
        self.scalars: dict[str, float] = {}

    def state_dict(self) -> dict:
        """The warnings so far and the running streaks, for a checkpoint."""
        return {"alarms": [list(a) for a in self.alarms], "streak": [[t, k, n] for (t, k), n in self._streak.items()],
                "reported": sorted([t, k] for t, k in self._reported)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s content."""
        self.alarms = [(int(i), str(t), str(k)) for i, t, k in state["alarms"]]
        self._streak.update({(str(t), str(k)): int(n) for t, k, n in state["streak"]})
        self._reported = {(str(t), str(k)) for t, k in state["reported"]}

    def attach(self, engine: Engine) -> None:
        """Check after every iteration; the engine learns :class:`DiagnosticEvents`."""
        register_diagnostic_events(engine)
        if not engine.has_event_handler(self, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _conditions(self, scalars: dict, term: str) -> dict[str, bool]:
        h = float(scalars.get(f"{term}/teacher_entropy", float("nan")))
        spread = float(scalars.get(f"{term}/spread", float("nan")))
        batch = float(scalars.get(f"{term}/batch_entropy", float("nan")))
        return {"uniform": h > self.entropy_ratio * self.log_k, "feature": spread < self.min_spread,
                "one_hot": batch < self.min_batch_entropy_ratio * self.log_k}

    def message(self, term: str, kind: str, scalars: dict, iteration: int) -> str:
        """The warning for one collapsed term."""
        h = float(scalars.get(f"{term}/teacher_entropy", float("nan")))
        spread = float(scalars.get(f"{term}/spread", float("nan")))
        what = DISTILLATION_TERMS[term]
        if kind == "uniform":
            cause = (f"uniform collapse: teacher target entropy {h:.3f} nats = {h / self.log_k:.3f} ln K "
                     f"(> {self.entropy_ratio:g} ln K) for {self.patience} steps, so the {what} targets carry no "
                     f"information and the loss sits at ln K = {self.log_k:.3f}")
        elif kind == "one_hot":
            batch = float(scalars.get(f"{term}/batch_entropy", float("nan")))
            cause = (f"one-hot collapse: the batch-averaged {what} target has entropy {batch:.3f} nats "
                     f"(< {self.min_batch_entropy_ratio:g} ln K) for {self.patience} steps, so every image is sent to the "
                     "same few prototypes and the centre chases them")
        else:
            cause = (f"feature collapse: the teacher's {what} bottleneck features are nearly identical across the "
                     f"batch (spread {spread:.3f} < {self.min_spread:g}) for {self.patience} steps")
        note = " The [CLS] attention that chooses DAGMaN's masks is then untrained." if term == "aitd" else ""
        advice = _ONE_HOT_ADVICE if kind == "one_hot" else _ADVICE
        return f"collapse alarm at iteration {iteration}, {term.upper()}: {cause}.{note} {advice}"

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        scalars = output.get("scalars") if isinstance(output, dict) else None
        if not isinstance(scalars, dict):
            self.scalars = {}
            return
        in_alarm = 0
        reported = len(self.alarms)
        for term in self.terms:
            for kind, holds in self._conditions(scalars, term).items():
                key = (term, kind)
                self._streak[key] = self._streak[key] + 1 if holds else 0
                if not holds:
                    self._reported.discard(key)
                if engine.state.iteration <= self.warmup_iterations or self._streak[key] < self.patience:
                    continue
                in_alarm += 1
                if key not in self._reported:
                    self._reported.add(key)
                    self.logger.warning(self.message(term, kind, scalars, engine.state.iteration))
                    self.alarms.append((int(engine.state.iteration), term, kind))
        self.scalars = {"collapse_alarm": float(in_alarm)}
        if len(self.alarms) > reported:
            engine.fire_event(DiagnosticEvents.COLLAPSE_ALARM)
