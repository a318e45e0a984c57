"""Schedules precomputed per optimizer step, DINO style: one array per scheduled value (learning rate,
weight decay, teacher EMA momentum, teacher temperature), built here from config values and given to
the trainer and the handlers that use them as constructor arguments. Index ``i`` is the 0-based
optimizer step, so the value of the engine's 1-based ``iteration`` is :func:`value_at`; with gradient
accumulation one iteration is one optimizer step, and a resumed run continues on the same curves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "cosine_schedule",
    "warmup_cosine_schedule",
    "linear_warmup_schedule",
    "teacher_temperature_schedule",
    "teacher_momentum_schedule",
    "ema_momentum",
    "linear_warmup_value",
    "value_at",
    "WarmupCosineFactor",
]


def value_at(schedule: Sequence[float], iteration: int) -> float:
    """The value of the 1-based optimizer step ``iteration`` (the last value after the schedule's end).

    Raises:
        ValueError: for an empty schedule.
    """
    if len(schedule) == 0:
        raise ValueError("the schedule is empty: it needs at least one optimizer step.")
    return float(schedule[min(max(int(iteration), 1), len(schedule)) - 1])


def cosine_schedule(start: float, end: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``start`` over ``warmup_steps``, then a half cosine from
    ``start`` to ``end`` over the remaining steps (e.g. the weight decay, 0.04 to 0.4).

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


def warmup_cosine_schedule(base_value: float, total_steps: int, warmup_steps: int = 0,
                           min_factor: float = 1e-3) -> np.ndarray:
    """The learning rate per optimizer step: ``base_value`` times :class:`WarmupCosineFactor` (linear
    warm-up from ``base_value / warmup_steps`` to ``base_value``, then cosine to ``min_factor * base_value``).

    Args:
        base_value: the peak value (the configured learning rate).
        total_steps: optimizer steps of the run (>= 1).
        warmup_steps: steps of the warm-up.
        min_factor: final value / ``base_value``.

    Returns:
        A float array of ``total_steps`` values.
    """
    factor = WarmupCosineFactor(total_steps, warmup_steps, min_factor)
    return np.array([base_value * factor(step) for step in range(int(total_steps))], dtype=float)


def linear_warmup_schedule(start: float, end: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """:func:`linear_warmup_value` for each of ``total_steps`` steps: ``start`` to ``end`` over
    ``warmup_steps`` (both endpoints included), then ``end``.

    Raises:
        ValueError: when ``total_steps < 1`` or ``warmup_steps < 0``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
    return np.array([linear_warmup_value(s, start, end, warmup_steps) for s in range(int(total_steps))], dtype=float)


def teacher_temperature_schedule(final_temp: float = 0.07, warmup_temp: float = 0.04, warmup_steps: int = 0,
                                 total_steps: int = 1) -> np.ndarray:
    """Teacher temperature per optimizer step: a linear warm-up from ``warmup_temp`` to ``final_temp``
    over ``warmup_steps`` (:func:`linear_warmup_schedule`), then constant."""
    return linear_warmup_schedule(warmup_temp, final_temp, max(0, int(warmup_steps)), total_steps)


def ema_momentum(iteration: int, total_iterations: int, base: float = 0.996, final: float = 1.0) -> float:
    """Cosine momentum ``final - (final - base) * (cos(pi * k / K) + 1) / 2`` for the 0-based global
    iteration ``k`` of ``K``: ``base`` at k = 0, ``final`` at k = K.

    Raises:
        ValueError: when ``total_iterations < 1``.
    """
    import torch

    if total_iterations < 1:
        raise ValueError(f"total_iterations must be >= 1, got {total_iterations}.")
    k = min(max(iteration, 0), total_iterations)
    return final - (final - base) * (torch.cos(torch.tensor(torch.pi * k / total_iterations)).item() + 1.0) / 2.0


def teacher_momentum_schedule(base: float = 0.996, final: float = 1.0, total_steps: int = 1) -> np.ndarray:
    """Teacher EMA momentum per optimizer step (DINO): :func:`ema_momentum` of steps 0 .. ``total_steps`` - 1.

    Raises:
        ValueError: unless ``0 <= base <= final <= 1``, or when ``total_steps < 1``.
    """
    if not 0.0 <= base <= final <= 1.0:
        raise ValueError(f"need 0 <= base_momentum <= final_momentum <= 1, got {base}, {final}.")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
    return np.array([ema_momentum(k, int(total_steps), base, final) for k in range(int(total_steps))], dtype=float)


def linear_warmup_value(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Value of 0-based ``step`` in a linear ramp from ``start`` to ``end`` over ``warmup_steps`` steps
    (both endpoints included), then ``end``.

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
    """Learning-rate factor of the 0-based optimizer step: linear warm-up to 1 (``1 / warmup`` at step 0),
    then cosine from 1 to ``min_factor``; :func:`warmup_cosine_schedule` precomputes it for every step.
    (Also usable as a ``LambdaLR`` factor stepped once per iteration: a callable object, so it is saved.)

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
