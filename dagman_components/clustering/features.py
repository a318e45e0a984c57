# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Features of labelled 3D crops from a frozen Swin-DAGMaN encoder (pretrained or random).

The encoder is built from the pretraining bundle's ``model_card.json`` (so its settings match the
weights) and either filled from ``model.pt`` with
:func:`~dagman_components.weights.load_pretrained_encoder` or left at its seeded random
initialisation, for comparison. It is frozen (``eval()``, no gradients). One crop's feature is
either the [CLS] token of the semantic-attention block (``cls``, width ``embed_dim * 2**sa_stage``)
or the average-pooled last-stage output (``global``, width ``embed_dim * 16``); ``voxels`` is a
baseline without any network (the crop average-pooled to 8^3 and flattened, 512 values).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.utils import StrEnum, look_up_option
from tqdm import tqdm

from dagman_components.data import check_roi_size
from dagman_components.networks import SwinDAGMaN, build_encoder
from dagman_components.weights import LoadReport, WeightLoadError, load_pretrained_encoder, sha256_of

__all__ = ["EncoderInit", "FeatureToken", "build_frozen_encoder", "OrganFeatureExtractor", "VOXEL_GRID"]

logger = logging.getLogger(__name__)

#: Side of the average-pooled grid of the ``voxels`` baseline feature.
VOXEL_GRID = 8


class EncoderInit(StrEnum):
    """Where the frozen encoder's weights come from."""

    PRETRAINED = "pretrained"
    RANDOM = "random"


class FeatureToken(StrEnum):
    """Which output of the encoder is a crop's feature vector."""

    GLOBAL = "global"
    CLS = "cls"
    VOXELS = "voxels"


def build_frozen_encoder(
    init: str = EncoderInit.PRETRAINED,
    model_path: str | os.PathLike | None = None,
    model_card: str | os.PathLike | Mapping[str, Any] | None = None,
    seed: int = 0,
    **overrides: Any,
) -> SwinDAGMaN:
    """A :class:`SwinDAGMaN` with pretrained or seeded random weights, frozen, in ``eval`` mode.

    The architecture comes from ``model_card`` (a ``model_card.json`` path or its dict) on top of
    the encoder defaults, with ``overrides`` last. With ``init="random"`` a card that does not
    exist is allowed (the defaults and overrides are used), so that random features can be had
    without any pretraining; when the card exists, the random encoder has the pretrained one's
    architecture, which is the like-for-like comparison.

    Args:
        init: ``"pretrained"`` (load ``model_path``) or ``"random"``.
        model_path: the pretraining bundle's ``models/model.pt`` (or a full checkpoint).
        model_card: encoder settings; by default ``model_card.json`` beside ``model_path``.
        seed: seed of the random initialisation (``torch.manual_seed`` before building).
        overrides: encoder settings overriding the card (e.g. ``embed_dim``, ``num_heads``).

    Returns:
        The frozen encoder (``requires_grad`` off for every parameter), with the
        :class:`~dagman_components.weights.LoadReport` in ``encoder.load_report`` (``None`` for random)
        and the weights' sha256 in ``encoder.weights_sha256``.

    Raises:
        WeightLoadError: ``init="pretrained"`` and ``model_path`` is missing, unreadable or from
            another architecture (the message says to set ``init: random`` to go without weights).
        FileNotFoundError: ``init="pretrained"`` and the model card named does not exist.
        ValueError: an unknown ``init`` or override.

    Example:
        >>> enc = build_frozen_encoder("random", embed_dim=12, num_heads=(3, 3, 3, 3))
        >>> enc.out_dim, enc.training
        (192, False)
    """
    init = look_up_option(init, EncoderInit)
    if model_card is None and model_path is not None:
        model_card = os.path.join(os.path.dirname(os.fspath(model_path)), "model_card.json")
    if init == EncoderInit.PRETRAINED:
        if model_path is None or not os.path.isfile(model_path):
            raise WeightLoadError(
                f"pretrained encoder weights '{model_path}' do not exist: run the pretraining bundle "
                "(bundles/dagman_ct_pretraining) and copy its models/model.pt and models/model_card.json here, "
                "pass --model_path <path to model.pt>, or set --init random for a randomly initialised encoder."
            )
    card = model_card
    if isinstance(card, (str, os.PathLike)) and not os.path.isfile(card):
        if init == EncoderInit.PRETRAINED:
            raise FileNotFoundError(
                f"model card '{card}' does not exist; the pretraining bundle writes it beside model.pt. Copy it, "
                "or pass --model_card <path>."
            )
        logger.info("no model card at %s: the random encoder uses the default settings and overrides", card)
        card = None
    torch.manual_seed(int(seed))
    encoder = build_encoder(card, drop_path_rate=0.0, **overrides)
    report: LoadReport | None = None
    digest = None
    if init == EncoderInit.PRETRAINED:
        report = load_pretrained_encoder(encoder, model_path, min_loaded_fraction=1.0)
        digest = sha256_of(model_path)
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    encoder.load_report = report  # type: ignore[attr-defined]
    encoder.weights_sha256 = digest  # type: ignore[attr-defined]
    encoder.init = str(init)  # type: ignore[attr-defined]
    return encoder


