"""Attention metrics a centre prior cannot pass (dagman_components.metrics.attention_localisation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dagman_components.metrics.attention_localisation import (
    attention_localisation,
    cell_auroc,
    cell_fractions,
    centre_prior,
    mass_ratio,
    shift_volumes,
    tissue_prior,
)
from dagman_components.networks import SwinDAGMaN


def _corner_mask() -> torch.Tensor:
    """(1, 1, 32, 32, 32): a 4^3 lesion in the first 8^3 cell of a 4^3 grid (stride 8)."""
    m = torch.zeros(1, 1, 32, 32, 32)
    m[..., 2:6, 2:6, 2:6] = 1
    return m


def test_a_map_equal_to_the_mask_scores_one_and_a_uniform_map_one_half_and_ratio_one():
    frac = cell_fractions(_corner_mask(), 8)
    assert frac.shape == (1, 64) and frac[0, 0] == pytest.approx(64 / 512) and frac[0, 1:].sum() == 0
    assert cell_auroc(frac, frac)[0] == 1.0
    uniform = torch.full((1, 64), 1 / 64)
    assert cell_auroc(uniform, frac)[0] == 0.5
    assert mass_ratio(uniform, frac)[0] == pytest.approx(1.0)
    # all the attention on the lesion's cell: the cell's lesion share over the crop's lesion share
    assert mass_ratio(frac, frac)[0] == pytest.approx((64 / 512) / (64 / 512 / 64))


def test_the_centre_prior_misses_a_lesion_shifted_to_the_corner():
    frac = cell_fractions(_corner_mask(), 8)
    centre = centre_prior((4, 4, 4))
    assert centre.sum() == pytest.approx(1.0) and int((centre > 0).sum()) == 8
    assert centre.view(4, 4, 4)[1:3, 1:3, 1:3].min() == pytest.approx(1 / 8)
    # the lesion cell ties with the 55 other empty cells and ranks below the 8 central ones
    assert cell_auroc(centre[None], frac)[0] == pytest.approx(0.5 * 55 / 63)
    assert mass_ratio(centre[None], frac)[0] == 0.0
    # centred on the crop's middle, the same prior finds it
    mid = torch.zeros(1, 1, 32, 32, 32)
    mid[..., 14:18, 14:18, 14:18] = 1
    assert cell_auroc(centre[None], cell_fractions(mid, 8))[0] == 1.0


def test_shift_moves_content_by_the_offset_with_zero_fill_and_tissue_prior_follows_intensity():
    x = torch.zeros(2, 1, 8, 8, 8)
    x[:, :, 4, 4, 4] = 1.0
    shifted = shift_volumes(x, torch.tensor([[2, -3, 1], [0, 0, 0]]))
    assert shifted[0, 0, 6, 1, 5] == 1.0 and shifted[0].sum() == 1.0 and torch.equal(shifted[1], x[1])
    assert shift_volumes(x, torch.tensor([[5, 0, 0], [0, 0, 0]]))[0].sum() == 0  # moved out of the box
    prior = tissue_prior(x, 4)
    assert prior.shape == (2, 8) and prior[0].sum() == pytest.approx(1.0) and prior[0].max() == 1.0
    assert torch.allclose(tissue_prior(torch.zeros(1, 1, 8, 8, 8), 4), torch.full((1, 8), 1 / 8))


def test_report_gives_head_mean_each_head_and_the_priors_for_clean_and_noisy_passes():
    torch.manual_seed(0)
    encoder = SwinDAGMaN(embed_dim=12, depths=(2, 2, 2, 2), num_heads=(3, 3, 3, 3), sa_stage=2, sa_heads=4)
    images = torch.rand(3, 1, 32, 32, 32)
    masks = torch.zeros(3, 1, 32, 32, 32)
    masks[..., 12:20, 12:20, 12:20] = 1
    clean = attention_localisation(encoder, images, masks, max_shift=8, seed=1)
    assert clean["cases"] == 3 and {f"head_{h}" for h in range(4)} <= set(clean)
    for key in ("s_att", "tissue_prior", "centre_prior", "head_0"):
        assert 0.0 <= clean[key]["cell_auroc"] <= 1.0 and clean[key]["mass_ratio"] >= 0.0
    again = attention_localisation(encoder, images, masks, max_shift=8, seed=1)
    assert again == clean  # seeded offsets
    noisy = attention_localisation(encoder, images, masks, max_shift=8, seed=1, patch_drop=0.7)
    assert noisy["patch_drop"] == 0.7 and noisy["s_att"] != clean["s_att"]
    assert noisy["centre_prior"] == clean["centre_prior"]  # same shifted crops
    with pytest.raises(ValueError, match="no crop keeps lesion"):
        attention_localisation(encoder, images, torch.zeros_like(masks))
