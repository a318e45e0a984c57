# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Features of labelled 3D crops from a frozen Swin-DAGMaN encoder (pretrained or random).

The encoder comes from :func:`dagman_components.weights.encoder_io.prepare_encoder`: built from the
pretraining bundle's ``model_card.json`` (so its settings match the weights), filled from
``model.pt`` or, with ``model_path: null``, left at its seeded random initialisation (same card,
like-for-like comparison), and frozen (``eval()``, no gradients). One crop's feature is
either the [CLS] token of the semantic-attention block (``cls``, width ``embed_dim * 2**sa_stage``)
or the average-pooled last-stage output (``global``, width ``embed_dim * 16``); ``voxels`` is a
baseline without any network (the crop average-pooled to 8^3 and flattened, 512 values).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.utils import StrEnum, look_up_option

from dagman_components.data import check_roi_size
from dagman_components.weights.encoder_io import EncoderOutput
from dagman_components.features.frozen_features import frozen_features
from dagman_components.runtime.progress import progress, progress_enabled

__all__ = ["FeatureToken", "OrganFeatureExtractor", "VOXEL_GRID"]

#: Side of the average-pooled grid of the ``voxels`` baseline feature.
VOXEL_GRID = 8


class FeatureToken(StrEnum):
    """Which output of the encoder is a crop's feature vector."""

    GLOBAL = EncoderOutput.GLOBAL.value
    CLS = EncoderOutput.CLS.value
    VOXELS = "voxels"


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
        >>> from dagman_components.weights.encoder_io import prepare_encoder
        >>> feats = extract(prepare_encoder(None, embed_dim=12, num_heads=(3, 3, 3, 3)),
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
            encoder: a frozen encoder (ignored, may be ``None``, for ``voxels``).
            images: ``(N, D, H, W)`` crops, ``uint8`` or float in [0, 1].

        Returns:
            ``(N, feature_dim)`` float32 features.

        Raises:
            ValueError: when ``images`` is not 4D.
        """
        if images.ndim != 4:
            raise ValueError(f"images must be (N, D, H, W), got shape {images.shape}.")
        starts = range(0, images.shape[0], self.batch_size)
        batches = (self._prepare(images[start : start + self.batch_size]) for start in starts)
        if self.token == FeatureToken.VOXELS:
            bar = progress(batches, f"features ({self.token})", total=len(starts), unit="batch", enabled=self.progress)
            chunks = [F.adaptive_avg_pool3d(x, VOXEL_GRID).flatten(1).numpy() for x in bar]
            return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, VOXEL_GRID**3), np.float32)
        if not len(starts):
            return np.zeros((0, self.feature_dim(encoder)), np.float32)
        description = f"features ({self.token})" if progress_enabled(self.progress) else None
        feats = frozen_features(encoder.to(self.device), batches, [str(self.token)], self.device, description,
                                total=len(starts))
        return feats[str(self.token)].numpy().astype(np.float32)
