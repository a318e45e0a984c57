"""Swin-DAGMaN encoder: MONAI's 3D Swin transformer with a mask token and a semantic-attention block."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import SABlock, TransformerBlock
from monai.networks.nets.swin_unetr import SwinTransformer
from monai.utils import ensure_tuple_rep

from dagman_components.networks.fused_attention import cls_attention, fuse_window_attention
from dagman_components.networks.outputs import EncoderOutput

__all__ = ["SemanticAttention", "SwinDAGMaN", "ENCODER_DEFAULTS", "TOKEN_DROP_FILLS", "SA_INITS"]

#: How the semantic-attention blocks are initialised (see :class:`SemanticAttention`).
SA_INITS: tuple[str, ...] = ("default", "dino")


def _dino_init(module: nn.Module) -> None:
    """DINO's initialisation of a ViT block's layers (truncated normal 0.02, zero bias, unit norm)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


#: What a dropped token of the noisy teacher becomes: ``zero`` (the paper's reading) or ``empty``, the embedding of
#: an all-zero patch, so that a dropped token looks like empty tissue instead of a feature of its own.
TOKEN_DROP_FILLS: tuple[str, ...] = ("zero", "empty")

#: The Swin settings of METHOD.md (SMIT production setting); every bundle starts from these.
ENCODER_DEFAULTS: dict = {
    "in_channels": 1,
    "embed_dim": 48,
    "depths": (2, 2, 8, 2),
    "num_heads": (4, 4, 8, 16),
    "window_size": 4,
    "patch_size": 2,
    "sa_stage": 3,
    "sa_depth": 2,
    "sa_heads": 8,
}


