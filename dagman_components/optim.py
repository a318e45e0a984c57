"""Optimizer parameter groups."""

from __future__ import annotations

import torch.nn as nn

__all__ = ["param_groups_weight_decay"]


def param_groups_weight_decay(network: nn.Module, weight_decay: float = 0.05) -> list[dict]:
    """Split trainable parameters into a decayed group and a group without weight decay (biases,
    normalisation weights, the mask and [CLS] tokens, Swin's relative-position tables), as DINO and
    timm do.

    Args:
        network: the model (DDP-wrapped or not).
        weight_decay: decay of the first group.

    Returns:
        Two parameter groups for a ``torch.optim`` optimizer.
    """
    decay, no_decay = [], []
    for name, p in network.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith("token") or "relative_position_bias_table" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
