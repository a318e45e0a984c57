# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""A DAGMaN encoder as a network that returns one tensor: the embedding of each image.

:class:`SwinDAGMaN` and :class:`ViTDAGMaN` return a dict (``cls``, ``global``, ``s_att``, ...). MONAI's
bundle tools (``verify_net_in_out``, ``ckpt_export``, ``monai.bundle.load``) expect a ``network_def``
whose forward returns a tensor and whose state dict is the weights file's. :class:`EncoderEmbedding`
wraps an encoder so that its forward returns one token, ``(B, C)``, and its state dict has exactly the
encoder's keys (no ``encoder.`` prefix): the flat ``models/model.pt`` of the pretraining bundle loads
into it strictly, and its own ``state_dict()`` saves in that layout. The bundles' pipelines use the
wrapped encoder itself (``network.encoder``) when they need more than one output.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn
from monai.utils import StrEnum, look_up_option

from dagman_components.networks.outputs import EncoderOutput

__all__ = ["EmbeddingToken", "EncoderEmbedding"]

_ENCODER = "encoder."


class EmbeddingToken(StrEnum):
    """The encoder output an :class:`EncoderEmbedding` returns."""

    CLS = EncoderOutput.CLS.value
    GLOBAL = EncoderOutput.GLOBAL.value


def _drop_encoder_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict hook: ``<prefix>encoder.<key>`` becomes ``<prefix><key>`` (order kept)."""
    keys = [k for k in state_dict if k.startswith(prefix)]
    items = OrderedDict((k, state_dict.pop(k)) for k in keys)
    for key, value in items.items():
        rest = key[len(prefix):]
        state_dict[prefix + (rest[len(_ENCODER):] if rest.startswith(_ENCODER) else rest)] = value


def _add_encoder_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load pre-hook: ``<prefix><key>`` becomes ``<prefix>encoder.<key>`` (a prefixed file is taken as it is)."""
    keys = [k for k in state_dict if k.startswith(prefix) and not k[len(prefix):].startswith(_ENCODER)]
    for key in keys:
        state_dict[prefix + _ENCODER + key[len(prefix):]] = state_dict.pop(key)


class EncoderEmbedding(nn.Module):
    """Wrap a DAGMaN encoder so that it returns one embedding tensor per image.

    Args:
        encoder: a :class:`SwinDAGMaN` or :class:`ViTDAGMaN` (any module returning a dict with ``token``).
        token: ``"cls"`` ([CLS] token of the semantic-attention block, ``embed_dim * 2**sa_stage`` wide)
            or ``"global"`` (average-pooled last stage, ``embed_dim * 16`` wide for Swin).

    Raises:
        ValueError: for an unknown ``token``.

    Example:
        >>> from dagman_components.networks import SwinDAGMaN
        >>> net = EncoderEmbedding(SwinDAGMaN(embed_dim=12, num_heads=(3, 3, 3, 3), sa_heads=4))
        >>> net(torch.rand(1, 1, 32, 32, 32)).shape
        torch.Size([1, 96])
        >>> sorted(net.state_dict()) == sorted(net.encoder.state_dict())
        True
    """

    def __init__(self, encoder: nn.Module, token: str = EmbeddingToken.CLS) -> None:
        super().__init__()
        self.token = look_up_option(token, EmbeddingToken)
        self.encoder = encoder
        self.register_state_dict_post_hook(_drop_encoder_prefix)
        self.register_load_state_dict_pre_hook(_add_encoder_prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding of each image, ``(B, C)``.

        Raises:
            ValueError: when the encoder has no such output (``cls`` of an encoder without SA block).
        """
        out = self.encoder(x)
        if self.token.value not in out:
            raise ValueError(f"the encoder returns no '{self.token.value}' token (outputs: {sorted(out)}); "
                             f"use token 'global'.")
        return out[self.token.value]
