"""DAGMaN's losses: three self-distillation cross-entropies (AITD, AMPD, GITD) and masked-image
reconstruction (AMIP)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from monai.utils import StrEnum, look_up_option

from dagman_components.losses.diagnostics import attention_diagnostics, distillation_diagnostics, prefixed
from dagman_components.networks.outputs import EncoderOutput

__all__ = ["DistillationCrossEntropy", "TeacherTargets", "sinkhorn_knopp", "masked_l1", "koleo_loss", "DAGMaNLoss",
           "LOSS_TERMS", "REGULARISERS"]

#: Names of the four loss terms of the method, in the order they are logged.
LOSS_TERMS = ("amip", "ampd", "aitd", "gitd")
#: Optional terms outside the paper (weight 0 by default), logged after the four.
REGULARISERS = ("koleo",)


class TeacherTargets(StrEnum):
    """How teacher logits become targets: DINO's centring (the paper's) or Sinkhorn-Knopp
    normalisation over the batch (SwAV, DINOv2)."""

    CENTERING = "centering"
    SINKHORN = "sinkhorn"


def _all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce ``x`` in place when a process group is initialised (plain torch: Ignite's
    ``idist.all_reduce`` keeps a module-level handle that goes stale once a group is destroyed)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp normalisation (SwAV; DINOv2's teacher), all-reduced across
    processes when a process group is initialised.

    ``Q = exp(t / tau_t)`` over the M tokens of the batch is alternately rescaled so that every
    prototype receives the same total mass (1/K) and every token a distribution (1/M, then 1 after
    the final rescale). Unlike centring, which follows the batch mean with a momentum, this equalises
    the prototypes' use within every batch: targets can be neither the same prototype for every
    token (one-hot collapse) nor flat unless the tokens themselves are identical.

    Args:
        teacher_logits: (..., K) teacher logits; every leading position is one token of the batch.
        teacher_temp: tau_t.
        n_iterations: row/column normalisation rounds (3 as in SwAV and DINOv2).

    Returns:
        Targets of ``teacher_logits``'s shape, each row summing to 1 (float32).

    Raises:
        ValueError: when ``teacher_temp`` is not positive or ``n_iterations < 1``.
    """
    if teacher_temp <= 0 or n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp needs teacher_temp > 0 and n_iterations >= 1, got {teacher_temp}, {n_iterations}.")
    shape = teacher_logits.shape
    logits = teacher_logits.detach().float().reshape(-1, shape[-1])
    scaled = logits / teacher_temp
    top = _all_reduce(scaled.max(), op="max")
    q = torch.exp(scaled - top).t()  # (K, M); subtracting one global constant changes nothing after normalising
    n_tokens = _all_reduce(torch.tensor(float(q.shape[1]), device=q.device))
    k = q.shape[0]
    q /= _all_reduce(q.sum()).clamp_min(1e-30)
    for _ in range(n_iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True)).clamp_min(1e-30) * k  # each prototype: mass 1/K
        q /= q.sum(dim=0, keepdim=True).clamp_min(1e-30) * n_tokens  # each token: mass 1/M
    q *= n_tokens
    return q.t().reshape(shape)


