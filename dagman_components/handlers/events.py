# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""The events and the one scalar view through which diagnostic handlers hand their results to loggers.

A diagnostic handler keeps what it measured on itself (with ``state_dict`` / ``load_state_dict``, so
a checkpoint can carry it), exposes the numbers it produced during the current iteration as its
``scalars`` (a :class:`DiagnosticSource`), and fires one of these events on the engine it is attached
to when a new result is ready. Nothing is written into ``engine.state`` or the trainer's output.

Two ways to read a handler:

- an event-driven consumer (a test, a script, another handler) subscribes to its event::

    alarm = CollapseAlarm(num_prototypes=65536)
    alarm.attach(trainer)
    trainer.add_event_handler(DiagnosticEvents.COLLAPSE_ALARM, lambda engine: print(alarm.alarms[-1]))

- a per-iteration logger (TensorBoard, MLflow, the loss curves) takes a :class:`LoggedScalars` as its output
  transform: the trainer's own ``scalars`` plus each source's ``scalars`` of that iteration. The
  pretraining ``train.yaml`` names it ``logged_scalars``, with the collapse alarm as its source;
  ``probe.yaml`` adds the probe.

- :attr:`DiagnosticEvents.COLLAPSE_ALARM`: :class:`~dagman_components.handlers.CollapseAlarm` reported
  a collapse; its ``alarms`` lists ``(iteration, term, kind)`` of every report.
- :attr:`DiagnosticEvents.PROBE_RESULT`: :class:`~dagman_components.handlers.probe.FrozenFeatureProbe`
  probed; its ``last_result`` holds the result and ``history`` every probe so far.
- :attr:`DiagnosticEvents.ATTENTION_DIVERSITY`: :class:`~dagman_components.handlers.attention_diversity.
  AttentionDiversityHandler` measured the heads; its ``summary`` holds the last per-stage summary and
  ``epoch`` the epoch it was measured at.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from ignite.engine import Engine, EventEnum

__all__ = ["DiagnosticEvents", "DiagnosticSource", "LoggedScalars", "register_diagnostic_events"]


class DiagnosticEvents(EventEnum):
    """Fired by the diagnostic handlers when a result is ready (see the module docstring)."""

    COLLAPSE_ALARM = "collapse_alarm"
    ATTENTION_DIVERSITY = "attention_diversity"
    PROBE_RESULT = "probe_result"


def register_diagnostic_events(engine: Engine) -> None:
    """Make ``engine`` know :class:`DiagnosticEvents` (once; a second call changes nothing)."""
    if DiagnosticEvents.COLLAPSE_ALARM not in engine._allowed_events:
        engine.register_events(*DiagnosticEvents)


@runtime_checkable
class DiagnosticSource(Protocol):
    """A handler whose numbers are logged: ``scalars`` holds what it produced during the current iteration
    (empty when it produced nothing then)."""

    @property
    def scalars(self) -> Mapping[str, float]:
        """``name -> value`` of the current iteration."""


class LoggedScalars:
    """What the per-iteration loggers record: the trainer's own ``scalars`` and the diagnostic handlers' ones.

    Use it as the output transform of TensorBoard's, MLflow's and the loss curves' handlers, attached after the
    sources, so an iteration's log holds what the sources produced during it.

    Args:
        sources: the diagnostic handlers read (each a :class:`DiagnosticSource`); a later source's name wins.

    Raises:
        TypeError: for a source without ``scalars``.
    """

    def __init__(self, sources: Sequence[Any] = ()) -> None:
        bad = [type(s).__name__ for s in sources if not isinstance(s, DiagnosticSource)]
        if bad:
            raise TypeError(f"LoggedScalars sources need a 'scalars' attribute; {', '.join(bad)} has none.")
        self.sources = list(sources)

    def __call__(self, output: Any) -> dict[str, Any]:
        """The scalars of this iteration.

        Args:
            output: ``engine.state.output`` (its ``scalars`` dict is read when it has one; it is not changed).

        Returns:
            A new dict: the output's scalars, then every source's.
        """
        own = output.get("scalars") if isinstance(output, Mapping) else None
        merged = dict(own) if isinstance(own, Mapping) else {}
        for source in self.sources:
            merged.update(source.scalars)
        return merged
