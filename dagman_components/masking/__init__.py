"""Masking strategies on the semantic-attention grid and the teacher's patch dropout."""

from dagman_components.masking.masking import (
    AttentionGuidedMasking,
    HintRule,
    MaskingStrategy,
    PatchDropout,
    masking_counts,
    upsample_mask,
)
