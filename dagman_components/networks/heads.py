"""Projection heads (DINO style) and the masked-image reconstruction head (SMIT's decoder)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import SubpixelUpsample

__all__ = ["ProjectionHead", "ReconstructionHead", "TokenBatchNorm"]


class TokenBatchNorm(nn.BatchNorm1d):
    """Batch normalisation of the last axis over every leading position (samples and tokens), always
    with the statistics of the current batch (no running averages), in training and in evaluation.

    A projection head is used only during pretraining, by the student and by the EMA teacher (which
    runs in evaluation mode); both normalise with their own batch, as DINO's teacher does with its
    head's batch norms. Needs at least two positions.

    Args:
        num_features: width of the last axis.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """(..., C) -> (..., C)."""
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class ProjectionHead(nn.Module):
    """MLP ``in -> hidden -> hidden -> bottleneck`` (GELU), L2 normalisation, then a weight-normalised
    linear layer without bias to ``out_dim`` prototypes whose norm is frozen at 1.

    Works on any leading shape: (B, C) or (B, N, C) in, (..., out_dim) out.

    With ``batch_norm`` (DINO's ``use_bn_in_head`` option), every hidden layer is followed by a
    :class:`TokenBatchNorm` before its GELU. A freshly initialised Swin maps different crops to
    almost the same token (the across-crop spread of its L2-normalised [CLS] output is a few
    percent of an isotropic spread), so without it the teacher's targets start out nearly identical
    for every crop; the batch norm removes the part all crops share and rescales the rest.

    Args:
        in_dim: input width.
        out_dim: number of prototypes K (8192 in METHOD.md).
        hidden_dim: MLP width (2048).
        bottleneck_dim: width before the prototype layer (256).
        nlayers: MLP layers (3).
        batch_norm: batch normalisation after each hidden layer (off in METHOD.md).

    Raises:
        ValueError: when a dimension is not positive or ``nlayers < 1``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 8192,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if min(in_dim, out_dim, hidden_dim, bottleneck_dim) < 1 or nlayers < 1:
            raise ValueError("ProjectionHead dimensions must be positive and nlayers >= 1.")
        widths = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < nlayers - 1:
                if batch_norm:
                    layers.append(TokenBatchNorm(b))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad = False

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of the prototype layer (frozen during the first epoch)."""
        return [p for p in self.last_layer.parameters() if p.requires_grad]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck features (..., bottleneck_dim), in float32."""
        return F.normalize(self.mlp(x).float(), dim=-1, eps=1e-6)

    def prototypes(self, z: torch.Tensor) -> torch.Tensor:
        """Prototype logits (cosine similarities in [-1, 1]) of bottleneck features, computed in float32
        even under autocast: at a teacher temperature of 0.04 a bf16 rounding of the cosine (about
        4e-3 near 1) would move a target logit by 0.1."""
        with torch.autocast(z.device.type, enabled=False):
            return self.last_layer(z.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project tokens to prototype logits."""
        return self.prototypes(self.embed(x))


class ReconstructionHead(nn.Module):
    """SMIT's decoder: a 1x1x1 convolution from the last stage output to ``stride^3 * out_channels``
    values, pixel-shuffled back to the input size (MONAI ``SubpixelUpsample``).

    Args:
        in_dim: channels of the last stage output (768 for the defaults).
        stride: input voxels per side of one last-stage cell (32 for the defaults).
        out_channels: image channels to reconstruct.
    """

    def __init__(self, in_dim: int, stride: int = 32, out_channels: int = 1) -> None:
        super().__init__()
        self.shuffle = SubpixelUpsample(
            spatial_dims=3,
            in_channels=in_dim,
            out_channels=out_channels,
            scale_factor=stride,
            conv_block=nn.Conv3d(in_dim, out_channels * stride**3, kernel_size=1),
            apply_pad_pool=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim, d, h, w) -> (B, out_channels, d*stride, h*stride, w*stride)."""
        return self.shuffle(x)
