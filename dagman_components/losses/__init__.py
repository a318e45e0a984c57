"""DAGMaN's co-distillation and reconstruction losses."""

from dagman_components.losses.distillation import LOSS_TERMS, DAGMaNLoss, DistillationCrossEntropy, masked_l1
