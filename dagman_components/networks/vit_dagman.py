"""ViT-DAGMaN: MONAI's 3D ViT with a [CLS] token, a mask token and saved attention (the paper's appendix).

The backbone is :class:`monai.networks.nets.ViT` built with ``classification=True`` (which gives it
the [CLS] token; its classification head is removed) and ``save_attn=True`` on the last block, so
the [CLS]-to-patch attention of the last block is S_ATT. Every block attends globally, so the
"semantic-attention grid" is the patch grid itself: one mask cell is one patch
(``patches_per_sa_cell == 1``, ``sa_stride == patch_size``). The forward pass returns the same keys
as :class:`~dagman_components.networks.SwinDAGMaN`, so :class:`DAGMaNPretrainNetwork` and the
co-distillation trainer use it unchanged (``variants/vit.yaml`` of the pretraining bundle).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.nets import ViT
from monai.utils import ensure_tuple_rep

from dagman_components.networks.outputs import EncoderOutput

__all__ = ["ViTDAGMaN"]


class ViTDAGMaN(ViT):
    """MONAI's 3D ViT with a [CLS] token, a learnable mask token and the last block's attention kept.

    The mask token replaces masked patch embeddings before the position embedding is added (as in
    SimMIM / iBOT); the noisy teacher's dropped patches are set to zero at the same place. The
    position embedding is learnt for one input size, so the input must be exactly ``img_size``.

    Args:
        in_channels: image channels.
        img_size: the input size (the pretraining ``roi_size``), every side divisible by ``patch_size``.
        patch_size: patch side in voxels (16 in the paper's ViT-B/16 setting).
        hidden_size: token width.
        mlp_dim: MLP width; ``None`` gives ``4 * hidden_size``.
        num_layers: transformer blocks.
        num_heads: attention heads per block.
        pos_embed_type: MONAI position embedding, ``"learnable"`` or ``"sincos"``.
        dropout_rate: dropout inside the blocks.

    Raises:
        ValueError: when ``img_size`` is not divisible by ``patch_size`` or ``hidden_size`` by ``num_heads``.

    Example::

        net = ViTDAGMaN(img_size=32, patch_size=8, hidden_size=24, num_layers=2, num_heads=3)
        out = net(torch.rand(1, 1, 32, 32, 32))
        out["cls"].shape, out["s_att"].shape  # (1, 24), (1, 64)
    """

    def __init__(
        self,
        in_channels: int = 1,
        img_size: Sequence[int] | int = 96,
        patch_size: Sequence[int] | int = 16,
        hidden_size: int = 384,
        mlp_dim: int | None = None,
        num_layers: int = 12,
        num_heads: int = 6,
        pos_embed_type: str = "learnable",
        dropout_rate: float = 0.0,
    ) -> None:
        img = ensure_tuple_rep(img_size, 3)
        patch = ensure_tuple_rep(patch_size, 3)
        if any(int(s) % int(p) for s, p in zip(img, patch)):
            raise ValueError(f"img_size {tuple(img)} must be divisible by patch_size {tuple(patch)} (roi_size).")
        super().__init__(
            in_channels=in_channels,
            img_size=img,
            patch_size=patch,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim or 4 * hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            proj_type="conv",
            pos_embed_type=pos_embed_type,
            classification=True,
            post_activation="none",
            dropout_rate=dropout_rate,
            spatial_dims=3,
            qkv_bias=True,
            save_attn=True,
        )
        del self.classification_head  # only the [CLS] token is used; an unused head would upset DDP
        for i, block in enumerate(self.blocks):
            block.attn.save_attn = i == len(self.blocks) - 1
            if hasattr(block, "norm_cross_attn"):  # built by MONAI without cross-attention: never gets a gradient
                block.norm_cross_attn.requires_grad_(False)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, hidden_size, 1, 1, 1))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.in_channels = in_channels
        self.img_size = tuple(int(s) for s in img)
        self.patch_size = tuple(int(p) for p in patch)
        self.hidden_size = hidden_size
        self.embed_dim = hidden_size  # the names Swin-based tools read
        self.sa_stage = num_layers  # the [CLS] attention is the last block's
        self.sa_dim = hidden_size
        self.out_dim = hidden_size

    @property
    def sa_stride(self) -> int:
        """Voxels per side of one mask cell (one patch)."""
        return self.patch_size[0]

    @property
    def patches_per_sa_cell(self) -> int:
        """Patch tokens per side of one mask cell: 1, every patch is a cell."""
        return 1

    @property
    def input_divisor(self) -> int:
        """Every side must be a multiple of this; the ViT also needs exactly ``img_size``."""
        return self.patch_size[0]

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming the problem when ``x`` is not (B, C, *img_size)."""
        if x.ndim != 5:
            raise ValueError(f"ViTDAGMaN expects a (B, C, D, H, W) tensor, got shape {tuple(x.shape)}.")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"ViTDAGMaN was built with in_channels={self.in_channels}, got {x.shape[1]} channels.")
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"ViTDAGMaN has a position embedding for img_size {self.img_size} (roi_size); got {tuple(x.shape[2:])}."
            )

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, mask: torch.Tensor | None = None, token_drop: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Encode a batch.

        Args:
            x: images (B, C, *img_size).
            mask: optional {0, 1} mask on the patch grid (B, D/p, H/p, W/p); ones become the mask token.
            token_drop: optional {0, 1} drop map on the patch grid; ones are set to zero.

        Returns:
            ``cls`` (B, C), ``patch_tokens`` (B, N, C) (final norm), ``s_att`` (B, N) the head-averaged
            [CLS]-to-patch attention of the last block renormalised over patches, ``global`` (B, C) the
            mean of the normed patch tokens, ``features`` the output of every block on the patch grid
            (B, C, D/p, H/p, W/p), the last one normed, and ``sa_grid`` the patch grid as a (3,) tensor.
        """
        self.check_input(x)
        x0 = self.patch_embedding.patch_embeddings(x)  # (B, C, d, h, w)
        if mask is not None:
            m = mask.to(x0.dtype).unsqueeze(1)
            x0 = x0 * (1.0 - m) + self.mask_token.to(x0.dtype) * m
        if token_drop is not None:
            x0 = x0 * (1.0 - token_drop.to(x0.dtype).unsqueeze(1))
        b, c, d, hh, w = x0.shape
        tokens = x0.flatten(2).transpose(1, 2) + self.patch_embedding.position_embeddings
        h = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embedding.dropout(tokens)], dim=1)

        def grid(t: torch.Tensor) -> torch.Tensor:
            return t[:, 1:].transpose(1, 2).reshape(b, c, d, hh, w)

        features = []
        for block in self.blocks:
            h = block(h)
            features.append(grid(h))
        normed = self.norm(h)
        features[-1] = grid(normed)
        att = self.blocks[-1].attn.att_mat  # (B, heads, 1 + N, 1 + N), post-softmax
        cls_to_patch = att[:, :, 0, 1:].float().mean(dim=1)  # float32 even under autocast: sums to 1
        s_att = cls_to_patch / cls_to_patch.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return {
            EncoderOutput.CLS: normed[:, 0],
            EncoderOutput.PATCH_TOKENS: normed[:, 1:],
            EncoderOutput.S_ATT: s_att,
            EncoderOutput.GLOBAL: normed[:, 1:].mean(dim=1),
            EncoderOutput.FEATURES: features,
            EncoderOutput.SA_GRID: torch.tensor([d, hh, w]),
        }
