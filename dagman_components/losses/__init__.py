"""DAGMaN's co-distillation and reconstruction losses, and their collapse diagnostics."""

from dagman_components.losses.diagnostics import (
    DIAGNOSTIC_NAMES,
    attention_diagnostics,
    distillation_diagnostics,
    entropy,
    feature_spread,
)
from dagman_components.losses.distillation import (
    LOSS_TERMS,
    REGULARISERS,
    DAGMaNLoss,
    DistillationCrossEntropy,
    TeacherTargets,
    koleo_loss,
    masked_l1,
    sinkhorn_knopp,
)
