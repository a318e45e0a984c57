# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""A MONAI trainer that fits a linear head on cached frozen features to its optimum, one C per epoch.

Linear probing used to train the head with AdamW for a fixed number of epochs. How far that got
depended on the scale of the features and on the step budget, so it ranked encoders by how easy
their features were to optimise, not by how separable they were. This trainer instead fits the
project's logistic probe (:func:`~dagman_components.probing.fit_logistic_probe`: standardised
features, balanced classes, full-batch L-BFGS to the optimum) on all training features at once.

Epoch ``e`` fits the head with the ``e``-th inverse L2 strength of ``Cs`` (one iteration per
epoch), so the bundle's usual machinery keeps working unchanged: the validation handler scores each
C after its epoch, the best-metric saver keeps the best head, and the checkpoint resumes between
Cs. With one C there is one epoch and no selection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.engines import Trainer
from torch.utils.data import DataLoader, Dataset

from dagman_components.probing import fit_logistic_probe

__all__ = ["LinearProbeTrainer"]


class LinearProbeTrainer(Trainer):
    """Fit ``head`` (``norm``: ``BatchNorm1d(affine=False)``, ``fc``: ``Linear``) on cached features.

    Args:
        device: the engine's device (the fit itself runs on the CPU in float64).
        features: a dataset whose items hold the feature under ``image_key`` and the class under
            ``label_key`` (:class:`~dagman_components.features.frozen_features.FrozenFeatureDataset`); read
            whole, as one batch, every epoch.
        head: the head the probe is written into.
        Cs: inverse L2 strengths, one per epoch (strong to weak: the validation's ties keep the
            first).
        num_classes: classes of the head.
        balanced: balanced class weights.
        train_handlers: handlers attached to this engine (as in MONAI's trainers).
        image_key: key of the features.
        label_key: key of the labels.
        kwargs: passed to :class:`monai.engines.Trainer`.

    Raises:
        ValueError: for an empty ``Cs`` or a non-positive C.

    Example:
        >>> from collections import OrderedDict
        >>> data = [{"image": torch.randn(4), "label": i % 2} for i in range(8)]
        >>> head = nn.Sequential(OrderedDict(norm=nn.BatchNorm1d(4, affine=False), fc=nn.Linear(4, 2)))
        >>> LinearProbeTrainer("cpu", data, head, Cs=[0.1, 1.0]).run()
    """

    def __init__(
        self,
        device: str | torch.device,
        features: Dataset | Sequence[dict],
        head: nn.Module,
        Cs: Sequence[float] = (1.0,),
        num_classes: int = 2,
        balanced: bool = True,
        train_handlers: Sequence[Any] | None = None,
        image_key: str = "image",
        label_key: str = "label",
        **kwargs: Any,
    ) -> None:
        Cs = [float(c) for c in Cs]
        if not Cs or min(Cs) <= 0:
            raise ValueError(f"probe_Cs must be a non-empty list of positive inverse L2 strengths, got {Cs}.")
        loader = DataLoader(features, batch_size=max(1, len(features)), shuffle=False, num_workers=0)
        super().__init__(device=torch.device(device), max_epochs=len(Cs), data_loader=loader, epoch_length=1,
                         handlers=train_handlers, decollate=False, **kwargs)
        self.head = head
        self.Cs = Cs
        self.num_classes = int(num_classes)
        self.balanced = bool(balanced)
        self.image_key, self.label_key = image_key, label_key
        self.network = head  # what MONAI's handlers expect to find on a trainer

    def _iteration(self, engine: LinearProbeTrainer, batchdata: dict[str, Any]) -> dict[str, Any]:
        """Fit the probe with this epoch's C on the whole batch and write it into the head."""
        C = self.Cs[(engine.state.epoch - 1) % len(self.Cs)]
        features = torch.as_tensor(batchdata[self.image_key]).flatten(1)
        labels = torch.as_tensor(batchdata[self.label_key]).view(-1).long().numpy()
        probe = fit_logistic_probe(features, labels, C=C, num_classes=self.num_classes, balanced=self.balanced)
        probe.write_to_head(self.head)
        return {"loss": torch.tensor(probe.objective), "C": C, "iterations": probe.iterations}
