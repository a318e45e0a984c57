"""EMA update of the teacher from the student, with DINO's cosine momentum over global iterations."""

from __future__ import annotations

import torch
import torch.nn as nn
from ignite.engine import Engine, Events

from dagman_components.networks.pretrain import unwrap

__all__ = ["TeacherEMAHandler", "ema_momentum"]


def ema_momentum(iteration: int, total_iterations: int, base: float = 0.996, final: float = 1.0) -> float:
    """Cosine momentum ``final - (final - base) * (cos(pi * k / K) + 1) / 2`` for the 0-based global
    iteration ``k`` of ``K``: ``base`` at k = 0, ``final`` at k = K.

    Raises:
        ValueError: when ``total_iterations < 1``.
    """
    if total_iterations < 1:
        raise ValueError(f"total_iterations must be >= 1, got {total_iterations}.")
    k = min(max(iteration, 0), total_iterations)
    return final - (final - base) * (torch.cos(torch.tensor(torch.pi * k / total_iterations)).item() + 1.0) / 2.0


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
    """Update the teacher after every optimizer step.

    The momentum of global iteration k (``engine.state.iteration - 1``) follows :func:`ema_momentum`
    over ``max_epochs * epoch_length`` iterations; it is a pure function of the iteration count, so
    a resumed run continues the same schedule. It is stored in ``engine.state.teacher_momentum``
    when the iteration starts (so that it can be logged) and applied when it completes.

    Args:
        teacher: the teacher network.
        student: the student network (DDP-wrapped or not); default: ``engine.network``.
        base_momentum: m at the first iteration (0.996).
        final_momentum: m at the last iteration (1.0).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module | None = None, base_momentum: float = 0.996,
                 final_momentum: float = 1.0) -> None:
        if not 0.0 <= base_momentum <= final_momentum <= 1.0:
            raise ValueError(f"need 0 <= base_momentum <= final_momentum <= 1, got {base_momentum}, {final_momentum}.")
        self.teacher = teacher
        self.student = student
        self.base_momentum = base_momentum
        self.final_momentum = final_momentum

    def attach(self, engine: Engine) -> None:
        """Register on ITERATION_STARTED (momentum) and ITERATION_COMPLETED (update), once."""
        if not engine.has_event_handler(self.set_momentum, Events.ITERATION_STARTED):
            engine.add_event_handler(Events.ITERATION_STARTED, self.set_momentum)
        if not engine.has_event_handler(self, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def momentum(self, engine: Engine) -> float:
        """Momentum of the engine's current iteration."""
        total = int(engine.state.max_epochs) * int(engine.state.epoch_length)
        return ema_momentum(engine.state.iteration - 1, total, self.base_momentum, self.final_momentum)

    def set_momentum(self, engine: Engine) -> None:
        engine.state.teacher_momentum = self.momentum(engine)

    def __call__(self, engine: Engine) -> None:
        student = self.student if self.student is not None else engine.network  # type: ignore[attr-defined]
        ema_update(self.teacher, student, self.momentum(engine))
