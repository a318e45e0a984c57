"""Masks on the semantic-attention grid: attention-guided (DAGMaN), random (SMIT), block (iBOT/BEiT),
their upsampling to the patch grid and to voxels, and the noisy teacher's patch dropout."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import Randomizable
from monai.utils import StrEnum, look_up_option

__all__ = [
    "MaskingStrategy",
    "HintRule",
    "AttentionGuidedMasking",
    "PatchDropout",
    "upsample_mask",
    "masking_counts",
]


class MaskingStrategy(StrEnum):
    """How the student's mask is drawn on the semantic-attention grid."""

    ATTENTION_HINT = "attention_hint"  # DAGMaN default: mask the most attended, reveal a few hints
    ATTENTION_HIGH = "attention_high"  # AttMask-High: mask the most attended
    ATTENTION_LOW = "attention_low"  # AttMask-Low (MST stand-in): mask the least attended
    RANDOM = "random"  # SMIT: uniform random cells
    BLOCK = "block"  # iBOT / BEiT: random 3D cuboids


class HintRule(StrEnum):
    """How ``attention_hint`` leaves hints visible."""

    ATTMASK = "attmask"  # mask the top r*N, then reveal s*r*N drawn from the top s*N (AttMask-Hint)
    LITERAL = "literal"  # leave the top s*N visible and mask the next r*N


def masking_counts(num_cells: int, mask_ratio: float, hint_ratio: float) -> dict[str, int]:
    """The integer counts every strategy uses, so that tests and docs agree with the code.

    Args:
        num_cells: N, cells of the semantic-attention grid.
        mask_ratio: r.
        hint_ratio: s.

    Returns:
        ``num_masked`` = round(r*N), ``hint_pool`` = round(s*N) and ``num_hints`` = round(s*r*N).
    """
    return {
        "num_masked": int(round(mask_ratio * num_cells)),
        "hint_pool": int(round(hint_ratio * num_cells)),
        "num_hints": int(round(hint_ratio * mask_ratio * num_cells)),
    }


