"""EMA update of the teacher from the student after each optimizer step, with a precomputed momentum schedule."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from ignite.engine import Engine, Events

from dagman_components.networks.pretrain import unwrap
from dagman_components.optim.schedules import value_at

__all__ = ["TeacherEMAHandler", "ema_update"]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> int:
    """``theta_t = m * theta_t + (1 - m) * theta_s`` for every teacher parameter that the student has
    (the student's reconstruction head has no teacher counterpart).

    Returns:
        The number of parameter tensors updated.

    Raises:
        KeyError: when a teacher parameter has no student counterpart.
    """
    src = dict(unwrap(student).named_parameters())
    targets, sources = [], []
    for name, p in unwrap(teacher).named_parameters():
        if name not in src:
            raise KeyError(f"teacher parameter '{name}' has no student counterpart; build the teacher with make_teacher().")
        targets.append(p)
        sources.append(src[name].detach().to(p.dtype))
    if targets:  # one fused lerp over all tensors: t + (1 - m) * (s - t) == m * t + (1 - m) * s
        torch._foreach_lerp_(targets, sources, 1.0 - momentum)
    return len(targets)


class TeacherEMAHandler:
    """Update the teacher after every optimizer step with the momentum of that step.

    ``momentum`` is precomputed per optimizer step
    (:func:`~dagman_components.optim.schedules.teacher_momentum_schedule`, DINO's cosine); the value of the
    engine's 1-based iteration is used, so a resumed run continues the same schedule. The trainer is
    given the same array to log it.

    Args:
        teacher: the teacher network.
        momentum: EMA momentum per optimizer step.
        student: the student network (DDP-wrapped or not), named explicitly (the engine's network is
            never taken silently).

    Raises:
        ValueError: for an empty schedule or a momentum outside [0, 1].
    """

    def __init__(self, teacher: nn.Module, momentum: Sequence[float], student: nn.Module) -> None:
        if len(momentum) == 0 or not 0.0 <= min(momentum) <= max(momentum) <= 1.0:
            raise ValueError("the teacher momentum schedule needs one value in [0, 1] per optimizer step.")
        self.teacher = teacher
        self.momentum = momentum
        self.student = student

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        ema_update(self.teacher, self.student, value_at(self.momentum, engine.state.iteration))
