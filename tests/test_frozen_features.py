# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""The one frozen-feature loop and the cached features of linear probing."""

from __future__ import annotations

import pytest
import torch
from monai.data import Dataset
from monai.transforms import Compose, RandFlipd

import dagman_components.classification as nc
from dagman_components.data import derive_seed
from dagman_components.features.frozen_features import FrozenFeatureDataset, frozen_features, image_batches
from dagman_components.networks import SwinDAGMaN

TINY = {"embed_dim": 12, "depths": (2, 2, 2, 2), "num_heads": (3, 3, 3, 3), "sa_heads": 4}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("DAGMAN_PROGRESS", "0")


def _classifier(seed: int = 0) -> nc.NoduleClassifier:
    torch.manual_seed(seed)
    return nc.NoduleClassifier(SwinDAGMaN(**TINY), mode="linear_probe")


def _images(n: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 32, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_cached_features_give_the_uncached_logits():
    net = _classifier()
    images = _images()
    data = Dataset([{"image": img, "label": i % 2, "id": f"case{i}"} for i, img in enumerate(images)])
    cached = FrozenFeatureDataset(data, net.encoder, net.token, batch_size=2)
    net.eval()
    with torch.no_grad():
        uncached = net(images)
        from_cache = net.head(torch.stack([cached[i]["image"] for i in range(len(cached))]))
    torch.testing.assert_close(from_cache, uncached, rtol=1e-5, atol=1e-5)
    assert [cached[i]["id"] for i in range(5)] == [f"case{i}" for i in range(5)]
    assert [cached[(i, 7)]["label"] for i in range(5)] == [0, 1, 0, 1, 0]


def test_views_are_seeded_augmentations_chosen_by_the_sampler_seed():
    net = _classifier()
    images = _images(3)
    flip = Compose([RandFlipd("image", prob=0.5, spatial_axis=0)])
    data = Dataset([{"image": img} for img in images], transform=flip)
    cached = FrozenFeatureDataset(data, net.encoder, "global", views=3, seed=11, batch_size=2)
    assert cached.features.shape == (3, 3, net.encoder.out_dim)
    for view in range(3):
        for i in range(3):
            flip.set_random_state(seed=derive_seed(11, view, i))
            image = flip({"image": images[i]})["image"]
            expected = frozen_features(net.encoder, image_batches(image[None], 1), ["global"])["global"][0]
            torch.testing.assert_close(cached[(i, view + 3 * 5)]["image"], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(cached[1]["image"], cached.features[0, 1])  # an integer key: view 0
    flipped = [not torch.allclose(cached.features[0, i], cached.features[v, i]) for v in (1, 2) for i in range(3)]
    assert any(flipped)  # the views differ where the flips differ


def test_bad_arguments_say_what_is_wrong():
    net = _classifier()
    with pytest.raises(ValueError, match="views must be at least 1"):
        FrozenFeatureDataset(Dataset([{"image": _images(1)[0]}]), net.encoder, "cls", views=0)
    with pytest.raises(KeyError, match=r"has no \['pooled'\]"):
        frozen_features(net.encoder, image_batches(_images(1), 1), ["pooled"])
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        list(image_batches(_images(1), 0))
