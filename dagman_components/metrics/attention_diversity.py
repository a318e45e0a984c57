"""Attention-head diversity of Swin stages: attention distance per head and query, and entropies.

For each window-attention block, the attention distance of head h at query i is
``d[h, i] = sum_j A[h, i, j] * ||p_i - p_j||`` with ``p`` the window-local token coordinates (in
tokens). All distances of a stage are pooled and summarised by the Shannon entropy (bits) of their
histogram over 64 fixed bins on ``[0, sqrt(3) * window]``; per head, the mean distance and the mean
attention entropy ``-sum_j A[h, i, j] log2 A[h, i, j]`` are reported too.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    "window_coordinates",
    "attention_distance",
    "attention_entropy",
    "histogram_entropy_bits",
    "SwinAttentionRecorder",
    "stage_diversity",
]


def window_coordinates(window: Sequence[int]) -> torch.Tensor:
    """Token coordinates of a window in MONAI's flattening order (d, h, w), shape (n, 3)."""
    grids = torch.meshgrid(*[torch.arange(int(s)) for s in window], indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1).float()


def attention_distance(attn: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """Mean attended distance per head and query.

    Args:
        attn: post-softmax attention (..., heads, n, n), rows summing to 1.
        window: the window's token extent (d, h, w) with d*h*w == n.

    Returns:
        (..., heads, n): ``sum_j A[h, i, j] * ||p_i - p_j||`` in tokens.

    Raises:
        ValueError: when the window does not hold n tokens.
    """
    n = attn.shape[-1]
    if int(np.prod(window)) != n:
        raise ValueError(f"window {tuple(window)} holds {int(np.prod(window))} tokens, attention has {n}.")
    p = window_coordinates(window).to(attn.device)
    dist = torch.cdist(p, p)  # (n, n)
    return (attn.float() * dist).sum(dim=-1)


def attention_entropy(attn: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each attention row: (..., heads, n, n) -> (..., heads, n)."""
    a = attn.float().clamp_min(1e-12)
    return -(attn.float() * torch.log2(a)).sum(dim=-1)


def histogram_entropy_bits(values: np.ndarray, window: int, bins: int = 64) -> float:
    """Shannon entropy (bits) of the histogram of ``values`` over ``bins`` fixed bins on
    ``[0, sqrt(3) * window]`` (values outside are clipped into the end bins)."""
    upper = math.sqrt(3.0) * window
    counts, _ = np.histogram(np.clip(values, 0.0, upper), bins=bins, range=(0.0, upper))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _window_of(n: int, configured: Sequence[int]) -> tuple[int, ...]:
    if int(np.prod(configured)) == n:
        return tuple(int(s) for s in configured)
    side = round(n ** (1.0 / 3.0))
    if side**3 == n:  # MONAI shrinks the window to the grid when the grid is smaller
        return (side, side, side)
    raise ValueError(f"cannot infer the window of {n} tokens (configured {tuple(configured)}).")


class SwinAttentionRecorder:
    """Record the post-softmax window attention of every Swin block of a MONAI ``SwinTransformer``
    (or ``SwinDAGMaN``) through forward hooks on each ``WindowAttention.softmax``.

    Use as a context manager around forward passes; ``records[stage]`` then holds, per block call,
    ``(attention (windows*B, heads, n, n), window)`` on the CPU.

    Args:
        encoder: the Swin encoder (``layers1`` .. ``layers4``).
    """

    def __init__(self, encoder: nn.Module) -> None:
        self.encoder = encoder
        self.records: dict[int, list[tuple[torch.Tensor, tuple[int, ...]]]] = defaultdict(list)
        self._handles: list = []

    def __enter__(self) -> SwinAttentionRecorder:
        for stage in range(1, 5):
            layers = getattr(self.encoder, f"layers{stage}", None)
            if layers is None:
                continue
            for block in layers[0].blocks:
                attn = block.attn
                hook = self._hook(stage, attn.window_size)
                self._handles.append(attn.softmax.register_forward_hook(hook))
        return self

    def _hook(self, stage: int, configured: Sequence[int]):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.records[stage].append((output.detach().cpu(), _window_of(output.shape[-1], configured)))

        return record

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def stage_diversity(records: Sequence[tuple[torch.Tensor, tuple[int, ...]]], bins: int = 64) -> dict:
    """Summarise one stage's recorded attention.

    Args:
        records: ``SwinAttentionRecorder.records[stage]``.
        bins: histogram bins.

    Returns:
        ``distance_entropy_bits`` (entropy of the pooled distance histogram), ``per_head_mean_distance``
        and ``per_head_attention_entropy_bits`` (lists over heads, averaged over blocks, windows and
        queries), and ``num_distances``.
    """
    if not records:
        raise ValueError("no attention was recorded for this stage.")
    pooled, head_dist, head_ent = [], [], []
    window = max(max(w) for _, w in records)
    for attn, win in records:
        d = attention_distance(attn, win)  # (windows, heads, n)
        pooled.append(d.reshape(-1).numpy())
        head_dist.append(d.mean(dim=(0, 2)).numpy())
        head_ent.append(attention_entropy(attn).mean(dim=(0, 2)).numpy())
    values = np.concatenate(pooled)
    return {
        "distance_entropy_bits": histogram_entropy_bits(values, window, bins),
        "per_head_mean_distance": np.mean(head_dist, axis=0).tolist(),
        "per_head_attention_entropy_bits": np.mean(head_ent, axis=0).tolist(),
        "num_distances": int(values.size),
    }
