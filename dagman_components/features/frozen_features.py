# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""The one loop that runs a frozen encoder over many images and keeps some of its outputs.

Every consumer of frozen features uses it: the in-loop probe of pretraining
(:class:`~dagman_components.handlers.FrozenFeatureProbe`), the cached linear probing of the
classification bundle (:class:`~dagman_components.classification.FrozenFeatureDataset`), the organ
features of the clustering bundle and ``scripts/compare_pretraining.py``. The encoder runs in eval
mode (no stochastic depth, dropout or token dropout) without autograd, and its previous mode is
restored afterwards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.networks.utils import eval_mode
from torch.utils.data import Dataset

from dagman_components.data.resumable import SeededItems, derive_seed
from dagman_components.runtime.progress import progress

__all__ = ["FrozenFeatureDataset", "frozen_features", "image_batches", "module_device"]

logger = logging.getLogger(__name__)


def module_device(module: nn.Module) -> torch.device:
    """The device of the first parameter or buffer of ``module`` (CPU when it has none)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def image_batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive slices of ``batch_size`` images (the last one may be shorter).

    Raises:
        ValueError: when ``batch_size < 1``.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    for start in range(0, len(images), int(batch_size)):
        yield images[start : start + int(batch_size)]


def frozen_features(
    encoder: nn.Module,
    batches: Iterable[torch.Tensor],
    tokens: Sequence[str],
    device: torch.device | str | None = None,
    description: str | None = None,
    total: int | None = None,
) -> dict[str, torch.Tensor]:
    """Outputs ``tokens`` of a frozen encoder for every image of ``batches``, in order.

    Args:
        encoder: a module whose output is a mapping holding each of ``tokens`` as a (B, ...) tensor
            (:class:`~dagman_components.networks.SwinDAGMaN`: ``cls``, ``global``, ...).
        batches: (B, C, D, H, W) image batches (any device and float dtype; moved to ``device`` as float32).
        tokens: the output keys to keep.
        device: where the forward passes run (default: the encoder's device).
        description: label of a progress bar with an ETA (none when ``None``).
        total: number of batches, for the bar when ``batches`` has no length.

    Returns:
        ``token -> (N, ...)`` float32 CPU tensors (empty ``(0,)`` tensors when there is no batch).

    Raises:
        KeyError: when the encoder's output lacks one of ``tokens``; the message lists what it has.

    Example:
        >>> from dagman_components.networks import SwinDAGMaN
        >>> enc = SwinDAGMaN(embed_dim=12, num_heads=(3, 3, 3, 3))
        >>> feats = frozen_features(enc, image_batches(torch.rand(3, 1, 32, 32, 32), 2), ["cls"])
        >>> feats["cls"].shape
        torch.Size([3, 96])
    """
    device = torch.device(device) if device is not None else module_device(encoder)
    chunks: dict[str, list[torch.Tensor]] = {str(t): [] for t in tokens}
    if description is not None:
        batches = progress(batches, description, total=total, unit="batch")
    with eval_mode(encoder):  # MONAI: eval mode and no_grad, the previous mode restored
        for images in batches:
            out = encoder(images.to(device=device, dtype=torch.float32))
            missing = [t for t in chunks if not isinstance(out, Mapping) or t not in out]
            if missing:
                has = sorted(map(str, out)) if isinstance(out, Mapping) else type(out).__name__
                raise KeyError(f"the frozen encoder's output has no {missing} (it has {has}); choose tokens from those.")
            for t, kept in chunks.items():
                kept.append(out[t].detach().float().cpu())
    return {t: torch.cat(c) if c else torch.zeros(0) for t, c in chunks.items()}


class FrozenFeatureDataset(Dataset):
    """The items of an image dataset with the image replaced by a frozen encoder's feature, computed once.

    Linear probing trains only a head on the features of a frozen encoder, so running the encoder
    again every epoch recomputes the same numbers. This dataset embeds every item once at
    construction (``views`` times when the dataset's transform is random, e.g. augmentation: view
    ``v`` of item ``i`` is drawn with the transform seeded by ``derive_seed(seed, v, i)``) and then
    serves the cached features. Every other key of an item (label, id, patient, ...) is kept.

    Keys: an integer returns view 0; an ``(index, seed)`` pair, as
    :class:`~dagman_components.data.ResumableSampler` yields, returns view ``seed % views``, so each
    epoch draws one of the cached views per item, reproducibly and across a resume.

    Args:
        dataset: an indexable dataset of dicts holding ``image_key`` (MONAI ``CacheDataset``,
            ``Dataset``); when ``views > 1`` its ``transform`` must have ``set_random_state``.
        encoder: the frozen encoder; its output mapping holds ``token``.
        token: the encoder output kept as the feature (``cls`` or ``global``).
        views: feature copies per item (1 without augmentation).
        seed: seed of the views' transforms.
        batch_size: images per forward pass.
        device: where the encoder runs (default: its device).
        image_key: the key of the image in the items, replaced by the (C,) feature.
        description: label of the progress bar.

    Raises:
        ValueError: for ``views < 1``.
        TypeError: when ``views > 1`` and the dataset's transform cannot be seeded.

    Example:
        >>> from monai.data import Dataset as MonaiDataset
        >>> from dagman_components.networks import SwinDAGMaN
        >>> images = MonaiDataset([{"image": torch.rand(1, 32, 32, 32), "label": 1}])
        >>> feats = FrozenFeatureDataset(images, SwinDAGMaN(embed_dim=12, num_heads=(3, 3, 3, 3)), "cls")
        >>> feats[0]["image"].shape, feats[0]["label"]
        (torch.Size([96]), 1)
    """

    def __init__(
        self,
        dataset: Any,
        encoder: nn.Module,
        token: str,
        views: int = 1,
        seed: int = 0,
        batch_size: int = 16,
        device: torch.device | str | None = None,
        image_key: str = "image",
        description: str = "frozen features",
    ) -> None:
        if int(views) < 1:
            raise ValueError(f"views must be at least 1, got {views}.")
        self.views = int(views)
        self.image_key = image_key
        source = SeededItems(dataset) if self.views > 1 else dataset
        n, step = len(dataset), max(1, int(batch_size))
        t0 = time.perf_counter()
        self.items: list[dict[str, Any]] = []
        features = []
        for v in range(self.views):
            label = description if self.views == 1 else f"{description} (view {v + 1}/{self.views})"
            batches = self._view_batches(source, v, n, step, seed)
            features.append(frozen_features(encoder, batches, [str(token)], device, label, -(-n // step))[str(token)])
        self.features = torch.stack(features)  # (views, N, C)
        logger.info("%s: %d items x %d view(s) embedded once in %.1f s", description, n, self.views,
                    time.perf_counter() - t0)

    def _view_batches(self, source: Any, view: int, n: int, step: int, seed: int) -> Iterator[torch.Tensor]:
        """Image batches of view ``view`` (seeded per item when there are several views); the other keys
        of the items are kept while view 0 is read."""
        for start in range(0, n, step):
            indices = range(start, min(n, start + step))
            chunk = [source[(i, derive_seed(seed, view, i))] if self.views > 1 else source[i] for i in indices]
            if view == 0:
                self.items.extend({k: x for k, x in item.items() if k != self.image_key} for item in chunk)
            yield torch.stack([torch.as_tensor(item[self.image_key]) for item in chunk])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, view = (key[0], int(key[1]) % self.views) if isinstance(key, tuple) else (key, 0)
        return {**self.items[index], self.image_key: self.features[view, index]}
