# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""The events through which diagnostic handlers hand their results to loggers.

A diagnostic handler keeps what it measured on itself (with ``state_dict`` / ``load_state_dict``, so
a checkpoint can carry it) and fires one of these events on the engine it is attached to when a new
result is ready; nothing is written into ``engine.state``. A logger (a test, a script, another
handler) subscribes to the event and reads the handler::

    alarm = CollapseAlarm(num_prototypes=65536)
    alarm.attach(trainer)
    trainer.add_event_handler(DiagnosticEvents.COLLAPSE_ALARM, lambda engine: print(alarm.alarms[-1]))

- :attr:`DiagnosticEvents.COLLAPSE_ALARM`: :class:`~dagman_components.handlers.CollapseAlarm` reported
  a collapse; its ``alarms`` lists ``(iteration, term, kind)`` of every report.
- :attr:`DiagnosticEvents.ATTENTION_DIVERSITY`: :class:`~dagman_components.handlers.attention_diversity.
  AttentionDiversityHandler` measured the heads; its ``summary`` holds the last per-stage summary and
  ``epoch`` the epoch it was measured at.
"""

from __future__ import annotations

from ignite.engine import Engine, EventEnum

__all__ = ["DiagnosticEvents", "register_diagnostic_events"]


class DiagnosticEvents(EventEnum):
    """Fired by the diagnostic handlers when a result is ready (see the module docstring)."""

    COLLAPSE_ALARM = "collapse_alarm"
    ATTENTION_DIVERSITY = "attention_diversity"


def register_diagnostic_events(engine: Engine) -> None:
    """Make ``engine`` know :class:`DiagnosticEvents` (once; a second call changes nothing)."""
    if DiagnosticEvents.COLLAPSE_ALARM not in engine._allowed_events:
        engine.register_events(*DiagnosticEvents)