class AttentionGuidedMasking(Randomizable):
    """Draw the student's masks on the semantic-attention (SA) grid, one per image, every image masked.

    With ``attention_hint`` (default), cells are ranked by the teacher's [CLS]-to-patch attention
    S_ATT; the top ``round(r*N)`` are masked and then ``round(s*r*N)`` of them, drawn uniformly
    without replacement from the top ``round(s*N)``, are revealed again (AttMask-Hint), so
    ``round(r*N) - round(s*r*N)`` cells are masked. ``hint_rule="literal"`` instead keeps the top
    ``round(s*N)`` visible and masks the next ``round(r*N)``. ``attention_high`` / ``attention_low``
    mask the ``round(r*N)`` most / least attended cells; ``random`` masks ``round(r*N)`` uniformly
    drawn cells; ``block`` adds random cuboids (volume at least ``min_block_cells``, aspect ratios
    log-uniform in [``min_aspect``, 1/``min_aspect``]) until ``round(r*N)`` cells are covered, topping
    up with random cells when no cuboid fits, so the count is exact.

    Args:
        strategy: a :class:`MaskingStrategy` value.
        mask_ratio: r, in (0, 1).
        hint_ratio: s, in [0, 1).
        hint_rule: a :class:`HintRule` value.
        min_block_cells: smallest cuboid volume for ``block``.
        min_aspect: smallest aspect ratio of a cuboid for ``block``.
        mask_probability: the probability that an image is masked at all (AttMask masks half the
            images: 0.5); an unmasked image gets an all-False mask, so its [CLS] sees everything the
            teacher attends to. 1 masks every image (the paper's reading).
        mask_ratio_range: ``(low, high)``: each masked image draws its ratio uniformly from this range
            instead of using ``mask_ratio`` (AttMask: 0.3 +/- 0.2 is ``(0.1, 0.5)``).
        attention_warmup_steps: for the attention strategies, the first this many optimizer steps
            (``step`` of :meth:`__call__`, 1-based) mask uniformly random cells instead (iBOT starts
            masking late; a freshly initialised teacher's attention carries no information).

    Raises:
        ValueError: for an unknown strategy or rule or a ratio or probability out of range.

    Example::

        masking = AttentionGuidedMasking().set_random_state(0)
        m = masking(torch.rand(2, 64).softmax(-1), grid=(4, 4, 4))  # (2, 64) bool, 40 True per row
    """

    def __init__(
        self,
        strategy: str = MaskingStrategy.ATTENTION_HINT,
        mask_ratio: float = 0.7,
        hint_ratio: float = 0.1,
        hint_rule: str = HintRule.ATTMASK,
        min_block_cells: int = 4,
        min_aspect: float = 0.3,
        mask_probability: float = 1.0,
        mask_ratio_range: Sequence[float] | None = None,
        attention_warmup_steps: int = 0,
    ) -> None:
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}.")
        if not 0.0 <= float(mask_probability) <= 1.0:
            raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}.")
        if mask_ratio_range is not None:
            low, high = (float(v) for v in mask_ratio_range)
            if not 0.0 < low <= high < 1.0:
                raise ValueError(f"mask_ratio_range must be [low, high] with 0 < low <= high < 1, got {list(mask_ratio_range)}.")
        if int(attention_warmup_steps) < 0:
            raise ValueError(f"attention_warmup_steps must be >= 0, got {attention_warmup_steps}.")
        if not 0.0 <= hint_ratio < 1.0:
            raise ValueError(f"hint_ratio must be in [0, 1), got {hint_ratio}.")
        if not 0.0 < min_aspect <= 1.0:
            raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}.")
        self.strategy = look_up_option(strategy, MaskingStrategy)
        self.hint_rule = look_up_option(hint_rule, HintRule)
        self.mask_ratio = mask_ratio
        self.hint_ratio = hint_ratio
        self.min_block_cells = max(1, int(min_block_cells))
        self.min_aspect = min_aspect
        self.mask_probability = float(mask_probability)
        self.mask_ratio_range = None if mask_ratio_range is None else tuple(float(v) for v in mask_ratio_range)
        self.attention_warmup_steps = int(attention_warmup_steps)

    @property
    def needs_attention(self) -> bool:
        """Whether the strategy reads S_ATT."""
        return self.strategy.startswith("attention")

    def randomize(self, data: None = None) -> None:
        """All draws happen inside :meth:`__call__` through ``self.R``."""

    def _uniform_ranks(self, batch_size: int, n: int, device: torch.device) -> torch.Tensor:
        """A uniformly random permutation of ``range(n)`` per row, (B, n), drawn from ``self.R``."""
        keys = torch.from_numpy(self.R.random_sample((batch_size, n))).to(device)
        return torch.argsort(keys, dim=1)

    def _attention_masks(self, scores: torch.Tensor, mask_ratio: float) -> torch.Tensor:
        """Masks of the attention strategies for a whole batch, on the device of ``scores`` (B, N)."""
        b, n = scores.shape
        c = masking_counts(n, mask_ratio, self.hint_ratio)
        order = torch.argsort(-scores, dim=1, stable=True)  # most attended first, ties by position
        if self.strategy == MaskingStrategy.ATTENTION_LOW:
            chosen = order[:, n - c["num_masked"] :]
        elif self.strategy == MaskingStrategy.ATTENTION_HIGH:
            chosen = order[:, : c["num_masked"]]
        elif self.hint_rule == HintRule.LITERAL:
            chosen = order[:, c["hint_pool"] : c["hint_pool"] + c["num_masked"]]
        else:
            chosen = order[:, : c["num_masked"]]
        mask = torch.zeros(b, n, dtype=torch.bool, device=scores.device).scatter_(1, chosen, True)
        if self.strategy == MaskingStrategy.ATTENTION_HINT and self.hint_rule == HintRule.ATTMASK:
            pool = order[:, : min(c["hint_pool"], c["num_masked"])]
            num_hints = min(c["num_hints"], pool.shape[1])
            if num_hints > 0:
                picks = self._uniform_ranks(b, pool.shape[1], scores.device)[:, :num_hints]
                mask.scatter_(1, pool.gather(1, picks), False)
        return mask

    def _block_mask(self, grid: Sequence[int], mask_ratio: float) -> np.ndarray:
        n = int(np.prod(grid))
        target = masking_counts(n, mask_ratio, self.hint_ratio)["num_masked"]
        mask = np.zeros(tuple(grid), dtype=bool)
        log_aspect = (math.log(self.min_aspect), -math.log(self.min_aspect))
        for _ in range(10 * n):
            missing = target - int(mask.sum())
            if missing <= 0:
                break
            volume = self.R.uniform(self.min_block_cells, max(self.min_block_cells, missing))
            a1, a2 = np.exp(self.R.uniform(*log_aspect, size=2))
            side = (volume / (a1 * a2)) ** (1.0 / 3.0)
            dims = [int(round(side * f)) for f in (1.0, a1, a2)]
            if any(d < 1 or d > g for d, g in zip(dims, grid)):
                continue
            start = [self.R.randint(0, g - d + 1) for d, g in zip(dims, grid)]
            block = tuple(slice(s, s + d) for s, d in zip(start, dims))
            if int((~mask[block]).sum()) <= missing:  # never overshoot the target
                mask[block] = True
        flat = mask.reshape(-1)
        missing = target - int(flat.sum())
        if missing > 0:
            flat[self.R.choice(np.flatnonzero(~flat), size=missing, replace=False)] = True
        return flat

    def __call__(self, s_att: torch.Tensor | None, grid: Sequence[int], batch_size: int | None = None,
                 step: int | None = None) -> torch.Tensor:
        """Draw one mask per image.

        Args:
            s_att: the teacher's attention on the SA grid, (B, N); may be ``None`` for ``random`` and
                ``block`` when ``batch_size`` is given.
            grid: the SA grid (d, h, w), with ``d*h*w == N``.
            batch_size: images to mask when ``s_att`` is ``None``.
            step: the 1-based optimizer step (for ``attention_warmup_steps``; ``None``: after it).

        Returns:
            A boolean tensor (B, N), True = masked, on ``s_att``'s device (CPU otherwise).

        Raises:
            ValueError: when attention is needed but missing, or the grid does not match N.
        """
        grid = [int(g) for g in grid]
        n = int(np.prod(grid))
        if s_att is None:
            if self.needs_attention or batch_size is None:
                raise ValueError(f"masking strategy '{self.strategy}' needs s_att (or batch_size for random/block).")
            b, device = batch_size, torch.device("cpu")
        else:
            if s_att.ndim != 2 or s_att.shape[1] != n:
                raise ValueError(f"s_att has shape {tuple(s_att.shape)}, expected (B, {n}) for grid {tuple(grid)}.")
            b, device = s_att.shape[0], s_att.device
        warming_up = self.needs_attention and step is not None and int(step) <= self.attention_warmup_steps
        strategy = MaskingStrategy.RANDOM if warming_up else self.strategy
        if self.mask_ratio_range is None:
            masks = self._masks(strategy, s_att, grid, b, device, self.mask_ratio)
        else:  # one ratio per image
            ratios = self.R.uniform(*self.mask_ratio_range, size=b)
            masks = torch.cat([self._masks(strategy, None if s_att is None else s_att[i : i + 1], grid, 1, device, float(r))
                               for i, r in enumerate(ratios)])
        if self.mask_probability < 1.0:
            keep = torch.from_numpy(self.R.random_sample(b) < self.mask_probability).to(masks.device)
            masks = masks & keep[:, None]
        return masks

    def _masks(self, strategy: str, s_att: torch.Tensor | None, grid: Sequence[int], b: int, device: torch.device,
               mask_ratio: float) -> torch.Tensor:
        """(B, N) masks of one strategy at one ratio."""
        n = int(np.prod(grid))
        if strategy.startswith("attention"):
            return self._attention_masks(s_att.detach().float(), mask_ratio)  # type: ignore[union-attr]
        if strategy == MaskingStrategy.RANDOM:
            chosen = self._uniform_ranks(b, n, device)[:, : masking_counts(n, mask_ratio, self.hint_ratio)["num_masked"]]
            return torch.zeros(b, n, dtype=torch.bool, device=device).scatter_(1, chosen, True)
        return torch.from_numpy(np.stack([self._block_mask(grid, mask_ratio) for _ in range(b)])).to(device)