class DistillationCrossEntropy(nn.Module):
    """Cross-entropy between sharpened teacher targets and student predictions.

    With ``targets="centering"`` (the paper's DINO reading) the targets are
    ``softmax((t - c)/tau_t)`` with the centre ``c`` kept as a buffer and updated only by an explicit
    :meth:`update_center` call; with ``targets="sinkhorn"`` they come from :func:`sinkhorn_knopp` over
    every teacher token passed to :meth:`targets` at once (the centre is still tracked, for the
    diagnostics). ``loss = -sum_k p_t(k) * log_softmax(s/tau_s)_k`` per token.

    Args:
        out_dim: logits width K.
        student_temp: tau_s (0.1).
        center_momentum: c <- m*c + (1-m)*mean(teacher logits) (0.9).
        targets: ``"centering"`` or ``"sinkhorn"`` (:class:`TeacherTargets`).
        sinkhorn_iterations: normalisation rounds of Sinkhorn-Knopp.
        queue_size: Sinkhorn-Knopp only: teacher logits of earlier optimizer steps (rows, newest
            first) normalised together with the current ones (SwAV's queue), so that the
            equipartition is taken over more tokens than a small batch holds; 0 disables it. The
            queue is filled by :meth:`update_center` (once per optimizer step) and kept in the
            state dict.

    Raises:
        ValueError: for a non-positive ``student_temp``, an unknown ``targets`` or a negative
            ``queue_size``.
    """

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        targets: str = TeacherTargets.CENTERING,
        sinkhorn_iterations: int = 3,
        queue_size: int = 0,
    ) -> None:
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"student_temp must be positive, got {student_temp}.")
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}.")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.target_mode = look_up_option(targets, TeacherTargets)
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.queue_size = int(queue_size) if self.target_mode == TeacherTargets.SINKHORN else 0
        self.register_buffer("center", torch.zeros(1, out_dim))
        if self.queue_size:  # registered only when used: checkpoints without a queue keep loading
            self.register_buffer("queue", torch.zeros(self.queue_size, out_dim))
            self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    def targets(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Teacher probabilities (no gradient, float32). With Sinkhorn-Knopp every token passed in one
        call is normalised together, so pass all teacher tokens of a step (both views) at once."""
        if self.target_mode == TeacherTargets.SINKHORN:
            filled = int(self.queue_filled) if self.queue_size else 0
            if not filled:
                return sinkhorn_knopp(teacher_logits, teacher_temp, self.sinkhorn_iterations)
            flat = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1])
            both = sinkhorn_knopp(torch.cat([flat, self.queue[:filled]]), teacher_temp, self.sinkhorn_iterations)
            return both[: flat.shape[0]].reshape(teacher_logits.shape)
        return F.softmax((teacher_logits.detach().float() - self.center) / teacher_temp, dim=-1)

    def cross_entropy(self, student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy of the student against given targets, shape = logits' shape without K."""
        log_p = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        return -(target_probs * log_p).sum(dim=-1)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Per-token cross-entropy against the targets of ``teacher_logits``."""
        return self.cross_entropy(student_logits, self.targets(teacher_logits, teacher_temp))

    def paired_targets(self, teacher_u: torch.Tensor, teacher_v: torch.Tensor, teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets of both views' teacher logits, normalised together (Sinkhorn-Knopp sees the whole step)."""
        both = self.targets(torch.cat([teacher_u, teacher_v]), teacher_temp)
        return both[: teacher_u.shape[0]], both[teacher_u.shape[0]:]

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """Move the centre towards the mean teacher logit over every token, all-reduced across
        processes when a process group is initialised; with a Sinkhorn-Knopp queue, also push this
        step's logits into it (this process's own rows; the normalisation all-reduces over processes).

        Args:
            teacher_logits: (..., K), all teacher outputs of this step.
        """
        flat = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1])
        if self.queue_size:
            newest = flat[-self.queue_size:].flip(0)  # newest first
            kept = self.queue[: self.queue_size - newest.shape[0]].clone()
            self.queue[: newest.shape[0]] = newest
            self.queue[newest.shape[0]:] = kept
            self.queue_filled.fill_(min(int(self.queue_filled) + newest.shape[0], self.queue_size))
        total = _all_reduce(flat.sum(dim=0, keepdim=True))
        count = _all_reduce(torch.tensor([float(flat.shape[0])], device=flat.device))
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
        teacher_targets: ``"centering"`` (DINO, the paper's) or ``"sinkhorn"`` (Sinkhorn-Knopp over
            the step's teacher tokens, both views together; see :func:`sinkhorn_knopp`).
        sinkhorn_iterations: Sinkhorn-Knopp rounds.
        sinkhorn_queue: with Sinkhorn-Knopp, teacher [CLS] and global logits of earlier steps kept
            to normalise with (rows; 0 disables). The patch term needs none: one step holds
            ``2 * batch * N`` patch tokens.

    Raises:
        ValueError: for an unknown term name, a negative weight or an unknown ``teacher_targets``.
    """

    default_weights = {"amip": 1.0, "ampd": 0.1, "aitd": 0.1, "gitd": 0.1, "koleo": 0.0}

    def __init__(
        self,
        out_dim: int = 8192,
        weights: dict[str, float] | None = None,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        teacher_targets: str = TeacherTargets.CENTERING,
        sinkhorn_iterations: int = 3,
        sinkhorn_queue: int = 0,
    ) -> None:
        super().__init__()
        unknown = set(weights or {}) - set(LOSS_TERMS + REGULARISERS)
        if unknown:
            raise ValueError(f"unknown loss weight(s) {sorted(unknown)}; valid: {list(LOSS_TERMS + REGULARISERS)}.")
        self.out_dim = int(out_dim)
        self.weights = {**self.default_weights, **(weights or {})}
        if any(w < 0 for w in self.weights.values()):
            raise ValueError(f"loss weights must be >= 0, got {self.weights}.")
        ce_args = (out_dim, student_temp, center_momentum, teacher_targets, sinkhorn_iterations)
        self.cls_ce = DistillationCrossEntropy(*ce_args, queue_size=sinkhorn_queue)
        self.patch_ce = DistillationCrossEntropy(*ce_args)
        self.global_ce = DistillationCrossEntropy(*ce_args, queue_size=sinkhorn_queue)

    def forward(
        self,
        student: tuple[dict, dict],
        teacher: tuple[dict, dict],
        cell_masks: tuple[torch.Tensor, torch.Tensor],
        voxel_masks: tuple[torch.Tensor, torch.Tensor],
        images: tuple[torch.Tensor, torch.Tensor],
        teacher_temp: float,
        targets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the four terms.

        Args:
            student: outputs on the masked views (u_tilde, v_tilde).
            teacher: outputs on the noisy views (u_hat, v_hat).
            cell_masks: (B, N) masks on the SA grid of u and v.
            voxel_masks: (B, D, H, W) masks on the voxels of u and v.
            images: the clean views u, v (reconstruction targets).
            teacher_temp: tau_t for this epoch.
            targets: the step's teacher targets from :meth:`teacher_targets`, when already computed (the
                trainer computes them once for the loss and the diagnostics); ``None`` computes them here.

        Returns:
            ``(total, parts)`` with ``parts`` keyed by :data:`LOSS_TERMS` and :data:`REGULARISERS` (detached).
        """
        su, sv = student
        targets = targets if targets is not None else self.teacher_targets(teacher, teacher_temp)
        parts: dict[str, torch.Tensor] = {}
        # AITD: cross-view [CLS] distillation; GITD: cross-view global-token distillation
        for term, ce, key in (("aitd", self.cls_ce, "cls"), ("gitd", self.global_ce, "global")):
            p_u, p_v = targets[key]
            parts[term] = 0.5 * (ce.cross_entropy(su[f"{key}_logits"], p_v).mean()
                                 + ce.cross_entropy(sv[f"{key}_logits"], p_u).mean())
        # AMPD: same-view patch distillation on masked cells
        ampd = []
        for s, p, m in ((su, targets["patch"][0], cell_masks[0]), (sv, targets["patch"][1], cell_masks[1])):
            ce = self.patch_ce.cross_entropy(s["patch_logits"], p)  # (B, N)
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
    def teacher_targets(self, teacher: tuple[dict, dict], teacher_temp: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The teacher targets of both views for the cls, patch and global tokens (float32, no gradient),
        each pair normalised together (centring per token, Sinkhorn-Knopp over the step)."""
        tu, tv = teacher
        return {key: ce.paired_targets(tu[f"{key}_logits"], tv[f"{key}_logits"], teacher_temp)
                for key, ce in (("cls", self.cls_ce), ("patch", self.patch_ce), ("global", self.global_ce))}

    @torch.no_grad()
    def diagnostics(
        self, student: tuple[dict, dict], teacher: tuple[dict, dict], cell_masks: tuple[torch.Tensor, torch.Tensor],
        teacher_temp: float,
        targets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> dict[str, float]:
        """Collapse diagnostics of the three distillation terms and of S_ATT, with the same pairing,
        centres and token weights as :meth:`forward` (see :mod:`dagman_components.losses.diagnostics`).

        Args:
            student: outputs on the masked views (u_tilde, v_tilde).
            teacher: outputs on the noisy views (u_hat, v_hat), with ``*_embedding`` and ``s_att``.
            cell_masks: (B, N) masks on the SA grid of u and v (AMPD's token weights).
            teacher_temp: tau_t of this step.
            targets: the step's teacher targets from :meth:`teacher_targets`; ``None`` computes them.

        Returns:
            ``{"<term>/<name>": value}`` for term in aitd, ampd, gitd and name in
            :data:`~dagman_components.losses.diagnostics.DIAGNOSTIC_NAMES`, plus ``satt/entropy``,
            ``satt/max`` and ``satt/log_n``.
        """
        (su, sv), (tu, tv) = student, teacher
        targets = targets if targets is not None else self.teacher_targets(teacher, teacher_temp)
        out: dict[str, float] = {}
        for term, ce, key in (("aitd", self.cls_ce, "cls"), ("gitd", self.global_ce, "global")):
            p_u, p_v = targets[key]
            pairs = [(su[f"{key}_logits"], tv[f"{key}_logits"], None), (sv[f"{key}_logits"], tu[f"{key}_logits"], None)]
            emb = _cat_optional(tu, tv, f"{key}_embedding")
            out.update(prefixed(distillation_diagnostics(pairs, emb, ce.center, teacher_temp, ce.student_temp,
                                                         teacher_probs=[p_v, p_u]), term))
        pairs = [(su["patch_logits"], tu["patch_logits"], cell_masks[0]), (sv["patch_logits"], tv["patch_logits"], cell_masks[1])]
        emb = _cat_optional(tu, tv, "patch_embedding")
        out.update(prefixed(distillation_diagnostics(pairs, emb, self.patch_ce.center, teacher_temp,
                                                     self.patch_ce.student_temp, teacher_probs=list(targets["patch"])),
                            "ampd"))
        if EncoderOutput.S_ATT in tu:
            out.update(prefixed(attention_diagnostics(torch.cat([tu[EncoderOutput.S_ATT], tv[EncoderOutput.S_ATT]])), "satt"))
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
