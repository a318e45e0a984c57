"""DAGMaN's losses: three self-distillation cross-entropies (AITD, AMPD, GITD) and masked-image
reconstruction (AMIP)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from dagman_components.losses.diagnostics import attention_diagnostics, distillation_diagnostics, prefixed

__all__ = ["DistillationCrossEntropy", "masked_l1", "koleo_loss", "DAGMaNLoss", "LOSS_TERMS", "REGULARISERS"]

#: Names of the four loss terms of the method, in the order they are logged.
LOSS_TERMS = ("amip", "ampd", "aitd", "gitd")
#: Optional terms outside the paper (weight 0 by default), logged after the four.
REGULARISERS = ("koleo",)


class DistillationCrossEntropy(nn.Module):
    """Cross-entropy between sharpened, centred teacher targets and student predictions, with the
    centre kept as a buffer and updated only by an explicit :meth:`update_center` call.

    ``loss = -sum_k softmax((t - c)/tau_t)_k * log_softmax(s/tau_s)_k`` per token.

    Args:
        out_dim: logits width K.
        student_temp: tau_s (0.1).
        center_momentum: c <- m*c + (1-m)*mean(teacher logits) (0.9).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"student_temp must be positive, got {student_temp}.")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def targets(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Teacher probabilities ``softmax((t - c)/tau_t)`` (no gradient)."""
        return F.softmax((teacher_logits.detach().float() - self.center) / teacher_temp, dim=-1)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Per-token cross-entropy, shape = logits' shape without the last axis."""
        log_p = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        return -(self.targets(teacher_logits, teacher_temp) * log_p).sum(dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """Move the centre towards the mean teacher logit over every token, all-reduced across
        processes when a process group is initialised.

        Args:
            teacher_logits: (..., K), all teacher outputs of this step.
        """
        flat = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1])
        total = flat.sum(dim=0, keepdim=True)
        count = torch.tensor([float(flat.shape[0])], device=flat.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(total / count, alpha=1.0 - self.center_momentum)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, voxel_mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """AMIP: ``sum(|pred - target| * M) / (sum(M) + eps)`` over the whole batch.

    Args:
        pred: reconstruction (B, C, D, H, W).
        target: the clean view (B, C, D, H, W).
        voxel_mask: (B, D, H, W) or (B, 1, D, H, W), 1 on masked voxels.
    """
    m = voxel_mask.to(pred.dtype)
    if m.ndim == pred.ndim - 1:
        m = m.unsqueeze(1)
    m = m.expand_as(pred)
    return ((pred.float() - target.float()).abs() * m).sum() / (m.sum() + eps)


def _cat_optional(a: dict, b: dict, key: str) -> torch.Tensor | None:
    return torch.cat([a[key], b[key]]) if key in a and key in b else None


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimator as a loss (DINOv2's KoLeo regulariser):
    ``-mean_i log(min_{j != i} ||z_i - z_j||)`` over the rows of L2-normalised ``features``.

    Minimising it pushes each sample away from its nearest neighbour in the batch, so that the
    features spread over the sphere instead of collapsing onto one point.

    Args:
        features: (B, d) L2-normalised features of B different images (one view each).
        eps: added to the distance inside the log.

    Returns:
        The loss (0 for fewer than two rows).
    """
    z = features.float()
    if z.shape[0] < 2:
        return z.sum() * 0.0
    dist = torch.cdist(z, z)
    dist = dist + torch.eye(z.shape[0], device=z.device, dtype=z.dtype) * 1e4  # never one's own neighbour
    return -torch.log(dist.min(dim=1).values + eps).mean()


class DAGMaNLoss(nn.Module):
    """``total = w_amip*AMIP + w_ampd*AMPD + w_aitd*AITD + w_gitd*GITD`` (weights 1, 0.1, 0.1, 0.1),
    plus ``w_koleo*KoLeo`` when that weight is set (0 by default: not part of the paper).

    KoLeo (:func:`koleo_loss`) acts on the student's L2-normalised [CLS] and global bottleneck
    features, within each view across the batch (the two views of one volume are never compared),
    averaged over the two tokens and views; it is logged as ``koleo`` whatever its weight.

    Takes the student's and teacher's outputs for both views (dicts as returned by
    :class:`~dagman_components.networks.DAGMaNPretrainNetwork`) and the masks; returns the total and
    each term, so every term can be logged. Centres are updated only by :meth:`update_centers`.

    Args:
        out_dim: prototypes K of the projection heads.
        weights: dict of term weights; missing keys keep the default; 0 disables a term.
        student_temp: tau_s.
        center_momentum: centre EMA momentum.

    Raises:
        ValueError: for an unknown term name or a negative weight.
    """

    default_weights = {"amip": 1.0, "ampd": 0.1, "aitd": 0.1, "gitd": 0.1, "koleo": 0.0}

    def __init__(
        self,
        out_dim: int = 8192,
        weights: dict[str, float] | None = None,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        unknown = set(weights or {}) - set(LOSS_TERMS + REGULARISERS)
        if unknown:
            raise ValueError(f"unknown loss weight(s) {sorted(unknown)}; valid: {list(LOSS_TERMS + REGULARISERS)}.")
        self.out_dim = int(out_dim)
        self.weights = {**self.default_weights, **(weights or {})}
        if any(w < 0 for w in self.weights.values()):
            raise ValueError(f"loss weights must be >= 0, got {self.weights}.")
        self.cls_ce = DistillationCrossEntropy(out_dim, student_temp, center_momentum)
        self.patch_ce = DistillationCrossEntropy(out_dim, student_temp, center_momentum)
        self.global_ce = DistillationCrossEntropy(out_dim, student_temp, center_momentum)

    def forward(
        self,
        student: tuple[dict, dict],
        teacher: tuple[dict, dict],
        cell_masks: tuple[torch.Tensor, torch.Tensor],
        voxel_masks: tuple[torch.Tensor, torch.Tensor],
        images: tuple[torch.Tensor, torch.Tensor],
        teacher_temp: float,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the four terms.

        Args:
            student: outputs on the masked views (u_tilde, v_tilde).
            teacher: outputs on the noisy views (u_hat, v_hat).
            cell_masks: (B, N) masks on the SA grid of u and v.
            voxel_masks: (B, D, H, W) masks on the voxels of u and v.
            images: the clean views u, v (reconstruction targets).
            teacher_temp: tau_t for this epoch.

        Returns:
            ``(total, parts)`` with ``parts`` keyed by :data:`LOSS_TERMS` and :data:`REGULARISERS` (detached).
        """
        (su, sv), (tu, tv) = student, teacher
        parts: dict[str, torch.Tensor] = {}
        # AITD: cross-view [CLS] distillation
        parts["aitd"] = 0.5 * (
            self.cls_ce(su["cls_logits"], tv["cls_logits"], teacher_temp).mean()
            + self.cls_ce(sv["cls_logits"], tu["cls_logits"], teacher_temp).mean()
        )
        # GITD: cross-view global-token distillation
        parts["gitd"] = 0.5 * (
            self.global_ce(su["global_logits"], tv["global_logits"], teacher_temp).mean()
            + self.global_ce(sv["global_logits"], tu["global_logits"], teacher_temp).mean()
        )
        # AMPD: same-view patch distillation on masked cells
        ampd = []
        for s, t, m in ((su, tu, cell_masks[0]), (sv, tv, cell_masks[1])):
            ce = self.patch_ce(s["patch_logits"], t["patch_logits"], teacher_temp)  # (B, N)
            mf = m.to(ce.dtype)
            ampd.append(((ce * mf).sum(dim=1) / mf.sum(dim=1).clamp_min(1.0)).mean())
        parts["ampd"] = 0.5 * (ampd[0] + ampd[1])
        # AMIP: masked-voxel L1 reconstruction
        if "recon" in su:
            parts["amip"] = 0.5 * (
                masked_l1(su["recon"], images[0], voxel_masks[0]) + masked_l1(sv["recon"], images[1], voxel_masks[1])
            )
        else:
            parts["amip"] = torch.zeros((), device=parts["aitd"].device)
        if "cls_embedding" in su:
            parts["koleo"] = 0.25 * sum(koleo_loss(s[f"{key}_embedding"]) for s in (su, sv) for key in ("cls", "global"))
        else:
            parts["koleo"] = torch.zeros((), device=parts["aitd"].device)
        terms = LOSS_TERMS + REGULARISERS
        total = sum(self.weights[k] * parts[k] for k in terms if self.weights[k] > 0)
        return total, {k: parts[k].detach() for k in terms}  # type: ignore[return-value]

    @torch.no_grad()
    def diagnostics(
        self, student: tuple[dict, dict], teacher: tuple[dict, dict], cell_masks: tuple[torch.Tensor, torch.Tensor],
        teacher_temp: float,
    ) -> dict[str, float]:
        """Collapse diagnostics of the three distillation terms and of S_ATT, with the same pairing,
        centres and token weights as :meth:`forward` (see :mod:`dagman_components.losses.diagnostics`).

        Args:
            student: outputs on the masked views (u_tilde, v_tilde).
            teacher: outputs on the noisy views (u_hat, v_hat), with ``*_embedding`` and ``s_att``.
            cell_masks: (B, N) masks on the SA grid of u and v (AMPD's token weights).
            teacher_temp: tau_t of this step.

        Returns:
            ``{"<term>/<name>": value}`` for term in aitd, ampd, gitd and name in
            :data:`~dagman_components.losses.diagnostics.DIAGNOSTIC_NAMES`, plus ``satt/entropy``,
            ``satt/max`` and ``satt/log_n``.
        """
        (su, sv), (tu, tv) = student, teacher
        out: dict[str, float] = {}
        for term, ce, key in (("aitd", self.cls_ce, "cls"), ("gitd", self.global_ce, "global")):
            pairs = [(su[f"{key}_logits"], tv[f"{key}_logits"], None), (sv[f"{key}_logits"], tu[f"{key}_logits"], None)]
            emb = _cat_optional(tu, tv, f"{key}_embedding")
            out.update(prefixed(distillation_diagnostics(pairs, emb, ce.center, teacher_temp, ce.student_temp), term))
        pairs = [(su["patch_logits"], tu["patch_logits"], cell_masks[0]), (sv["patch_logits"], tv["patch_logits"], cell_masks[1])]
        emb = _cat_optional(tu, tv, "patch_embedding")
        out.update(prefixed(distillation_diagnostics(pairs, emb, self.patch_ce.center, teacher_temp,
                                                     self.patch_ce.student_temp), "ampd"))
        if "s_att" in tu:
            out.update(prefixed(attention_diagnostics(torch.cat([tu["s_att"], tv["s_att"]])), "satt"))
        return out

    @torch.no_grad()
    def update_centers(self, teacher: tuple[dict, dict]) -> None:
        """Update the three centres from both teacher views (all-reduced under DDP)."""
        tu, tv = teacher
        self.update_centers_from_logits({k: torch.cat([tu[k], tv[k]]) for k in ("cls_logits", "patch_logits", "global_logits")})

    @torch.no_grad()
    def update_centers_from_logits(self, logits: dict[str, torch.Tensor]) -> None:
        """One centre update from every teacher output of an optimizer step (all views and, with
        gradient accumulation, all micro-batches), so that the centre moves once per step.

        Args:
            logits: ``cls_logits`` (M, K), ``patch_logits`` (M, N, K) and ``global_logits`` (M, K).
        """
        self.cls_ce.update_center(logits["cls_logits"])
        self.patch_ce.update_center(logits["patch_logits"])
        self.global_ce.update_center(logits["global_logits"])