class PatchDropout(Randomizable):
    """The noisy teacher's input noise: each patch-embedding token is zeroed with probability ``rate``,
    independently per image (and per view, as each call draws anew).

    Args:
        rate: rt, in [0, 1); 0 disables the dropout (returns ``None``).

    Raises:
        ValueError: when ``rate`` is outside [0, 1).
    """

    def __init__(self, rate: float = 0.7) -> None:
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"teacher patch-dropout rate must be in [0, 1), got {rate}.")
        self.rate = rate

    def randomize(self, data: None = None) -> None:
        """Draws happen in :meth:`__call__`."""

    def __call__(self, batch_size: int, patch_grid: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Draw a drop map (B, d, h, w) of {0., 1.} (1 = dropped), or ``None`` when ``rate`` is 0."""
        if self.rate == 0.0:
            return None
        drop = self.R.random_sample((batch_size, *[int(g) for g in patch_grid])) < self.rate
        return torch.from_numpy(drop.astype(np.float32)).to(device)


def upsample_mask(mask: torch.Tensor, grid: Sequence[int], factor: int) -> torch.Tensor:
    """Repeat every cell of a grid mask ``factor`` times per axis (nearest upsampling).

    Args:
        mask: (B, N) with N = prod(grid).
        grid: (d, h, w).
        factor: repetitions per axis (patches per SA cell for the student input, voxels per SA
            cell for the reconstruction loss).

    Returns:
        (B, d*factor, h*factor, w*factor), same dtype as ``mask``.
    """
    m = mask.reshape(mask.shape[0], *[int(g) for g in grid])
    for axis in (1, 2, 3):
        m = m.repeat_interleave(factor, dim=axis)
    return m
