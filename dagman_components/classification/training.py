# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""How the classification bundle trains, chosen by one value (``mode``).

* ``linear_probe``: the encoder is frozen; its features are embedded once and the head is fitted
  to the optimum of the project's logistic probe
  (:class:`~dagman_components.engines.LinearProbeTrainer`, one C per epoch).
* ``finetune``: MONAI's ``SupervisedTrainer`` trains every parameter, with layer-wise learning-rate
  decay (:func:`~dagman_components.classification.classifier_param_groups`) and, by default, the
  head first set to the linear probe's optimum on the frozen encoder (:class:`ProbeHeadInit`, the
  LP-FT recipe of Kumar et al., ICLR 2022): a random head would send large gradients through the
  pretrained encoder in the first steps and distort its features.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer, Trainer

from dagman_components.engines import LinearProbeTrainer
from dagman_components.features.frozen_features import FrozenFeatureDataset
from dagman_components.networks import unwrap
from dagman_components.probing import DEFAULT_C, fit_logistic_probe

__all__ = ["classifier_trainer", "ProbeHeadInit"]

logger = logging.getLogger(__name__)


def classifier_trainer(mode: str, device: torch.device, network: nn.Module, train_items: Any, probe_Cs: Sequence[float],
                       num_classes: int, train_handlers: Sequence[Any], **supervised: Any) -> Trainer:
    """The trainer of ``mode``.

    Args:
        mode: ``linear_probe`` or ``finetune``.
        device: the device.
        network: what trains: the classifier's head in ``linear_probe`` mode, the whole
            :class:`~dagman_components.classification.NoduleClassifier` in ``finetune`` mode.
        train_items: the training items; in ``linear_probe`` mode the cached features
            (:class:`~dagman_components.features.frozen_features.FrozenFeatureDataset`).
        probe_Cs: the linear probe's inverse L2 strengths, one per epoch (``linear_probe``).
        num_classes: classes.
        train_handlers: the trainer's handlers.
        supervised: the other arguments of MONAI's ``SupervisedTrainer`` (``finetune``): ``max_epochs``,
            ``train_data_loader``, ``optimizer``, ``loss_function``, ``inferer``, ``amp``, ...

    Returns:
        A :class:`~dagman_components.engines.LinearProbeTrainer` or a ``SupervisedTrainer``.

    Raises:
        ValueError: for an unknown ``mode``.
    """
    if mode == "linear_probe":
        return LinearProbeTrainer(device, train_items, network, Cs=probe_Cs, num_classes=num_classes,
                                  train_handlers=train_handlers)
    if mode == "finetune":
        return SupervisedTrainer(device=device, network=network, train_handlers=train_handlers, **supervised)
    raise ValueError(f"mode must be 'linear_probe' or 'finetune', got {mode!r}.")


class ProbeHeadInit:
    """Before fine-tuning starts, set the classifier's head to the linear probe's optimum on the
    frozen encoder's features of the training set (:func:`~dagman_components.probing.fit_logistic_probe`).

    Runs at ``Events.STARTED`` of a fresh run only (a resumed run has its head in the checkpoint),
    after the resume handler. The features are embedded once (eval mode, no autograd), from one view
    of each training item.

    Args:
        network: the classifier (``encoder``, ``head``, ``token``).
        dataset: the training dataset of images.
        C: the probe's inverse L2 strength.
        enabled: ``False`` keeps the random head (a plain fine-tune).
        seed: seed of the items' random transforms.
        device: where the encoder runs.
        num_classes: classes of the head.
    """

    def __init__(self, network: nn.Module, dataset: Any, C: float = DEFAULT_C, enabled: bool = True, seed: int = 0,
                 device: torch.device | str | None = None, num_classes: int = 2) -> None:
        self.network, self.dataset = network, dataset
        self.C, self.enabled, self.seed = float(C), bool(enabled), int(seed)
        self.device, self.num_classes = device, int(num_classes)

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.enabled or int(engine.state.iteration) != 0:
            return
        net = unwrap(self.network)
        features = FrozenFeatureDataset(self.dataset, net.encoder, str(net.token.value), seed=self.seed,
                                        device=self.device, description="head initialisation features")
        labels = [int(it["label"]) for it in features.items]
        probe = fit_logistic_probe(features.features[0], labels, C=self.C, num_classes=self.num_classes)
        probe.write_to_head(net.head)
        logger.info("fine-tuning starts from the linear probe's head (C=%g, %d cases, %d L-BFGS iterations)",
                    self.C, len(labels), probe.iterations)
