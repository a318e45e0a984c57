"""Fused attention for the Swin-DAGMaN encoder: one ``scaled_dot_product_attention`` call per window
batch, with gradients, and the semantic-attention [CLS] row computed on its own.

MONAI's ``WindowAttention`` takes the fused path (``use_flash_attention``) only while gradients are
off, so the student's step still materialises every window's attention matrix, its softmax and their
gradients as separate tensors. :class:`FusedWindowAttention` is the same module (same parameters,
buffers and state-dict keys) whose forward calls ``torch.nn.functional.scaled_dot_product_attention``
with the relative position bias (plus the shifted-window mask) as the additive attention mask, also
when the step trains (gradients reach the bias table through that mask), except on CPU with
gradients, where PyTorch has no fused kernel for that and MONAI's path is faster.
:func:`fuse_window_attention` switches the window attentions of a built network in place, so the
weights, their initial values and the random stream stay what the unfused network would have.

A fused self-attention block does not return its attention probabilities; :func:`cls_attention`
computes the one row S_ATT needs ([CLS] to every token, per head) from the block's input.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock
from monai.networks.nets.swin_unetr import WindowAttention

__all__ = ["FusedWindowAttention", "fuse_window_attention", "cls_attention"]


class FusedWindowAttention(WindowAttention):
    """MONAI's 3D/2D ``WindowAttention`` computed by ``scaled_dot_product_attention``, with gradients too.

    Same constructor, parameters and state-dict keys as ``WindowAttention``; only the forward
    differs. The result equals the unfused path within float rounding (the attention is the same
    sum, taken in another order); the bias table's gradient reaches it through the attention mask.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        """Attend within each window: fused where a fused kernel can take the step, else MONAI's path.

        On CPU, PyTorch's fused (flash) kernel gives no gradient for the attention mask, so a
        step that trains the bias table would run SDPA's unfused math path, which measured slower
        than MONAI's own (pretraining README, "Benchmark"); there this module takes MONAI's path.
        Without gradients (teacher pass, inference) and on CUDA it takes :meth:`fused_forward`.

        Args:
            x: window tokens, ``(B * num_windows, N, C)`` with windows varying fastest, as MONAI lays them out.
            mask: the shifted-window mask, ``(num_windows, N, N)`` with 0 and -100, or ``None``.

        Returns:
            The attended tokens, ``(B * num_windows, N, C)``.
        """
        if x.device.type == "cpu" and torch.is_grad_enabled() and self.relative_position_bias_table.requires_grad:
            return super().forward(x, mask)
        return self.fused_forward(x, mask)

    def fused_forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attend within each window with one ``scaled_dot_product_attention`` call.

        Args:
            x: window tokens, ``(B * num_windows, N, C)`` with windows varying fastest, as MONAI lays them out.
            mask: the shifted-window mask, ``(num_windows, N, N)`` with 0 and -100, or ``None``.

        Returns:
            The attended tokens, ``(B * num_windows, N, C)``.
        """
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        index = self.relative_position_index[:n, :n].reshape(-1)  # type: ignore[index]
        bias = self.relative_position_bias_table[index].view(n, n, self.num_heads).permute(2, 0, 1)  # (heads, N, N)
        if mask is None:
            bias = bias.unsqueeze(0)
        else:  # (B * nw, heads, N, N): each window gets its own shift mask on top of the shared bias
            nw = mask.shape[0]
            bias = (bias.unsqueeze(0) + mask.to(bias.dtype).unsqueeze(1)).repeat(b // nw, 1, 1, 1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


def fuse_window_attention(network: nn.Module, enabled: bool = True) -> nn.Module:
    """Make every MONAI ``WindowAttention`` inside ``network`` a :class:`FusedWindowAttention`, in place.

    Only the modules' class changes: parameters, buffers, state-dict keys and values stay, so the
    weights still load into MONAI's ``SwinUNETR`` and a fused and an unfused network built with
    the same seed hold the same numbers.

    Args:
        network: any module (a ``SwinTransformer``, a ``SwinDAGMaN``, a ``SwinUNETR``).
        enabled: ``False`` returns ``network`` untouched (the config switch ``use_flash_attention``).

    Returns:
        ``network`` itself.
    """
    if enabled:
        for module in network.modules():
            if type(module) is WindowAttention:
                module.__class__ = FusedWindowAttention
    return network


@torch.no_grad()
def cls_attention(block: TransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """The post-softmax attention of token 0 ([CLS]) to every token in one MONAI ``TransformerBlock``.

    What the block's unfused attention would store in row 0 of ``attn.att_mat``, computed from the
    block's input without the other rows: ``softmax(q_cls . k^T * scale)`` per head, with the
    block's own layer norm and query/key projections. No gradients (S_ATT is a detached signal).

    Args:
        block: a ``TransformerBlock`` whose attention uses the combined ``qkv`` projection.
        x: the block's input, ``(B, 1 + N, C)``, [CLS] first.

    Returns:
        ``(B, heads, 1 + N)``, each row summing to 1.
    """
    attn = block.attn
    h = block.norm1(x)
    inner = attn.inner_dim
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(h[:, :1], weight[:inner], None if bias is None else bias[:inner])  # (B, 1, inner)
    k = F.linear(h, weight[inner:2 * inner], None if bias is None else bias[inner:2 * inner])  # (B, 1 + N, inner)
    b, n, _ = k.shape
    q = q.view(b, 1, attn.num_heads, attn.dim_head).transpose(1, 2)  # (B, heads, 1, d)
    k = k.view(b, n, attn.num_heads, attn.dim_head).transpose(1, 2)  # (B, heads, 1 + N, d)
    return ((q @ k.transpose(-2, -1)).squeeze(2) * attn.scale).softmax(dim=-1)
