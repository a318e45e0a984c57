"""Engines: the co-distillation trainer."""

from dagman_components.engines.co_distillation_trainer import (
    CoDistillationTrainer,
    MicroBatches,
    NonFiniteLossError,
    autocast_settings,
    cpu_has_native_bf16,
    optimizer_steps_per_epoch,
)
