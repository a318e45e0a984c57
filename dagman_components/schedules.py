"""Pure schedule functions, indexed by the global iteration or the epoch (DINO's convention)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["cosine_schedule", "teacher_temperature_schedule", "linear_warmup_value", "WarmupCosineFactor"]


def cosine_schedule(start: float, end: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``start`` over ``warmup_steps``, then a half cosine from
    ``start`` to ``end`` over the remaining steps.

    Args:
        start: value after warm-up.
        end: final value.
        total_steps: schedule length (>= 1).
        warmup_steps: warm-up length, clipped to ``total_steps``.
        warmup_start: value at step 0 of the warm-up.

    Returns:
        A float array of ``total_steps`` values.

    Raises:
        ValueError: when ``total_steps < 1`` or ``warmup_steps < 0``.
    """
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps}, {warmup_steps}.")
    warmup_steps = min(warmup_steps, total_steps)
    warm = np.linspace(warmup_start, start, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    rest = np.arange(total_steps - warmup_steps)
    span = max(len(rest) - 1, 1)
    cos = end + 0.5 * (start - end) * (1.0 + np.cos(math.pi * rest / span))
    return np.concatenate([warm, cos]).astype(float)


def teacher_temperature_schedule(
    final_temp: float = 0.07, warmup_temp: float = 0.04, warmup_epochs: int = 30, total_epochs: int = 800
) -> np.ndarray:
    """Teacher temperature per epoch: :func:`linear_warmup_value` from ``warmup_temp`` to
    ``final_temp`` over ``warmup_epochs`` (endpoints included), then constant, as an array.

    Returns:
        ``total_epochs`` values; index 0 is the first epoch.
    """
    warmup_epochs = max(0, min(warmup_epochs, total_epochs))
    return np.array([linear_warmup_value(e, warmup_temp, final_temp, warmup_epochs) for e in range(total_epochs)])


def linear_warmup_value(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Value of 0-based ``step`` in a linear ramp from ``start`` to ``end`` over ``warmup_steps`` steps
    (both endpoints included), then ``end``. :func:`teacher_temperature_schedule` is this per epoch.

    Used per optimizer step, so that a schedule does not depend on how many iterations an epoch has.

    Raises:
        ValueError: when ``warmup_steps < 0``.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
    if warmup_steps == 0 or step >= warmup_steps:
        return float(end)
    if warmup_steps == 1:
        return float(start)
    return float(start + (end - start) * max(step, 0) / (warmup_steps - 1))


class WarmupCosineFactor:
    """Multiplicative learning-rate factor for ``torch.optim.lr_scheduler.LambdaLR`` stepped once per
    iteration: linear warm-up from 0 to 1, then cosine from 1 to ``min_factor``.

    A callable object rather than a lambda so that ``LambdaLR.state_dict()`` saves it.

    Args:
        total_iterations: max_epochs * iterations per epoch.
        warmup_iterations: warm-up epochs * iterations per epoch.
        min_factor: final lr / base lr.
    """

    def __init__(self, total_iterations: int, warmup_iterations: int = 0, min_factor: float = 1e-3) -> None:
        if total_iterations < 1:
            raise ValueError(f"total_iterations must be >= 1, got {total_iterations}.")
        self.total_iterations = int(total_iterations)
        self.warmup_iterations = int(min(max(warmup_iterations, 0), total_iterations))
        self.min_factor = float(min_factor)

    def __call__(self, step: int) -> float:
        if step < self.warmup_iterations:
            return (step + 1) / self.warmup_iterations
        span = max(self.total_iterations - self.warmup_iterations - 1, 1)
        t = min(step - self.warmup_iterations, span) / span
        return self.min_factor + 0.5 * (1.0 - self.min_factor) * (1.0 + math.cos(math.pi * t))
