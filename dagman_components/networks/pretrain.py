"""The DAGMaN pretraining network: encoder plus its heads, and the EMA teacher built from it."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from dagman_components.networks.heads import ProjectionHead, ReconstructionHead
from dagman_components.networks.outputs import EncoderOutput
from dagman_components.networks.swin_dagman import SwinDAGMaN

__all__ = ["DAGMaNPretrainNetwork", "make_teacher", "unwrap", "check_head_batch_norm", "MIN_BATCH_FOR_HEAD_BATCH_NORM"]

#: Smallest ``batch_size`` (volumes per micro-batch, two views each) for batch norm in the heads.
MIN_BATCH_FOR_HEAD_BATCH_NORM = 4


def check_head_batch_norm(enabled: bool, batch_size: int) -> None:
    """Refuse batch norm in the projection heads with batches too small for its statistics.

    With one volume the batch holds just its two views, and batch norm maps their features to
    opposite points, the reverse of what cross-view distillation asks for.

    Raises:
        ValueError: naming ``head_batch_norm`` and ``batch_size`` when ``enabled`` and
            ``batch_size < MIN_BATCH_FOR_HEAD_BATCH_NORM``.
    """
    if enabled and int(batch_size) < MIN_BATCH_FOR_HEAD_BATCH_NORM:
        raise ValueError(
            f"head_batch_norm needs batch_size >= {MIN_BATCH_FOR_HEAD_BATCH_NORM} (got {batch_size}): the heads normalise "
            "with the statistics of each batch. Raise batch_size or set head_batch_norm false."
        )


def unwrap(network: nn.Module) -> nn.Module:
    """Return the module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper, else itself."""
    return network.module if hasattr(network, "module") and isinstance(network.module, nn.Module) else network


class DAGMaNPretrainNetwork(nn.Module):
    """Swin-DAGMaN encoder with three projection heads ([CLS], SA patch tokens, global token) and,
    for the student, the reconstruction head.

    Args:
        encoder: the :class:`SwinDAGMaN` encoder.
        out_dim: prototypes K of each projection head (8192 in METHOD.md).
        hidden_dim: projection MLP width (2048).
        bottleneck_dim: projection bottleneck (256).
        with_reconstruction: build the reconstruction head (the student needs it, the teacher not).
        head_batch_norm: batch normalisation inside the projection heads' MLPs (see
            :class:`~dagman_components.networks.heads.ProjectionHead`).

    Example::

        net = DAGMaNPretrainNetwork(SwinDAGMaN(embed_dim=12, num_heads=(3, 3, 3, 3)), out_dim=64, hidden_dim=32,
                                    bottleneck_dim=16)
        out = net(torch.rand(2, 1, 64, 64, 64))  # keys: cls, patch_tokens, s_att, global, features, cls_logits, ...
    """

    def __init__(
        self,
        encoder: SwinDAGMaN,
        out_dim: int = 8192,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        with_reconstruction: bool = True,
        head_batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        head_args = {"out_dim": out_dim, "hidden_dim": hidden_dim, "bottleneck_dim": bottleneck_dim,
                     "batch_norm": head_batch_norm}
        self.cls_head = ProjectionHead(encoder.sa_dim, **head_args)
        self.patch_head = ProjectionHead(encoder.sa_dim, **head_args)
        self.global_head = ProjectionHead(encoder.out_dim, **head_args)
        self.recon_head = (
            ReconstructionHead(encoder.out_dim, encoder.input_divisor, encoder.in_channels)
            if with_reconstruction
            else None
        )

    def projection_heads(self) -> list[ProjectionHead]:
        """The three projection heads, in the order cls, patch, global."""
        return [self.cls_head, self.patch_head, self.global_head]

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, token_drop: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Encode and project.

        Args:
            x: images (B, C, D, H, W).
            mask: optional student mask on the patch-embedding grid (see :class:`SwinDAGMaN`).
            token_drop: optional teacher patch-dropout map on the patch-embedding grid.

        Returns:
            The encoder's dict plus ``cls_logits`` (B, K), ``patch_logits`` (B, N, K),
            ``global_logits`` (B, K), the L2-normalised bottleneck features they come from
            (``cls_embedding``, ``patch_embedding``, ``global_embedding``, float32) and, with the reconstruction head, ``recon`` shaped like ``x``.
        """
        out = self.encoder(x, mask=mask, token_drop=token_drop)
        with torch.profiler.record_function("dagman/projection_heads"):
            for name, head, tokens in (("cls", self.cls_head, out[EncoderOutput.CLS]),
                                       ("patch", self.patch_head, out[EncoderOutput.PATCH_TOKENS]),
                                       ("global", self.global_head, out[EncoderOutput.GLOBAL])):
                z = head.embed(tokens)
                out[f"{name}_embedding"] = z
                out[f"{name}_logits"] = head.prototypes(z)
        if self.recon_head is not None:
            out["recon"] = self.recon_head(out[EncoderOutput.FEATURES][-1])
        return out


def make_teacher(student: nn.Module) -> DAGMaNPretrainNetwork:
    """Build the EMA teacher: a copy of the student without the reconstruction head, with no
    gradients and in eval mode (no stochastic depth).

    Args:
        student: a :class:`DAGMaNPretrainNetwork`, possibly wrapped in DDP.

    Returns:
        The teacher network, on the student's device.
    """
    src = unwrap(student)
    recon, src.recon_head = src.recon_head, None
    try:
        teacher = copy.deepcopy(src)
    finally:
        src.recon_head = recon
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()
