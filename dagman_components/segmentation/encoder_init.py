# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Initialise the Swin encoder of MONAI's ``SwinUNETR`` from a DAGMaN ``model.pt``, and say what happened.

``SwinUNETR.swinViT`` is a MONAI ``SwinTransformer`` whose state-dict keys are exactly those of
:class:`~dagman_components.networks.SwinDAGMaN` without ``mask_token`` and the semantic-attention
block ``sa.*`` (which the U-Net decoder does not use). The key mapping is therefore one prefix,
``swinViT.``, applied by :func:`dagman_components.weights.encoder_io.load_encoder_weights` (which also refuses
Swin blocks the network lacks); this module adds the check that the settings in the weights' model
card match the network's. The bundle builds the network from that card in the first place.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn as nn

from dagman_components.weights.encoder_io import (
    card_path,
    encoder_settings,
    load_encoder_weights,
    require_weights,
    weights_or_random,
)
from dagman_components.networks.pretrain import unwrap
from dagman_components.weights.state_dict import LoadReport

__all__ = [
    "SWIN_UNETR_ENCODER_PREFIX",
    "PRETRAINING_ONLY_PREFIXES",
    "swin_unetr_encoder_settings",
    "check_card_matches",
    "load_swin_unetr_encoder",
    "init_swin_unetr",
]

logger = logging.getLogger(__name__)

#: Where the encoder lives in MONAI's ``SwinUNETR``.
SWIN_UNETR_ENCODER_PREFIX = "swinViT."
#: Encoder tensors of a DAGMaN ``model.pt`` that ``SwinUNETR`` has no place for (expected as unexpected).
PRETRAINING_ONLY_PREFIXES: tuple[str, ...] = ("mask_token", "sa.")


def _as_tuple(value: Any) -> tuple:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(int(v) for v in value)
    return (int(value),)


def swin_unetr_encoder_settings(network: nn.Module) -> dict[str, tuple]:
    """The Swin settings of a ``SwinUNETR`` (or a DDP wrapper around one), under the model card's names.

    Args:
        network: a MONAI ``SwinUNETR``.

    Returns:
        ``in_channels``, ``embed_dim``, ``depths``, ``num_heads``, ``window_size``, ``patch_size``,
        each as a tuple of ints (``window_size`` and ``patch_size`` per axis).

    Raises:
        TypeError: when ``network`` has no ``swinViT`` encoder.
    """
    swin = getattr(unwrap(network), "swinViT", None)
    if swin is None:
        raise TypeError(f"expected a MONAI SwinUNETR (with a 'swinViT' encoder), got {type(unwrap(network)).__name__}.")
    layers = [getattr(swin, f"layers{i}")[0] for i in range(1, swin.num_layers + 1)]
    return {
        "in_channels": (int(swin.patch_embed.proj.in_channels),),
        "embed_dim": (int(swin.embed_dim),),
        "depths": tuple(len(layer.blocks) for layer in layers),
        "num_heads": tuple(int(layer.blocks[0].attn.num_heads) for layer in layers),
        "window_size": _as_tuple(swin.window_size),
        "patch_size": _as_tuple(swin.patch_size),
    }


def check_card_matches(network: nn.Module, card: Mapping[str, Any] | str | os.PathLike) -> None:
    """Raise when the network's Swin settings differ from the pretrained weights' model card.

    Args:
        network: a MONAI ``SwinUNETR``.
        card: a ``model_card.json`` path or its content (settings under ``network``).

    Raises:
        dagman_components.weights.encoder_io.EncoderSettingError: naming the first differing setting, both
            values and the card.
    """
    own = swin_unetr_encoder_settings(network)
    own_scalars = {k: (v[0] if k in ("in_channels", "embed_dim") else list(v)) for k, v in own.items()}
    encoder_settings(card, **own_scalars)


def load_swin_unetr_encoder(network: nn.Module, path: str | os.PathLike, check_card: bool = True) -> LoadReport:
    """Load a DAGMaN encoder (``model.pt`` or full pretraining checkpoint) into ``network.swinViT``.

    The policy is :func:`dagman_components.weights.encoder_io.load_encoder_weights`: every ``swinViT`` tensor
    found with its shape, and nothing left over but the pretraining-only ``mask_token`` and ``sa.*``.

    Args:
        network: a MONAI ``SwinUNETR`` (or a DDP wrapper around one), changed in place.
        path: the pretraining bundle's ``models/model.pt`` (or its ``checkpoint.pt``).
        check_card: compare the settings in ``model_card.json`` beside ``path`` (when present) first.

    Returns:
        The :class:`~dagman_components.weights.state_dict.LoadReport` (``loaded`` names ``swinViT.*`` tensors;
        ``unexpected`` holds the pretraining-only ``mask_token`` and ``sa.*``).

    Raises:
        FileNotFoundError: the file is missing (the message names the command that makes it).
        dagman_components.weights.encoder_io.EncoderSettingError: the card disagrees with the network.
        WeightLoadError: unreadable file, another architecture, or Swin tensors the network lacks.

    Example:
        >>> from monai.networks.nets import SwinUNETR
        >>> net = SwinUNETR(1, 2, feature_size=24, depths=(2, 2, 8, 2), num_heads=(3, 6, 12, 24), window_size=4)
        >>> load_swin_unetr_encoder(net, "bundles/dagman_ct_pretraining/models/model.pt").summary()  # doctest: +SKIP
    """
    target = unwrap(network)
    card = card_path(path)
    if check_card and card.is_file():
        check_card_matches(target, card)
    report = load_encoder_weights(
        target, path, key_prefix=SWIN_UNETR_ENCODER_PREFIX, unused_prefixes=PRETRAINING_ONLY_PREFIXES
    )
    logger.info("SwinUNETR encoder initialised from DAGMaN weights: %s", report.summary())
    return report


def init_swin_unetr(network: nn.Module, pretrained_path: str | os.PathLike | None) -> nn.Module:
    """Initialise ``network.swinViT`` from ``pretrained_path``, or keep it random when it is ``None``.

    The form a bundle config uses: ``network: $init_swin_unetr(@network_def, @pretrained_encoder).to(@device)``.
    ``None`` (``null`` in YAML) means random initialisation and is logged as such; other spellings
    of "random" are refused (:func:`~dagman_components.weights.encoder_io.weights_or_random`), and any path
    must load (see :func:`load_swin_unetr_encoder`), so a wrong path never trains silently from scratch.

    Args:
        network: a MONAI ``SwinUNETR``.
        pretrained_path: a DAGMaN encoder ``model.pt``, or ``None`` for random initialisation.

    Returns:
        ``network`` itself.

    Raises:
        FileNotFoundError, EncoderSettingError, WeightLoadError: as :func:`load_swin_unetr_encoder`.
    """
    path = weights_or_random(pretrained_path, "pretrained_encoder")
    if path is None:
        return network
    require_weights(path, key="pretrained_encoder")
    load_swin_unetr_encoder(network, path)
    return network
