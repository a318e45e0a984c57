"""The optimizer's learning rate and weight decay set from precomputed schedules before each step."""

from __future__ import annotations

from collections.abc import Sequence

from ignite.engine import Engine, Events
from torch.optim import Optimizer

from dagman_components.optim.schedules import value_at

__all__ = ["OptimizerSchedule"]


class OptimizerSchedule:
    """Before each optimizer step (``ITERATION_STARTED``), set the learning rate and weight decay of
    ``optimizer``'s parameter groups from schedules precomputed per optimizer step
    (:mod:`dagman_components.optim.schedules`), DINO style.

    The values are functions of ``engine.state.iteration`` only, so a resumed run continues on the same
    curves and nothing needs saving. A group whose learning rate differs from the first group's when
    the handler is built keeps that ratio; only the groups with ``weight_decay`` > 0 then are decayed
    (biases, norms, tokens stay at 0).

    Args:
        optimizer: the trainer's optimizer.
        lr: learning rate per optimizer step (of the first group); ``None`` leaves the rates as they are.
        weight_decay: weight decay per optimizer step; ``None`` leaves the decay as it is.

    Raises:
        ValueError: for an empty schedule or a negative weight decay.
    """

    def __init__(self, optimizer: Optimizer, lr: Sequence[float] | None = None,
                 weight_decay: Sequence[float] | None = None) -> None:
        for name, values in (("lr", lr), ("weight_decay", weight_decay)):
            if values is not None and len(values) == 0:
                raise ValueError(f"the {name} schedule is empty: it needs one value per optimizer step.")
        if weight_decay is not None and min(weight_decay) < 0:
            raise ValueError(f"weight decay must be >= 0, got a schedule down to {min(weight_decay)}.")
        self.optimizer = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        first = float(optimizer.param_groups[0]["lr"])
        self.lr_scales = [float(g["lr"]) / first if first else 1.0 for g in optimizer.param_groups]
        self.decayed = [i for i, g in enumerate(optimizer.param_groups) if g.get("weight_decay", 0.0) > 0.0]

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.ITERATION_STARTED):
            engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        groups = self.optimizer.param_groups
        if self.lr is not None:
            lr = value_at(self.lr, engine.state.iteration)
            for group, scale in zip(groups, self.lr_scales):
                group["lr"] = lr if scale == 1.0 else lr * scale
        if self.weight_decay is not None:
            wd = value_at(self.weight_decay, engine.state.iteration)
            for i in self.decayed:
                groups[i]["weight_decay"] = wd
