"""Baselines on the same Swin backbone, for benchmarks and comparisons."""

from __future__ import annotations

import torch
import torch.nn as nn

from dagman_components.networks.heads import ReconstructionHead
from dagman_components.networks.outputs import EncoderOutput
from dagman_components.networks.swin_dagman import SwinDAGMaN

__all__ = ["MaskedReconstructionNetwork"]


class MaskedReconstructionNetwork(nn.Module):
    """SimMIM-like masked image modelling: the Swin encoder with a mask token (no semantic attention,
    no teacher) and the same reconstruction head as DAGMaN's student.

    Args:
        encoder: a :class:`SwinDAGMaN` built with ``sa_stage=None``.

    Raises:
        ValueError: when the encoder has a semantic-attention block.
    """

    def __init__(self, encoder: SwinDAGMaN) -> None:
        super().__init__()
        if encoder.sa is not None:
            raise ValueError("MaskedReconstructionNetwork expects an encoder built with sa_stage=None.")
        self.encoder = encoder
        self.recon_head = ReconstructionHead(encoder.out_dim, encoder.input_divisor, encoder.in_channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruct ``x`` (B, C, D, H, W) from its masked patch tokens (mask on the patch grid)."""
        return self.recon_head(self.encoder(x, mask=mask)[EncoderOutput.FEATURES][-1])
