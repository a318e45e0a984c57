"""Cosine weight-decay schedule (DINO / METHOD.md: 0.04 -> 0.4), precomputed and indexed by the optimizer step."""

from __future__ import annotations

from ignite.engine import Engine, Events
from torch.optim import Optimizer

from dagman_components.schedules import cosine_schedule

__all__ = ["WeightDecaySchedule"]


class WeightDecaySchedule:
    """Set the weight decay of every decayed parameter group (``weight_decay`` > 0 when attached) from a
    half cosine between ``start`` and ``end`` over the run's optimizer steps, before each step.

    The value is a function of ``engine.state.iteration`` only, so a resumed run continues on the same
    curve. Groups without decay (biases, norms, tokens) stay at 0.

    Args:
        optimizer: the trainer's optimizer.
        start: weight decay at the first step.
        end: weight decay at the last step (``end == start``: constant).
        total_iterations: optimizer steps of the whole run (``max_epochs * iterations_per_epoch``).

    Raises:
        ValueError: for a negative decay or ``total_iterations`` < 1.
    """

    def __init__(self, optimizer: Optimizer, start: float, end: float, total_iterations: int) -> None:
        if start < 0 or end < 0:
            raise ValueError(f"weight decay must be >= 0, got {start} -> {end}.")
        self.optimizer = optimizer
        self.values = cosine_schedule(float(start), float(end), int(total_iterations))
        self.decayed = [i for i, g in enumerate(optimizer.param_groups) if g.get("weight_decay", 0.0) > 0.0]

    def value(self, iteration: int) -> float:
        """Weight decay of the 1-based optimizer step ``iteration`` (the last value after the schedule)."""
        return float(self.values[min(max(iteration, 1), len(self.values)) - 1])

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        wd = self.value(engine.state.iteration)
        for i in self.decayed:
            self.optimizer.param_groups[i]["weight_decay"] = wd
        engine.state.weight_decay = wd