class OrganFeatureExtractor:
    """Compute one feature vector per crop with a frozen encoder.

    Each crop, float in [0, 1] (``uint8`` crops are divided by 255 as MedMNIST does), is resized
    with trilinear interpolation to ``roi_size`` when its shape differs (e.g. OrganMNIST3D's 28^3
    to 32^3, since the encoder needs sides divisible by 32), then encoded in batches under
    ``torch.inference_mode``.

    Args:
        token: ``"global"``, ``"cls"`` or ``"voxels"`` (see the module docstring).
        roi_size: the encoder input size, every side divisible by 32.
        batch_size: crops per forward pass.
        device: where to run the encoder.
        progress: show a tqdm progress bar.

    Raises:
        ValueError: for an unknown token, an invalid ``roi_size`` or ``batch_size < 1``.

    Example:
        >>> extract = OrganFeatureExtractor("global", roi_size=32)
        >>> feats = extract(build_frozen_encoder("random", embed_dim=12, num_heads=(3, 3, 3, 3)),
        ...                 np.zeros((2, 28, 28, 28), np.uint8))
        >>> feats.shape
        (2, 192)
    """

    def __init__(
        self,
        token: str = FeatureToken.GLOBAL,
        roi_size: int | Sequence[int] = 32,
        batch_size: int = 16,
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> None:
        self.token = look_up_option(token, FeatureToken)
        self.roi_size = check_roi_size(roi_size, key="roi_size")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.progress = progress

    def feature_dim(self, encoder: nn.Module | None) -> int:
        """Width of the feature vector for ``encoder``."""
        if self.token == FeatureToken.VOXELS:
            return VOXEL_GRID**3
        return int(encoder.sa_dim if self.token == FeatureToken.CLS else encoder.out_dim)  # type: ignore[union-attr]

    def _prepare(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(batch)).unsqueeze(1)
        x = x.float() / 255.0 if batch.dtype == np.uint8 else x.float()
        if tuple(x.shape[2:]) != self.roi_size:
            x = F.interpolate(x, size=self.roi_size, mode="trilinear", align_corners=False)
        return x

    @torch.inference_mode()
    def __call__(self, encoder: nn.Module | None, images: np.ndarray) -> np.ndarray:
        """Features of ``images``.

        Args:
            encoder: a frozen :class:`SwinDAGMaN` (ignored, may be ``None``, for ``voxels``).
            images: ``(N, D, H, W)`` crops, ``uint8`` or float in [0, 1].

        Returns:
            ``(N, feature_dim)`` float32 features.

        Raises:
            ValueError: when ``images`` is not 4D.
        """
        if images.ndim != 4:
            raise ValueError(f"images must be (N, D, H, W), got shape {images.shape}.")
        if encoder is not None and self.token != FeatureToken.VOXELS:
            encoder = encoder.to(self.device).eval()
        chunks = []
        starts = range(0, images.shape[0], self.batch_size)
        for start in tqdm(starts, desc=f"features ({self.token})", disable=not self.progress, unit="batch"):
            x = self._prepare(images[start : start + self.batch_size])
            if self.token == FeatureToken.VOXELS:
                f = F.adaptive_avg_pool3d(x, VOXEL_GRID).flatten(1)
            else:
                f = encoder(x.to(self.device))[str(self.token)]  # type: ignore[misc]
            chunks.append(f.float().cpu().numpy())
        if not chunks:
            return np.zeros((0, self.feature_dim(encoder)), np.float32)
        return np.concatenate(chunks).astype(np.float32)
