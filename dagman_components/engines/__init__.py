"""Engines: the co-distillation trainer."""

from dagman_components.engines.co_distillation_trainer import CoDistillationTrainer, NonFiniteLossError
