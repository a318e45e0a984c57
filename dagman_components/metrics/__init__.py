"""Metrics that are not MONAI's own."""

from dagman_components.metrics.attention_diversity import (
    SwinAttentionRecorder,
    attention_distance,
    attention_entropy,
    histogram_entropy_bits,
    stage_diversity,
    window_coordinates,
)
