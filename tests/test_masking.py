"""Masking strategies: exact counts, the AttMask-Hint rule, upsampling, patch dropout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dagman_components.masking import AttentionGuidedMasking, PatchDropout, masking_counts, upsample_mask

GRID = (8, 8, 8)  # the SA grid of a 128^3 input: N = 512
N = 512


def ranked_attention(batch: int = 2) -> torch.Tensor:
    """S_ATT whose ranking is known: cell i has rank i (cell 0 is the most attended)."""
    s = torch.linspace(1.0, 0.001, N).repeat(batch, 1)
    return s / s.sum(-1, keepdim=True)


def test_counts_match_method_numbers():
    # METHOD.md: round(0.7*512)=358 masked, top round(0.1*512)=51 as hint pool, round(0.07*512)=36 hints
    assert masking_counts(N, 0.7, 0.1) == {"num_masked": 358, "hint_pool": 51, "num_hints": 36}


@pytest.mark.parametrize(
    "strategy,rule,expected",
    [
        ("attention_hint", "attmask", 358 - 36),  # AttMask-Hint reveals 36 of the top 51
        ("attention_hint", "literal", 358),
        ("attention_high", "attmask", 358),
        ("attention_low", "attmask", 358),
        ("random", "attmask", 358),
        ("block", "attmask", 358),
    ],
)
def test_exact_mask_counts(strategy, rule, expected):
    masking = AttentionGuidedMasking(strategy=strategy, hint_rule=rule).set_random_state(3)
    m = masking(ranked_attention(3), GRID)
    assert m.dtype == torch.bool and m.shape == (3, N)
    assert m.sum(1).tolist() == [expected] * 3


def test_attmask_hint_rule():
    m = AttentionGuidedMasking().set_random_state(0)(ranked_attention(4), GRID).numpy()
    for row in m:
        masked = set(np.flatnonzero(row))
        assert masked <= set(range(358))  # only the top round(r*N) can be masked
        assert set(range(51, 358)) <= masked  # ranks 51..357 are always masked
        revealed = set(range(358)) - masked
        assert len(revealed) == 36 and revealed <= set(range(51))  # hints come from the top round(s*N)
    assert not np.array_equal(m[0], m[1])  # hints are drawn per image


def test_literal_hint_rule_keeps_top_visible():
    m = AttentionGuidedMasking(hint_rule="literal")(ranked_attention(1), GRID)[0].numpy()
    assert np.flatnonzero(m).tolist() == list(range(51, 51 + 358))


def test_high_and_low_are_complementary_ends():
    high = AttentionGuidedMasking("attention_high")(ranked_attention(1), GRID)[0].numpy()
    low = AttentionGuidedMasking("attention_low")(ranked_attention(1), GRID)[0].numpy()
    assert np.flatnonzero(high).tolist() == list(range(358))
    assert np.flatnonzero(low).tolist() == list(range(N - 358, N))


def test_attention_ordering_follows_s_att_not_position():
    s = torch.rand(1, N)
    m = AttentionGuidedMasking("attention_high")(s, GRID)[0]
    assert s[0, m].min() >= s[0, ~m].max()


def test_seeded_masks_repeat():
    a = AttentionGuidedMasking("block").set_random_state(7)(None, GRID, batch_size=2)
    b = AttentionGuidedMasking("block").set_random_state(7)(None, GRID, batch_size=2)
    c = AttentionGuidedMasking("block").set_random_state(8)(None, GRID, batch_size=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_block_masks_are_contiguous():
    m = AttentionGuidedMasking("block", min_block_cells=16).set_random_state(0)(None, GRID, batch_size=1)
    grid = m[0].reshape(GRID).numpy()
    # a cuboid-built mask has many masked neighbours: far more than a random mask of the same size
    same = sum((grid[1:] == grid[:-1]).sum() for grid in [grid, grid.transpose(1, 0, 2), grid.transpose(2, 1, 0)])
    rnd = AttentionGuidedMasking("random").set_random_state(0)(None, GRID, batch_size=1)[0].reshape(GRID).numpy()
    same_rnd = sum((g[1:] == g[:-1]).sum() for g in [rnd, rnd.transpose(1, 0, 2), rnd.transpose(2, 1, 0)])
    assert same > same_rnd


def test_errors():
    with pytest.raises(ValueError, match="mask_ratio"):
        AttentionGuidedMasking(mask_ratio=1.2)
    with pytest.raises(ValueError):
        AttentionGuidedMasking(strategy="attentoin_hint")
    with pytest.raises(ValueError, match="needs s_att"):
        AttentionGuidedMasking()(None, GRID, batch_size=1)
    with pytest.raises(ValueError, match="expected"):
        AttentionGuidedMasking()(torch.rand(1, 100), GRID)


def test_upsample_mask_to_patches_and_voxels():
    m = torch.zeros(2, 8, dtype=torch.bool)
    m[0, 0] = m[1, 7] = True
    up = upsample_mask(m, (2, 2, 2), 8)
    assert up.shape == (2, 16, 16, 16)
    assert up[0].sum() == 512 and up[0, :8, :8, :8].all() and not up[0, 8:].any()
    assert up[1, 8:, 8:, 8:].all() and up[1].sum() == 512
    vox = upsample_mask(m, (2, 2, 2), 16)
    assert vox.shape == (2, 32, 32, 32) and vox[0].sum() == 16**3


def test_patch_dropout_rate_and_independence():
    drop = PatchDropout(0.7).set_random_state(0)(2, (32, 32, 32))
    assert drop.shape == (2, 32, 32, 32)
    assert set(drop.unique().tolist()) == {0.0, 1.0}
    assert abs(drop.mean().item() - 0.7) < 0.01
    assert not torch.equal(drop[0], drop[1])
    assert PatchDropout(0.0)(2, (4, 4, 4)) is None
    with pytest.raises(ValueError, match="patch-dropout"):
        PatchDropout(1.0)


def _per_image_reference(scores: np.ndarray, strategy: str, rule: str) -> np.ndarray:
    """The per-image numpy rule the batched masking replaced (deterministic strategies only)."""
    n = scores.shape[1]
    c = masking_counts(n, 0.7, 0.1)
    out = np.zeros_like(scores, dtype=bool)
    for i, row in enumerate(scores):
        order = np.argsort(-row, kind="stable")
        if strategy == "attention_low":
            out[i, order[n - c["num_masked"]:]] = True
        elif strategy == "attention_high" or rule == "attmask":
            out[i, order[: c["num_masked"]]] = True
        else:
            out[i, order[c["hint_pool"]: c["hint_pool"] + c["num_masked"]]] = True
    return out


@pytest.mark.parametrize("strategy,rule", [("attention_high", "attmask"), ("attention_low", "attmask"),
                                          ("attention_hint", "literal"), ("attention_hint", "attmask")])
def test_batched_masks_equal_the_per_image_rule(strategy, rule):
    gen = torch.Generator().manual_seed(0)
    s = torch.rand(5, N, generator=gen)
    s[:, 100:140] = 0.5  # ties are broken by position, as numpy's stable argsort does
    reference = _per_image_reference(s.numpy(), strategy, rule)
    m = AttentionGuidedMasking(strategy, hint_rule=rule).set_random_state(1)(s, GRID).numpy()
    if rule == "literal" or strategy != "attention_hint":
        np.testing.assert_array_equal(m, reference)
    else:  # AttMask-Hint: the reference's top round(r*N) cells less 36 hints from the top round(s*N)
        assert (m <= reference).all() and m.sum(1).tolist() == [358 - 36] * 5
        order = np.argsort(-s.numpy(), axis=1, kind="stable")
        for i in range(5):
            revealed = set(np.flatnonzero(reference[i] & ~m[i]))
            assert revealed <= set(order[i, :51].tolist())


def test_batched_masks_stay_on_the_attention_device_and_dtype():
    s = torch.rand(2, N, dtype=torch.bfloat16)
    m = AttentionGuidedMasking()(s, GRID)
    assert m.dtype == torch.bool and m.device == s.device and m.sum(1).tolist() == [358 - 36] * 2


# -- the masking protocol options (a [CLS] that can learn where the teacher looks)


def test_mask_probability_leaves_that_share_of_views_whole():
    s_att = torch.rand(400, 64).softmax(-1)
    masking = AttentionGuidedMasking(mask_probability=0.5).set_random_state(3)
    m = masking(s_att, (4, 4, 4))
    counts = m.sum(1)
    # a view is either masked by the rule (45 cells: 45 masked, 4 of the top 6 revealed... exactly 41) or not at all
    assert set(counts.tolist()) == {0, 41}
    assert 160 < int((counts == 0).sum()) < 240  # about half of 400
    every = AttentionGuidedMasking(mask_probability=1.0).set_random_state(3)(s_att, (4, 4, 4))
    assert set(every.sum(1).tolist()) == {41}
    # the masked views keep the rule's cells: equal to the every-view masks where masked
    masked = counts > 0
    assert torch.equal(m[masked], every[masked])


def test_mask_ratio_range_draws_each_views_ratio_within_it():
    s_att = torch.rand(300, 64).softmax(-1)
    m = AttentionGuidedMasking("attention_high", mask_ratio_range=(0.1, 0.5)).set_random_state(0)(s_att, (4, 4, 4))
    counts = m.sum(1)
    assert counts.min() >= round(0.1 * 64) and counts.max() <= round(0.5 * 64)
    assert len(set(counts.tolist())) > 10  # the ratio varies from view to view
    # each row is the rule at its own ratio: the k most attended cells
    for row, k in zip(range(5), counts.tolist()):
        top = torch.argsort(-s_att[row], stable=True)[:k]
        assert bool(m[row, top].all())
    with pytest.raises(ValueError, match="mask_ratio_range"):
        AttentionGuidedMasking(mask_ratio_range=(0.6, 0.2))


def test_attention_warmup_masks_randomly_until_the_step_then_by_attention():
    s_att = torch.zeros(64, 64)
    s_att[:, :8] = 1.0  # every view attends to the first 8 cells
    s_att = s_att.softmax(-1)
    masking = AttentionGuidedMasking("attention_high", mask_ratio=0.125, attention_warmup_steps=10)
    early = masking.set_random_state(0)(s_att, (4, 4, 4), step=10)
    late = masking.set_random_state(0)(s_att, (4, 4, 4), step=11)
    assert bool(late[:, :8].all()) and int(late.sum()) == 64 * 8
    assert int(early.sum()) == 64 * 8 and float(early[:, :8].float().mean()) < 0.3  # random: about 8 / 64
    assert torch.equal(masking.set_random_state(0)(s_att, (4, 4, 4)), late)  # no step: after the warm-up


def test_masks_from_the_clean_teacher_pass_differ_from_the_noisy_ones():
    """clean_teacher_attention: the masks follow the clean pass's S_ATT, not the patch-dropped one."""
    from dagman_components.masking import PatchDropout
    from dagman_components.networks import EncoderOutput, SwinDAGMaN

    torch.manual_seed(0)
    teacher = SwinDAGMaN(embed_dim=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3), sa_stage=2, sa_heads=4).eval()
    x = torch.rand(2, 1, 32, 32, 32)
    drop = PatchDropout(0.7).set_random_state(0)(2, (16, 16, 16))
    with torch.no_grad():
        clean, noisy = teacher(x)[EncoderOutput.S_ATT], teacher(x, token_drop=drop)[EncoderOutput.S_ATT]
    masking = AttentionGuidedMasking("attention_high")
    from_clean = masking.set_random_state(0)(clean, (4, 4, 4))
    assert torch.equal(from_clean, masking.set_random_state(0)(clean, (4, 4, 4)))
    assert not torch.equal(from_clean, masking.set_random_state(0)(noisy, (4, 4, 4)))
