# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Randomness that a resumed run reproduces exactly: every draw is derived from (seed, epoch, index).

A killed run that resumes from its checkpoint only has its counters (epoch, iteration). So that it
continues with the batches, augmentations and masks it would have seen, none of these may depend
on generator states that advanced before the kill:

* :class:`ResumableSampler` orders each epoch from ``(seed, epoch)`` (as ``DistributedSampler``
  does), can start part-way through an epoch, and hands each index to the dataset together with
  the seed of that item's random transforms, ``derive_seed(seed, epoch, index)``;
* :class:`SeededItems` wraps a dataset and reseeds its transform with that seed before each item,
  in the main process or in a worker alike, so ``num_workers`` does not change the data;
* :class:`SamplerPosition` sets the sampler's epoch and, in the epoch a run resumes in, skips the
  samples of the iterations already done;
* :class:`IterationSeeder` seeds torch's generators (dropout, drop path) from ``(seed, iteration)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from dagman_components.runtime import distributed

__all__ = ["derive_seed", "ResumableSampler", "SeededItems", "SamplerPosition", "IterationSeeder"]

logger = logging.getLogger(__name__)


def derive_seed(*keys: int) -> int:
    """A 32-bit seed that depends on every key (numpy ``SeedSequence``): seeds of neighbouring keys
    give unrelated streams, unlike ``seed + epoch``.

    Args:
        keys: non-negative integers, e.g. ``(seed, epoch, index)``.

    Returns:
        An integer in [0, 2**32).
    """
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


class ResumableSampler(DistributedSampler):
    """A ``DistributedSampler`` (one process unless ``torch.distributed`` is initialised) whose
    epoch order comes from ``(seed, epoch)``, that can start ``start_index`` samples into an epoch,
    and that yields ``(index, item_seed)`` pairs for :class:`SeededItems`.

    Args:
        dataset: the dataset sampled (its length is used).
        shuffle: shuffle every epoch.
        seed: seed of the order and of the items' transforms; equal on every process.
        drop_last: drop the tail so that every process gets the same count (else pad by repeating).
        num_replicas: processes (default: :func:`dagman_components.runtime.distributed.world_size`).
        rank: this process (default: :func:`dagman_components.runtime.distributed.rank`).
    """

    def __init__(self, dataset: Sized, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        if num_replicas is None:
            num_replicas = distributed.world_size()
        if rank is None:
            rank = distributed.rank()
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,  # type: ignore[arg-type]
                         drop_last=drop_last)
        self.start_index = 0

    def set_position(self, epoch: int, start_index: int = 0) -> None:
        """Set the epoch (its order) and the first of this process's samples to yield in it."""
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"start_index must be in [0, {self.num_samples}], got {start_index}.")
        self.set_epoch(epoch)
        self.start_index = int(start_index)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())[self.start_index :]
        return iter([(int(i), derive_seed(self.seed, self.epoch, int(i))) for i in indices])


class SeededItems(Dataset):
    """Wrap a dataset whose ``transform`` is randomisable (MONAI ``Compose``, ``CacheDataset``) so
    that each item's random transforms are seeded by the key: ``dataset[(index, seed)]`` reseeds the
    transform with ``seed`` and returns item ``index``; a plain integer key returns the item as it
    is (any other sampler).

    Args:
        dataset: a dataset with a ``transform`` that has ``set_random_state``.

    Raises:
        TypeError: when ``dataset.transform`` cannot be seeded.
    """

    def __init__(self, dataset: Any) -> None:
        if not hasattr(getattr(dataset, "transform", None), "set_random_state"):
            raise TypeError(f"{type(dataset).__name__}.transform has no set_random_state: it cannot be seeded per item.")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, tuple):
            index, seed = key
            self.dataset.transform.set_random_state(seed=seed)
            return self.dataset[index]
        return self.dataset[key]


class SamplerPosition:
    """At every epoch start, set the training loader's :class:`ResumableSampler` epoch and the samples
    to skip: none, except in the epoch a run resumes in, where the iterations already done are skipped.

    Args:
        loader: the training data loader (its ``sampler`` is looked up when the epoch starts; with
            any other sampler a warning says that a resumed epoch restarts at its first batch).
        samples_per_iteration: samples of one process per engine iteration (batch size times
            micro-batches per optimizer step).
    """

    def __init__(self, loader: Any, samples_per_iteration: int) -> None:
        if samples_per_iteration < 1:
            raise ValueError(f"samples_per_iteration must be >= 1, got {samples_per_iteration}.")
        self.loader = loader
        self.samples_per_iteration = int(samples_per_iteration)

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.EPOCH_STARTED):
            engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        done = engine.state.iteration - (engine.state.epoch - 1) * engine.state.epoch_length
        sampler = getattr(self.loader, "sampler", None)
        if not isinstance(sampler, ResumableSampler):
            if done:
                logger.warning("the training loader's sampler is not a ResumableSampler: epoch %d restarts at its "
                               "first batch instead of after iteration %d", engine.state.epoch, done)
            return
        sampler.set_position(engine.state.epoch, done * self.samples_per_iteration)
        if done:
            logger.info("epoch %d resumes after its iteration %d: the sampler skips %d samples",
                        engine.state.epoch, done, done * self.samples_per_iteration)


class IterationSeeder:
    """Seed torch's CPU and CUDA generators from ``(seed, iteration)`` before every iteration, so that
    dropout and drop path after a resume draw what the uninterrupted run drew.

    Args:
        seed: the run's seed (add the rank under DDP for different draws per process).
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.ITERATION_STARTED):
            engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        torch.manual_seed(derive_seed(self.seed, engine.state.iteration))
