"""Engines: the co-distillation trainer and the linear-probe trainer."""

from dagman_components.engines.co_distillation_trainer import (
    CoDistillationTrainer,
    MicroBatches,
    NonFiniteLossError,
    autocast_settings,
    optimizer_steps_per_epoch,
)
from dagman_components.engines.linear_probe_trainer import LinearProbeTrainer
