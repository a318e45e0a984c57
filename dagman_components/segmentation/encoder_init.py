# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Initialise the Swin encoder of MONAI's ``SwinUNETR`` from a DAGMaN ``model.pt``, and say what happened.

``SwinUNETR.swinViT`` is a MONAI ``SwinTransformer`` whose state-dict keys are exactly those of
:class:`~dagman_components.networks.SwinDAGMaN` without ``mask_token`` and the semantic-attention
block ``sa.*`` (which the U-Net decoder does not use). The key mapping is therefore one prefix,
``swinViT.``, applied by :func:`dagman_components.weights.load_pretrained_encoder`; this module adds
the checks that matter for segmentation: the settings in the weights' model card must match the
network's, and the checkpoint must not hold Swin blocks the network lacks (a deeper encoder loads
"completely" into a shallower one otherwise).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn as nn

from dagman_components.networks.pretrain import unwrap
from dagman_components.weights import LoadReport, WeightLoadError, load_pretrained_encoder

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
#: Model-card settings compared with the network (``SwinUNETR`` argument name in brackets when it differs).
_CARD_KEYS = ("in_channels", "embed_dim", "depths", "num_heads", "window_size", "patch_size")


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
        WeightLoadError: naming every differing setting and the card, saying which config values to set.
    """
    where = str(card) if isinstance(card, (str, os.PathLike)) else "the model card"
    if isinstance(card, (str, os.PathLike)):
        try:
            with open(card, encoding="utf-8") as stream:
                card = json.load(stream)
        except (OSError, json.JSONDecodeError) as err:
            raise WeightLoadError(f"cannot read model card '{where}': {err}") from err
    settings = dict(card.get("network", card))  # type: ignore[union-attr]
    own = swin_unetr_encoder_settings(network)
    differences = []
    for key in _CARD_KEYS:
        if key not in settings:
            continue
        theirs = _as_tuple(settings[key])
        mine = own[key]
        if len(theirs) == 1 and len(mine) > 1:  # isotropic window / patch written as one int
            theirs = theirs * len(mine)
        if theirs != mine:
            differences.append(f"{key}: card {list(theirs)} vs network {list(mine)}")
    if differences:
        raise WeightLoadError(
            f"the pretrained encoder's model card '{where}' does not match the network ({'; '.join(differences)}). "
            f"Set the config values (embed_dim, depths, num_heads, window_size, patch_size) to the card's."
        )


def load_swin_unetr_encoder(
    network: nn.Module,
    path: str | os.PathLike,
    min_loaded_fraction: float = 1.0,
    check_card: bool = True,
) -> LoadReport:
    """Load a DAGMaN encoder (``model.pt`` or full pretraining checkpoint) into ``network.swinViT``.

    Args:
        network: a MONAI ``SwinUNETR`` (or a DDP wrapper around one), changed in place.
        path: the pretraining bundle's ``models/model.pt`` (or its ``checkpoint.pt``).
        min_loaded_fraction: smallest share of the ``swinViT`` tensors that must be found (all, by default).
        check_card: compare the settings in ``model_card.json`` beside ``path`` (when present) first.

    Returns:
        The :class:`~dagman_components.weights.LoadReport` (``loaded`` names ``swinViT.*`` tensors;
        ``unexpected`` holds the pretraining-only ``mask_token`` and ``sa.*``).

    Raises:
        WeightLoadError: naming the file when it is missing or unreadable, was saved from another
            architecture, the card disagrees, too little loaded, or it holds Swin tensors the network
            lacks (e.g. a deeper stage).

    Example:
        >>> from monai.networks.nets import SwinUNETR
        >>> net = SwinUNETR(1, 2, feature_size=24, depths=(2, 2, 8, 2), num_heads=(3, 6, 12, 24), window_size=4)
        >>> load_swin_unetr_encoder(net, "bundles/dagman_ct_pretraining/models/model.pt").summary()  # doctest: +SKIP
    """
    target = unwrap(network)
    card_path = os.path.join(os.path.dirname(os.path.abspath(os.fspath(path))), "model_card.json")
    if check_card and os.path.isfile(card_path):
        check_card_matches(target, card_path)
    report = load_pretrained_encoder(
        target, path, key_prefix=SWIN_UNETR_ENCODER_PREFIX, min_loaded_fraction=min_loaded_fraction
    )
    extra_swin = [k for k in report.unexpected if not k.startswith(PRETRAINING_ONLY_PREFIXES)]
    if extra_swin:
        raise WeightLoadError(
            f"'{path}' holds {len(extra_swin)} Swin tensors that the network has no place for (e.g. {extra_swin[:3]}): "
            f"it was pretrained with other depths. Set depths to the model card's."
        )
    logger.info("SwinUNETR encoder initialised from DAGMaN weights: %s", report.summary())
    return report


def init_swin_unetr(network: nn.Module, pretrained_path: str | os.PathLike | None) -> nn.Module:
    """Initialise ``network.swinViT`` from ``pretrained_path``, or keep it random when the path is empty.

    The form a bundle config uses: ``network: $init_swin_unetr(@network_def, @pretrained_encoder).to(@device)``.
    An empty path (``null`` or ``''``) means random initialisation and is logged as such; any other
    path must load (see :func:`load_swin_unetr_encoder`), so a wrong path never trains silently from scratch.

    Args:
        network: a MONAI ``SwinUNETR``.
        pretrained_path: a DAGMaN encoder ``model.pt``, or ``None`` / ``''`` for random initialisation.

    Returns:
        ``network`` itself.

    Raises:
        WeightLoadError: as :func:`load_swin_unetr_encoder`.
    """
    if pretrained_path is None or os.fspath(pretrained_path) == "":
        logger.warning("SwinUNETR encoder randomly initialised (pretrained_encoder is empty).")
        return network
    try:
        load_swin_unetr_encoder(network, pretrained_path)
    except WeightLoadError as err:
        raise WeightLoadError(
            f"{err} (config key 'pretrained_encoder'; set it to '' to train from random initialisation)"
        ) from err
    return network
