"""ResumableSampler, SeededItems and SamplerPosition: data order and augmentation from (seed, epoch, index)."""

from __future__ import annotations

import numpy as np
import torch
from ignite.engine import Engine
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, RandGaussianNoised

from dagman_components.data import ResumableSampler, SamplerPosition, SeededItems


def noisy_dataset(n: int = 6) -> Dataset:
    data = [{"x": np.full((1, 4), float(i), np.float32)} for i in range(n)]
    return Dataset(data, transform=Compose([RandGaussianNoised(keys="x", prob=1.0, std=1.0)]))


def batches(num_workers: int, epoch: int, start: int = 0) -> list[torch.Tensor]:
    dataset = noisy_dataset()
    sampler = ResumableSampler(dataset, seed=3)
    sampler.set_position(epoch, start)
    loader = DataLoader(SeededItems(dataset), batch_size=2, sampler=sampler, num_workers=num_workers)
    return [b["x"] for b in loader]


def test_item_draws_depend_on_the_key_only():
    items = SeededItems(noisy_dataset())
    first = items[(2, 11)]["x"]
    items[(4, 12)]  # other draws in between
    assert torch.equal(torch.as_tensor(items[(2, 11)]["x"]), torch.as_tensor(first))
    assert not torch.equal(torch.as_tensor(items[(2, 12)]["x"]), torch.as_tensor(first))


def test_epochs_are_reproducible_with_and_without_workers_and_can_start_midway():
    epoch1 = batches(0, epoch=1)
    assert all(torch.equal(a, b) for a, b in zip(batches(2, epoch=1), epoch1, strict=True))
    assert not torch.equal(torch.cat(batches(0, epoch=2)), torch.cat(epoch1))  # a new order and new noise
    tail = batches(2, epoch=1, start=2)  # after the first batch of 2
    assert all(torch.equal(a, b) for a, b in zip(tail, epoch1[1:], strict=True))


def test_sampler_position_skips_the_iterations_done_in_the_resumed_epoch():
    dataset = noisy_dataset()
    sampler = ResumableSampler(dataset, seed=3)
    loader = DataLoader(SeededItems(dataset), batch_size=2, sampler=sampler)
    seen = []
    engine = Engine(lambda e, b: seen.append((e.state.epoch, b["x"])))
    SamplerPosition(loader, samples_per_iteration=2).attach(engine)
    engine.load_state_dict({"iteration": 4, "epoch_length": 3, "max_epochs": 2})  # killed after 1 step of epoch 2
    engine.run(loader)
    expected = batches(0, epoch=2)[1:]
    assert [e for e, _ in seen] == [2, 2]
    assert all(torch.equal(b, x) for (_, b), x in zip(seen, expected, strict=True))
