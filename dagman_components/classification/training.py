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

from dagman_components.data.nodule_transforms import nodule_augmentation
from dagman_components.data.resumable import SeededItems
from dagman_components.engines import LinearProbeTrainer
from dagman_components.features.frozen_features import FrozenFeatureDataset
from dagman_components.networks import unwrap
from dagman_components.probing import DEFAULT_C, fit_logistic_probe

__all__ = ["MODES", "TrainingPlan", "classifier_trainer", "ProbeHeadInit"]

#: The values of the bundle's ``mode``.
MODES = ("linear_probe", "finetune")

logger = logging.getLogger(__name__)


class TrainingPlan:
    """Everything ``mode`` decides in the classification bundle's configs, in one component.

    ``linear_probe`` embeds each crop once with the frozen encoder (unaugmented, in memory, so the loaders
    need no worker processes) and trains the head alone; ``finetune`` trains the whole network on
    (augmented) images, its head first set to the linear probe's optimum when ``head_init`` is ``probe``.
    Evaluation and inference run the whole model on images in either mode (``run_on_images``).

    The network is an argument of the methods that need it, so reading ``item_workers`` builds nothing.

    Args:
        mode: ``linear_probe`` or ``finetune``.
        token: the encoder output the head reads (``cls`` or ``global``).
        seed: seed of the training items' random transforms.
        device: where the frozen encoder embeds the crops.
        augment: augment the fine-tuning crops (:func:`~dagman_components.data.nodule_transforms.nodule_augmentation`).
        head_init: ``probe`` or ``random`` (fine-tuning).
        num_workers: the loaders' worker processes for images.
        run_on_images: the whole model runs on images whatever the mode (evaluation, inference).

    Raises:
        ValueError: for an unknown ``mode`` or ``head_init``, naming the config key.
    """

    def __init__(self, mode: str, token: str = "cls", seed: int = 0,
                 device: torch.device | str | None = None, augment: bool = True, head_init: str = "probe",
                 num_workers: int = 0, run_on_images: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}.")
        if head_init not in ("probe", "random"):
            raise ValueError(f"head_init must be 'probe' or 'random', got {head_init!r}.")
        self.mode, self.token = mode, str(token)
        self.seed, self.device, self.augment, self.head_init = int(seed), device, bool(augment), head_init
        self.num_workers = int(num_workers)
        #: The head trains on features cached once from the frozen encoder.
        self.cached_features = mode == "linear_probe" and not run_on_images

    def trained_module(self, network: nn.Module) -> nn.Module:
        """What the trainer and the evaluator run: the classifier's head on cached features, else ``network``."""
        return unwrap(network).head if self.cached_features else network

    @property
    def item_workers(self) -> int:
        """Worker processes of the loaders: none for features in memory (they would only add their start-up)."""
        return 0 if self.cached_features else self.num_workers

    @property
    def probe_head_init(self) -> bool:
        """Whether fine-tuning starts from the linear probe's head (:class:`ProbeHeadInit`)."""
        return self.head_init == "probe" and not self.cached_features

    def train_transforms(self, preprocessing: Sequence[Any]) -> list[Any]:
        """The training preprocessing: augmentation appended when fine-tuning with ``augment``."""
        augmentation = nodule_augmentation() if self.augment and not self.cached_features else []
        return [*preprocessing, *augmentation]

    def train_items(self, dataset: Any, network: nn.Module) -> Any:
        """The training items: features cached with ``network``'s frozen encoder, or the images with each item's
        random transforms seeded."""
        if self.cached_features:
            return FrozenFeatureDataset(dataset, unwrap(network).encoder, self.token, seed=self.seed,
                                        device=self.device, description="training features")
        return SeededItems(dataset)

    def validation_items(self, dataset: Any, network: nn.Module) -> Any:
        """The validation items: features cached with ``network``'s frozen encoder, or the images."""
        if self.cached_features:
            return FrozenFeatureDataset(dataset, unwrap(network).encoder, self.token, device=self.device,
                                        description="validation features")
        return dataset


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
    raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}.")


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
