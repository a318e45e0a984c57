# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Nodule classifier: the Swin-DAGMaN encoder plus one linear head, for linear probing or fine-tuning.

The encoder is held as ``encoder`` so that DAGMaN weights load with key prefix ``encoder.`` (see
:func:`dagman_components.weights.encoder_io.with_encoder_weights`); the bundle builds it with :func:`dagman_components.weights.encoder_io.build_encoder`
from the weights' model card.
The head reads the [CLS] token of the semantic-attention block (width ``embed_dim * 2**sa_stage``)
or the average-pooled last Swin stage (``embed_dim * 16``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
import torch.nn as nn
from monai.utils import StrEnum, look_up_option

from dagman_components.networks import SwinDAGMaN, unwrap
from dagman_components.networks.attention_map import attention_to_voxels
from dagman_components.optim.param_groups import layer_decay_param_groups, param_groups_weight_decay, swin_dagman_layer_ids
from dagman_components.weights.encoder_io import EncoderOutput

__all__ = ["ClassifierMode", "HeadToken", "NoduleClassifier", "classifier_param_groups"]

logger = logging.getLogger(__name__)


class ClassifierMode(StrEnum):
    """``linear_probe``: encoder frozen and kept in eval mode, only the head trains.
    ``finetune``: every parameter trains."""

    LINEAR_PROBE = "linear_probe"
    FINETUNE = "finetune"


class HeadToken(StrEnum):
    """Which encoder output the head reads: the SA block's [CLS] token or the pooled last stage."""

    CLS = EncoderOutput.CLS.value
    GLOBAL = EncoderOutput.GLOBAL.value


class NoduleClassifier(nn.Module):
    """Swin-DAGMaN encoder + linear head giving class logits.

    The head is ``head.norm``, a BatchNorm without learnable parameters (``affine=False``), then
    ``head.fc``, one ``nn.Linear``: the standardisation MAE uses for linear probing. The encoder's
    [CLS] features differ little between nodules compared with their common part (most of a 32 mm
    box is below the HU window), and without it the linear layer needs many more steps to separate
    them. In eval mode the norm is a fixed affine map, so the classifier stays linear in the features.

    In ``linear_probe`` mode the encoder's parameters have ``requires_grad=False``, its forward runs
    without autograd, and ``train()`` leaves it in eval mode (no stochastic depth or dropout), so the
    features are exactly those of the frozen encoder.

    Args:
        encoder: the encoder (built with the pretrained weights' model-card settings).
        num_classes: logits per case (2: benign, malignant).
        token: :class:`HeadToken`.
        mode: :class:`ClassifierMode`.

    Raises:
        ValueError: for an unknown ``token`` or ``mode`` (with the nearest valid value) or ``num_classes < 2``.

    Example:
        >>> net = NoduleClassifier(SwinDAGMaN(embed_dim=12, num_heads=(3, 3, 3, 3)), mode="linear_probe")
        >>> net(torch.rand(2, 1, 32, 32, 32)).shape
        torch.Size([2, 2])
    """

    def __init__(self, encoder: SwinDAGMaN, num_classes: int = 2, token: str = HeadToken.CLS,
                 mode: str = ClassifierMode.FINETUNE) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (softmax logits), got {num_classes}.")
        self.encoder = encoder
        self.token = look_up_option(token, HeadToken)
        width = encoder.sa_dim if self.token == HeadToken.CLS else encoder.out_dim
        self.head = nn.Sequential(
            OrderedDict(norm=nn.BatchNorm1d(width, affine=False), fc=nn.Linear(width, num_classes))
        )
        nn.init.trunc_normal_(self.head.fc.weight, std=0.01)
        nn.init.zeros_(self.head.fc.bias)
        self.mode = ClassifierMode.FINETUNE
        self.set_mode(mode)

    def set_mode(self, mode: str) -> None:
        """Switch between linear probing (freeze the encoder) and fine-tuning (unfreeze it)."""
        self.mode = look_up_option(mode, ClassifierMode)
        self.encoder.requires_grad_(self.mode == ClassifierMode.FINETUNE)
        if self.mode == ClassifierMode.LINEAR_PROBE:
            self.encoder.eval()

    def train(self, mode: bool = True) -> NoduleClassifier:
        super().train(mode)
        if self.mode == ClassifierMode.LINEAR_PROBE:
            self.encoder.eval()
        return self

    def encode(self, x: torch.Tensor) -> dict:
        """The encoder's output dict (see ``SwinDAGMaN.forward``), without autograd in linear probing."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.mode == ClassifierMode.FINETUNE):
            return self.encoder(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input, (B, C)."""
        return self.encode(x)[self.token.value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes) of images (B, 1, D, H, W), sides divisible by 32."""
        return self.head(self.features(x))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """The [CLS]-to-patch attention on the input grid, (B, 1, D, H, W), summing to 1 per case
        (:func:`~dagman_components.classification.attention.attention_to_voxels`)."""
        out = self.encode(x)
        return attention_to_voxels(out[EncoderOutput.S_ATT], out[EncoderOutput.SA_GRID], self.encoder.sa_stride)


def classifier_param_groups(network: nn.Module, lr: float, weight_decay: float = 0.05,
                            encoder_lr_factor: float = 1.0, layer_decay: float | None = None) -> list[dict]:
    """Optimizer groups: head and encoder, each split into decayed / not decayed parameters
    (:func:`~dagman_components.optim.param_groups.param_groups_weight_decay`). The encoder trains at
    ``lr * encoder_lr_factor``, and with ``layer_decay`` each of its layers at that rate times
    ``layer_decay ** (depth of the head - depth of the layer)``
    (:func:`~dagman_components.optim.param_groups.layer_decay_param_groups`; BEiT / MAE use 0.65-0.75). A head on
    the [CLS] token sits one layer above the semantic-attention block. Frozen parameters (linear
    probing) and empty groups are left out.

    Raises:
        ValueError: when nothing is trainable, or for a ``layer_decay`` outside (0, 1].
    """
    net = unwrap(network)
    groups = [{**g, "lr": lr} for g in param_groups_weight_decay(net.head, weight_decay) if g["params"]]
    encoder_lr = lr * encoder_lr_factor
    if layer_decay is None:
        groups += [{**g, "lr": encoder_lr} for g in param_groups_weight_decay(net.encoder, weight_decay) if g["params"]]
    else:
        head_depth = None
        if getattr(net, "token", None) == HeadToken.CLS:
            sa_depths = [d for name, d in swin_dagman_layer_ids(net.encoder).items() if name.startswith("sa.")]
            head_depth = max(sa_depths) + 1 if sa_depths else None
        groups += layer_decay_param_groups(net.encoder, encoder_lr, weight_decay, layer_decay, head_depth)
    if not groups:
        raise ValueError("the network has no trainable parameter.")
    return groups
