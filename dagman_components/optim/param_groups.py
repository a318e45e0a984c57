"""Optimizer parameter groups."""

from __future__ import annotations

import torch.nn as nn

__all__ = ["is_decayed", "layer_decay_param_groups", "param_groups_weight_decay", "swin_dagman_layer_ids"]


def is_decayed(name: str, parameter: nn.Parameter) -> bool:
    """Whether weight decay applies: not to biases, norm weights, tokens or relative-position tables."""
    return not (parameter.ndim <= 1 or name.endswith("token") or "relative_position_bias_table" in name)


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
        if p.requires_grad:
            (decay if is_decayed(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def swin_dagman_layer_ids(encoder: nn.Module) -> dict[str, int]:
    """Depth of each parameter of a Swin-DAGMaN encoder in the order the forward pass reaches it,
    for layer-wise learning-rate decay (BEiT / MAE fine-tuning).

    Patch embedding and mask token are layer 0; Swin block ``j`` counts 1, 2, ... across the stages,
    each stage's patch merging shares the depth of its last block; the semantic-attention block
    (its [CLS] token, blocks and norm) comes after the stage ``sa_stage`` that feeds it and before
    the next stage.

    Args:
        encoder: a :class:`~dagman_components.networks.SwinDAGMaN` (``depths``, ``sa_stage``).

    Returns:
        ``parameter name -> depth``; the deepest value is the number of layers.
    """
    depths = []
    while hasattr(encoder, f"layers{len(depths) + 1}"):
        depths.append(len(getattr(encoder, f"layers{len(depths) + 1}")[0].blocks))
    sa_stage = getattr(encoder, "sa_stage", None)
    sa_blocks = len(getattr(getattr(encoder, "sa", None), "blocks", ())) if sa_stage else 0
    first_block: dict[int, int] = {}  # stage -> depth of its first block
    depth = 1
    sa_first = None
    for stage, n in enumerate(depths, start=1):
        first_block[stage] = depth
        depth += n
        if stage == sa_stage:
            sa_first = depth
            depth += sa_blocks
    ids = {}
    for name, _ in encoder.named_parameters():
        parts = name.split(".")
        if parts[0].startswith("layers") and parts[0][6:].isdigit():
            stage = int(parts[0][6:])
            block = int(parts[3]) if len(parts) > 3 and parts[2] == "blocks" else depths[stage - 1] - 1
            ids[name] = first_block[stage] + block
        elif parts[0] == "sa" and sa_first is not None:
            block = int(parts[2]) if len(parts) > 2 and parts[1] == "blocks" else (0 if parts[1] == "cls_token" else sa_blocks - 1)
            ids[name] = sa_first + block
        else:
            ids[name] = 0
    return ids


def layer_decay_param_groups(encoder: nn.Module, lr: float, weight_decay: float, layer_decay: float,
                             head_depth: int | None = None) -> list[dict]:
    """Parameter groups of an encoder with layer-wise learning-rate decay: a parameter at depth ``d``
    (:func:`swin_dagman_layer_ids`) trains at ``lr * layer_decay ** (head_depth - d)``, so the layers
    nearest the head move most (never faster than ``lr``). Each depth is split into
    decayed and not-decayed parameters as :func:`param_groups_weight_decay` splits them.

    Args:
        encoder: the encoder.
        lr: the head's learning rate (depth ``L + extra_depth``).
        weight_decay: decay of the decayed groups.
        layer_decay: factor per layer, in (0, 1]; 1 gives every layer ``lr``.
        head_depth: the head's depth (default one above the deepest parameter; a head on the SA
            block's [CLS] sits one above the SA block, and the later stages get no gradient).

    Returns:
        Non-empty groups with ``lr`` and ``weight_decay`` set, trainable parameters only.

    Raises:
        ValueError: for a ``layer_decay`` outside (0, 1].
    """
    if not 0.0 < float(layer_decay) <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}.")
    ids = swin_dagman_layer_ids(encoder)
    top = int(head_depth) if head_depth is not None else max(ids.values(), default=0) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in encoder.named_parameters():
        if not p.requires_grad:
            continue
        decayed = is_decayed(name, p)
        key = (ids[name], decayed)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decayed else 0.0,
                           "lr": lr * float(layer_decay) ** max(0, top - ids[name])}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]