class SemanticAttention(nn.Module):
    """Global self-attention over one Swin stage's tokens with a learnable [CLS] token.

    Two (by default) pre-norm ViT blocks (MONAI ``TransformerBlock``) see every token of the stage
    at once; the last block keeps its post-softmax attention so that the [CLS]-to-patch row can
    guide masking. There is no absolute position embedding, so any ROI divisible by 32 is valid.

    Args:
        dim: token width (the stage's channel count after merging).
        depth: number of transformer blocks.
        num_heads: attention heads per block; ``dim`` must be divisible by it.
        mlp_ratio: width of each block's MLP relative to ``dim``.
        drop_rate: dropout inside the blocks.
        use_flash_attention: fused attention (``scaled_dot_product_attention``) in every block, in
            training too; the [CLS] row of the last block's attention, which S_ATT needs and a fused
            block does not return, is then computed on its own (:func:`cls_attention`).
        init: ``default`` (PyTorch's initialisation of MONAI's blocks) or ``dino`` (DINO / timm: linear
            weights truncated normal with std 0.02, biases 0, layer norms 1 and 0).
        head_dim: width of each attention head; ``None``: ``dim // num_heads`` (MONAI's block as is).
            Set, the query/key/value projections are ``num_heads * head_dim`` wide (MONAI's ``SABlock``
            ``dim_head``), so that few channels can still have wide heads (the paper's are 48 wide).

    Raises:
        ValueError: when ``dim`` is not divisible by ``num_heads`` (without ``head_dim``), ``head_dim < 1``
            or ``depth < 1``.
    """

    def __init__(self, dim: int, depth: int = 2, num_heads: int = 8, mlp_ratio: float = 4.0, drop_rate: float = 0.0,
                 use_flash_attention: bool = False, init: str = "default", head_dim: int | None = None):
        super().__init__()
        if init not in SA_INITS:
            raise ValueError(f"sa_init must be one of {list(SA_INITS)}, got {init!r}.")
        if depth < 1:
            raise ValueError(f"sa_depth must be at least 1, got {depth}.")
        if head_dim is None and dim % num_heads != 0:
            raise ValueError(f"sa_heads={num_heads} must divide the semantic-attention width {dim} (or set sa_head_dim).")
        if head_dim is not None and int(head_dim) < 1:
            raise ValueError(f"sa_head_dim must be a positive int or null, got {head_dim}.")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                hidden_size=dim,
                mlp_dim=int(dim * mlp_ratio),
                num_heads=num_heads,
                dropout_rate=drop_rate,
                qkv_bias=True,
                save_attn=i == depth - 1 and not use_flash_attention,
                use_flash_attention=use_flash_attention,
            )
            for i in range(depth)
        )
        for i, block in enumerate(self.blocks):
            if head_dim is not None:  # MONAI's attention with its own head width; same parameter names
                block.attn = SABlock(dim, num_heads, dropout_rate=drop_rate, qkv_bias=True, dim_head=int(head_dim),
                                     save_attn=i == depth - 1 and not use_flash_attention,
                                     use_flash_attention=use_flash_attention)
            block.norm_cross_attn.requires_grad_(False)  # MONAI builds this norm even without cross-attention; it
            # never gets a gradient, which DDP would reject
        if init == "dino":
            self.blocks.apply(_dino_init)
        self.norm = nn.LayerNorm(dim)
        self.use_flash_attention = use_flash_attention

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attend globally.

        Args:
            tokens: patch tokens, shape (B, N, C).

        Returns:
            ``(stream, normed, s_att)``: the residual stream of the patch tokens (B, N, C), which
            continues into the next Swin stage; the final-norm output of [CLS] and patch tokens
            (B, 1 + N, C); and S_ATT, the head-averaged [CLS]-to-patch attention of the last block
            with the [CLS] column dropped and renormalised, shape (B, N), summing to 1.
        """
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for block in self.blocks[:-1]:
            x = block(x)
        if self.use_flash_attention:  # a fused block keeps no probabilities: the [CLS] row on its own
            cls_row = cls_attention(self.blocks[-1], x)  # (B, heads, 1 + N)
        x = self.blocks[-1](x)
        if not self.use_flash_attention:
            cls_row = self.blocks[-1].attn.att_mat[:, :, 0]  # (B, heads, 1 + N, 1 + N): post-softmax, detached
        cls_to_patch = cls_row[:, :, 1:].float().mean(dim=1)  # float32 even under autocast: sums to 1
        s_att = cls_to_patch / cls_to_patch.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return x[:, 1:], self.norm(x), s_att


class SwinDAGMaN(SwinTransformer):
    """MONAI's 3D ``SwinTransformer`` with a learnable mask token and a semantic-attention block.

    The Swin part keeps MONAI's parameter names, so its state dict loads into
    ``SwinUNETR.swinViT`` unchanged. Two inputs change the patch-embedding tokens before stage 1:
    ``mask`` replaces tokens by the mask token (``x*(1-m) + t*m``, the student's masked view) and
    ``token_drop`` sets tokens to zero (the noisy teacher's patch dropout). After stage
    ``sa_stage`` (after its patch merging) the tokens pass through :class:`SemanticAttention`,
    whose patch tokens continue into the next stage.

    Args:
        in_channels: image channels.
        embed_dim: patch-embedding width (48 in METHOD.md).
        depths: Swin blocks per stage.
        num_heads: attention heads per stage.
        window_size: local window size (int for isotropic).
        patch_size: patch-embedding size (int for isotropic).
        sa_stage: 1-based stage after which the semantic-attention block sits (1..len(depths)); ``None``
            builds a plain Swin encoder with a mask token (no [CLS], patch tokens or S_ATT in the output),
            the backbone of the SimMIM-like baseline.
        sa_depth: transformer blocks in the semantic-attention block.
        sa_heads: attention heads of the semantic-attention block.
        sa_head_dim: width of each of its heads; ``None``: the SA width / ``sa_heads`` (at embed 24 and
            stage 2, 96 / 8 = 12). An architecture setting (it shapes the weights), recorded in the card.
        mlp_ratio: MLP width ratio of every block.
        drop_path_rate: stochastic depth of the Swin blocks (0.1 for the student, 0 for inference).
        use_checkpoint: MONAI's gradient-checkpointing switch (saves memory at 128^3 on small GPUs).
        use_flash_attention: fused attention (``scaled_dot_product_attention``) in the window attentions
            (:class:`~dagman_components.networks.fused_attention.FusedWindowAttention`: with gradients
            too, except on CPU where no fused kernel trains the position bias) and in the
            semantic-attention block. Same weights and state-dict keys; the outputs equal the unfused
            ones within float rounding. An execution setting, like ``use_checkpoint``.
        sa_init: initialisation of the semantic-attention blocks (``default`` or ``dino``, see
            :class:`SemanticAttention`); a training choice, not recorded as an architecture setting.
        token_drop_fill: what a dropped token becomes (:data:`TOKEN_DROP_FILLS`): ``zero`` or ``empty``
            (the embedding of an all-zero patch, so dropping carries no more signal than empty tissue).

    Raises:
        ValueError: for an ``sa_stage`` outside 1..len(depths) or an SA width not divisible by
            ``sa_heads`` (without ``sa_head_dim``).

    Example::

        net = SwinDAGMaN(embed_dim=12, num_heads=(3, 3, 3, 3))
        out = net(torch.rand(1, 1, 64, 64, 64))
        out["cls"].shape, out["s_att"].shape  # (1, 96), (1, 64)
    """

    def __init__(
        self,
        in_channels: int = 1,
        embed_dim: int = 48,
        depths: Sequence[int] = (2, 2, 8, 2),
        num_heads: Sequence[int] = (4, 4, 8, 16),
        window_size: Sequence[int] | int = 4,
        patch_size: Sequence[int] | int = 2,
        sa_stage: int | None = 3,
        sa_depth: int = 2,
        sa_heads: int = 8,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        use_flash_attention: bool = False,
        token_drop_fill: str = "zero",
        sa_init: str = "default",
        sa_head_dim: int | None = None,
    ) -> None:
        if sa_stage is not None and not 1 <= sa_stage <= len(depths):
            raise ValueError(f"sa_stage must be in 1..{len(depths)}, got {sa_stage}.")
        if token_drop_fill not in TOKEN_DROP_FILLS:
            raise ValueError(f"token_drop_fill must be one of {list(TOKEN_DROP_FILLS)}, got {token_drop_fill!r}.")
        super().__init__(
            in_chans=in_channels,
            embed_dim=embed_dim,
            window_size=ensure_tuple_rep(window_size, 3),
            patch_size=ensure_tuple_rep(patch_size, 3),
            depths=depths,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            drop_path_rate=drop_path_rate,
            use_checkpoint=use_checkpoint,
            spatial_dims=3,
            use_flash_attention=use_flash_attention,
        )
        if use_flash_attention:
            fuse_window_attention(self)
        self.in_channels = in_channels
        self.token_drop_fill = token_drop_fill
        self.sa_stage = sa_stage
        self.mask_grid_stage = sa_stage or 3  # masks live on the SA grid, on the stage-3 grid without SA
        self.sa_dim = embed_dim * 2**self.mask_grid_stage
        self.out_dim = embed_dim * 2 ** len(depths)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim, 1, 1, 1))
        self.sa = (
            SemanticAttention(self.sa_dim, depth=sa_depth, num_heads=sa_heads, mlp_ratio=mlp_ratio,
                              use_flash_attention=use_flash_attention, init=sa_init, head_dim=sa_head_dim)
            if sa_stage is not None
            else None
        )

    def empty_patch_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """(1, embed_dim, 1, 1, 1): the patch embedding of an all-zero patch (empty tissue after the HU
        window), in ``x``'s dtype and device."""
        return self.patch_embed(x.new_zeros(1, x.shape[1], *(int(p) for p in self.patch_size))).to(x.dtype)

    @property
    def sa_stride(self) -> int:
        """Voxels per side of one semantic-attention (mask-grid) cell."""
        return int(self.patch_size[0]) * 2**self.mask_grid_stage

    @property
    def patches_per_sa_cell(self) -> int:
        """Patch-embedding tokens per side of one semantic-attention cell."""
        return 2**self.mask_grid_stage

    @property
    def input_divisor(self) -> int:
        """Every spatial side of the input must be a multiple of this (32 for the defaults)."""
        return int(self.patch_size[0]) * 2 ** len(self.layers_list())

    def layers_list(self) -> list[nn.Module]:
        """The Swin stages in order (MONAI keeps them in ``layers1`` .. ``layers4``)."""
        return [getattr(self, f"layers{i + 1}")[0] for i in range(self.num_layers)]

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming the problem when ``x`` is not (B, C, D, H, W) with sides divisible by 32."""
        if x.ndim != 5:
            raise ValueError(f"SwinDAGMaN expects a (B, C, D, H, W) tensor, got shape {tuple(x.shape)}.")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"SwinDAGMaN was built with in_channels={self.in_channels}, got {x.shape[1]} channels.")
        bad = [s for s in x.shape[2:] if s % self.input_divisor]
        if bad:
            raise ValueError(
                f"every spatial side must be divisible by {self.input_divisor} (roi_size); got {tuple(x.shape[2:])}."
            )

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, mask: torch.Tensor | None = None, token_drop: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Encode a batch.

        Args:
            x: images, (B, C, D, H, W), sides divisible by :attr:`input_divisor`.
            mask: optional boolean or {0, 1} mask on the patch-embedding grid, (B, D/p, H/p, W/p);
                ones are replaced by the mask token.
            token_drop: optional {0, 1} drop map on the patch-embedding grid; ones are set to zero, or
                with ``token_drop_fill="empty"`` to the embedding of an empty (all-zero) patch.

        Returns:
            A dict with ``cls`` (B, C_sa), ``patch_tokens`` (B, N, C_sa) on the SA grid (normed),
            ``s_att`` (B, N), ``global`` (B, C_out) the average-pooled last-stage output,
            ``features`` the list of MONAI's five normalised hidden states (patch embedding and
            each stage after merging; the last one is (B, C_out, D/32, H/32, W/32)), and
            ``sa_grid`` the SA grid shape as a (3,) long tensor.
        """
        self.check_input(x)
        x0 = self.patch_embed(x)
        if mask is not None:
            m = mask.to(x0.dtype).unsqueeze(1)
            x0 = x0 * (1.0 - m) + self.mask_token.to(x0.dtype) * m
        if token_drop is not None:
            d = token_drop.to(x0.dtype).unsqueeze(1)
            fill = self.empty_patch_embedding(x) if self.token_drop_fill == "empty" else 0.0
            x0 = x0 * (1.0 - d) + fill * d
        h = self.pos_drop(x0)
        features = [self.proj_out(h, True)]
        out: dict[str, torch.Tensor | list[torch.Tensor]] = {}
        for stage, layer in enumerate(self.layers_list(), start=1):
            h = layer(h.contiguous())
            if stage == self.sa_stage and self.sa is not None:
                b, c, d, hh, w = h.shape
                with torch.profiler.record_function("dagman/semantic_attention"):
                    stream, normed, s_att = self.sa(h.flatten(2).transpose(1, 2))
                h = stream.transpose(1, 2).reshape(b, c, d, hh, w)
                out[EncoderOutput.CLS] = normed[:, 0]
                out[EncoderOutput.PATCH_TOKENS] = normed[:, 1:]
                out[EncoderOutput.S_ATT] = s_att
                out[EncoderOutput.SA_GRID] = torch.tensor([d, hh, w])
            features.append(self.proj_out(h, True))
        out[EncoderOutput.FEATURES] = features
        out[EncoderOutput.GLOBAL] = features[-1].mean(dim=(2, 3, 4))
        return out
