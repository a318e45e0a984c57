"""Attention distance and entropies on hand-built attention maps, and recording from a Swin encoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TINY_ENCODER

from dagman_components.metrics import (
    SwinAttentionRecorder,
    attention_distance,
    attention_entropy,
    histogram_entropy_bits,
    stage_diversity,
)
from dagman_components.networks import SwinDAGMaN

WIN = (2, 2, 2)  # 8 tokens; coordinates are the corners of a unit cube


def test_one_hot_on_self_has_zero_distance():
    attn = torch.eye(8).unsqueeze(0)  # (heads=1, n, n)
    assert torch.all(attention_distance(attn, WIN) == 0)
    assert torch.all(attention_entropy(attn) == 0)


def test_one_hot_on_farthest_token_has_the_cube_diagonal():
    attn = torch.zeros(1, 8, 8)
    for i in range(8):
        attn[0, i, 7 - i] = 1.0  # index 7 - i is the opposite corner in (d, h, w) order
    assert torch.allclose(attention_distance(attn, WIN), torch.full((1, 8), math.sqrt(3.0)))


def test_uniform_attention_distance_and_entropy():
    attn = torch.full((1, 8, 8), 1 / 8)
    # from any corner: 3 neighbours at 1, 3 at sqrt(2), 1 at sqrt(3), itself at 0
    expected = (3 * 1 + 3 * math.sqrt(2) + math.sqrt(3)) / 8
    assert torch.allclose(attention_distance(attn, WIN), torch.full((1, 8), expected))
    assert torch.allclose(attention_entropy(attn), torch.full((1, 8), 3.0))  # log2(8)


def test_histogram_entropy():
    assert histogram_entropy_bits(np.zeros(10), window=2) == 0.0
    upper = math.sqrt(3) * 2
    two_bins = np.array([0.0, upper])  # first and last of 64 bins, equally often
    assert histogram_entropy_bits(two_bins, window=2) == pytest.approx(1.0)


def test_window_size_mismatch():
    with pytest.raises(ValueError, match="holds 8 tokens"):
        attention_distance(torch.full((1, 27, 27), 1 / 27), WIN)


def test_recorder_on_a_swin_encoder():
    enc = SwinDAGMaN(**TINY_ENCODER).eval()
    with SwinAttentionRecorder(enc) as rec, torch.no_grad():
        enc(torch.rand(1, 1, 64, 64, 64))
    assert sorted(rec.records) == [1, 2, 3, 4]
    assert all(len(v) == 2 for v in rec.records.values())  # two blocks per stage
    attn, win = rec.records[1][0]
    assert win == (4, 4, 4) and attn.shape[1:] == (3, 64, 64)  # 3 heads, windows of 64 tokens
    assert torch.allclose(attn.sum(-1), torch.ones(attn.shape[:-1]), atol=1e-5)
    assert rec.records[4][0][1] == (4, 4, 4) and rec.records[4][0][0].shape[0] == 1  # stage 4 runs on 4^3: one window
    summary = stage_diversity(rec.records[1])
    assert len(summary["per_head_mean_distance"]) == 3
    assert 0 < summary["distance_entropy_bits"] <= 6.0  # at most log2(64 bins)
    assert all(0 < e <= 6.0 for e in summary["per_head_attention_entropy_bits"])
    # the hooks are removed on exit
    with torch.no_grad():
        enc(torch.rand(1, 1, 32, 32, 32))
    assert len(rec.records[1]) == 2
    with SwinAttentionRecorder(enc) as small, torch.no_grad():
        enc(torch.rand(1, 1, 32, 32, 32))
    assert small.records[4][0][1] == (2, 2, 2)  # MONAI shrinks the window to the 2^3 grid
