"""Collapse diagnostics of the self-distillation terms and of the [CLS] attention.

DINO-style distillation fails in two ways. In *uniform* collapse the centred, sharpened teacher
targets are flat: their entropy is ln K and the cross-entropy sits at ln K. In *one-hot* collapse
every image is sent to the same prototype: the entropy is 0. Both show in the teacher's target
entropy; uniform collapse usually follows *feature* collapse, where the bottleneck features of
different images (or cells) become nearly identical, so that centring removes everything that tells
them apart. These functions compute the numbers that tell the cases apart; they need no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["entropy", "feature_spread", "distillation_diagnostics", "attention_diagnostics", "prefixed",
           "DIAGNOSTIC_NAMES"]

#: Per-term diagnostics, logged as ``<term>/<name>`` for each of aitd, ampd and gitd.
DIAGNOSTIC_NAMES = ("teacher_entropy", "batch_entropy", "student_entropy", "kl", "center_norm", "spread")


def entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats along ``dim`` (``0 log 0 = 0``).

    Args:
        probs: probabilities summing to 1 along ``dim``.
        dim: the distribution's axis.

    Returns:
        The entropies, ``probs``'s shape without ``dim``.
    """
    p = probs.float()
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim=dim)


def feature_spread(features: torch.Tensor) -> float:
    """Spread of L2-normalised features across samples: ``sqrt(d) * mean_j std_i z[i, j]``.

    The across-sample standard deviation of each of the ``d`` coordinates, averaged over the
    coordinates, scaled by ``sqrt(d)`` so that the number does not depend on the width: about 1 for
    directions spread uniformly over the sphere, 0 when every sample has the same feature
    (feature collapse).

    Args:
        features: (..., d), rows L2-normalised; every leading axis counts as a sample.

    Returns:
        The spread (0.0 when there are fewer than two samples).

    Raises:
        ValueError: when ``features`` has no feature axis.
    """
    if features.ndim < 1:
        raise ValueError("feature_spread needs a (..., d) tensor.")
    z = features.detach().float().reshape(-1, features.shape[-1])
    if z.shape[0] < 2:
        return 0.0
    return float(z.std(dim=0, unbiased=False).mean() * math.sqrt(z.shape[1]))


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return values.mean()
    w = weights.to(values.dtype)
    return (values * w).sum() / w.sum().clamp_min(1.0)


@torch.no_grad()
def distillation_diagnostics(
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    teacher_embeddings: torch.Tensor | None,
    center: torch.Tensor,
    teacher_temp: float,
    student_temp: float,
    teacher_probs: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Diagnostics of one distillation term over its (student, teacher) pairs.

    For each pair the teacher target is ``softmax((t - c)/tau_t)`` and the student prediction
    ``softmax(s/tau_s)``, exactly as in the loss. ``kl = CE - H(teacher)`` is the part of the loss the
    student can still remove; at uniform collapse the teacher entropy is ln K and the loss is ln K.

    Args:
        pairs: ``(student_logits, teacher_logits, weights)`` with logits (..., K) and optional token
            weights of the logits' leading shape (AMPD's masked cells); averaged over tokens and pairs.
        teacher_embeddings: the teacher's L2-normalised bottleneck features (..., d) of this term,
            for :func:`feature_spread`; ``None`` skips it.
        center: the term's centre (1, K).
        teacher_temp: tau_t.
        student_temp: tau_s.
        teacher_probs: the targets of each pair when they are not ``softmax((t - c)/tau_t)`` (e.g.
            Sinkhorn-Knopp targets); one tensor per pair, shaped like its teacher logits.

    Returns:
        ``teacher_entropy``, ``student_entropy``, ``kl`` (nats, token means), ``batch_entropy`` (entropy of
        the teacher targets averaged over the batch: near 0 when every image gets the same prototype,
        one-hot collapse), ``center_norm`` (L2 norm of the centre) and ``spread`` (NaN without embeddings).
    """
    h_t, h_s, ce, marginals = [], [], [], []
    for i, (student_logits, teacher_logits, weights) in enumerate(pairs):
        if teacher_probs is not None:
            p_t = teacher_probs[i].float()
        else:
            p_t = torch.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)
        log_p_s = torch.log_softmax(student_logits.float() / student_temp, dim=-1)
        flat = p_t.reshape(-1, p_t.shape[-1])
        if weights is None:
            marginals.append(flat.mean(0))
        else:
            w = weights.reshape(-1, 1).to(flat.dtype)
            marginals.append((flat * w).sum(0) / w.sum().clamp_min(1.0))
        h_t.append(_weighted_mean(entropy(p_t), weights))
        h_s.append(_weighted_mean(entropy(log_p_s.exp()), weights))
        ce.append(_weighted_mean(-(p_t * log_p_s).sum(dim=-1), weights))
    teacher_h = torch.stack(h_t).mean()
    return {
        "teacher_entropy": float(teacher_h),
        "batch_entropy": float(entropy(torch.stack(marginals).mean(0))),
        "student_entropy": float(torch.stack(h_s).mean()),
        "kl": float(torch.stack(ce).mean() - teacher_h),
        "center_norm": float(center.float().norm()),
        "spread": feature_spread(teacher_embeddings) if teacher_embeddings is not None else float("nan"),
    }


@torch.no_grad()
def attention_diagnostics(s_att: torch.Tensor) -> dict[str, float]:
    """How peaked S_ATT, the [CLS]-to-patch attention, is.

    Args:
        s_att: (B, N) rows summing to 1.

    Returns:
        ``entropy`` (nats, mean over rows), ``max`` (mean over rows of the largest weight) and
        ``log_n`` (the entropy of uniform attention, for comparison).
    """
    p = s_att.detach().float()
    return {"entropy": float(entropy(p).mean()), "max": float(p.max(dim=-1).values.mean()),
            "log_n": math.log(p.shape[-1])}


def prefixed(values: Mapping[str, float], prefix: str) -> dict[str, float]:
    """``{f"{prefix}/{k}": v}``: the TensorBoard tag and CSV column of each diagnostic."""
    return {f"{prefix}/{k}": float(v) for k, v in values.items()}
