"""Optimisation: the optimizer, parameter groups (weight decay, layer-wise lr decay) and per-step schedules.

- :mod:`~dagman_components.optim.optimizers`: the AdamW every bundle trains with (fused kernel where possible);
- :mod:`~dagman_components.optim.param_groups`: which parameters decay, and layer-decay groups;
- :mod:`~dagman_components.optim.schedules`: learning rate, weight decay, teacher momentum and teacher
  temperature, precomputed per optimizer step.
"""

from dagman_components.optim import optimizers, param_groups, schedules

__all__ = ["optimizers", "param_groups", "schedules"]
