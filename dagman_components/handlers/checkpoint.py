"""Checkpoint handlers: atomic full-state checkpoints, resume-if-present, and the released encoder."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import monai
import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader

from dagman_components.networks.pretrain import unwrap
from dagman_components.weights import atomic_save, export_encoder

__all__ = ["AtomicCheckpointSaver", "ResumeFromCheckpoint", "EncoderExporter"]


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0


class AtomicCheckpointSaver:
    """Save every object of ``save_dict`` (anything with ``state_dict()``) to one file, atomically.

    MONAI's ``CheckpointSaver`` writes in place (``atomic=False``), so a kill mid-write can leave a
    truncated file; this handler writes a temporary file and renames it. It saves every
    ``save_interval`` iterations, at the end of every epoch and when training completes, never
    on an exception: a run that fails keeps the last good checkpoint. Only rank 0 writes.

    Args:
        save_path: the checkpoint file.
        save_dict: name -> object with ``state_dict()``. The engine it is attached to is added as
            ``engine_key`` (its epoch and iteration counters).
        engine_key: checkpoint key of the engine's state.
        save_interval: iterations between saves (0: epoch ends and completion only).
    """

    def __init__(self, save_path: str | os.PathLike, save_dict: Mapping[str, Any], save_interval: int = 0,
                 engine_key: str = "trainer") -> None:
        if save_interval < 0:
            raise ValueError(f"save_interval must be >= 0, got {save_interval}.")
        self.save_path = Path(save_path)
        self.save_dict = dict(save_dict)
        self.save_interval = save_interval
        self.engine_key = engine_key
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        if engine.has_event_handler(self):
            return
        for stale in self.save_path.parent.glob(f".{self.save_path.name}.*.tmp"):  # left by a killed write
            stale.unlink(missing_ok=True)
        if self.save_interval:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_interval), self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not _is_main_process():
            return
        objects = {**self.save_dict, self.engine_key: engine}
        state = {k: (unwrap(v) if isinstance(v, nn.Module) else v).state_dict() for k, v in objects.items()}
        atomic_save(state, self.save_path)
        self.logger.debug("checkpoint written: %s (iteration %d)", self.save_path, engine.state.iteration)


class ResumeFromCheckpoint:
    """When ``load_path`` exists at the start of training, restore every object of ``load_dict`` from
    it (MONAI's ``CheckpointLoader``, ``torch.load(weights_only=True)``), including the trainer's
    epoch and iteration, so that the same command continues where a killed run stopped.
    Otherwise log that training starts from scratch.

    Args:
        load_path: the checkpoint written by :class:`AtomicCheckpointSaver`.
        load_dict: the same mapping as the saver's ``save_dict``; the engine is restored from ``engine_key``.
        map_location: device mapping for ``torch.load``.
        enabled: set False to ignore an existing checkpoint (it is then overwritten by the new run).
    """

    def __init__(self, load_path: str | os.PathLike, load_dict: Mapping[str, Any], map_location: Any = "cpu",
                 enabled: bool = True, engine_key: str = "trainer") -> None:
        self.engine_key = engine_key
        self.load_path = Path(load_path)
        self.load_dict = {k: unwrap(v) if isinstance(v, nn.Module) else v for k, v in load_dict.items()}
        self.map_location = map_location
        self.enabled = enabled
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not (self.enabled and self.load_path.is_file()):
            self.logger.info("no checkpoint at %s: training starts from scratch", self.load_path)
            return
        objects = {**self.load_dict, self.engine_key: engine}
        loader = CheckpointLoader(load_path=str(self.load_path), load_dict=objects, map_location=self.map_location)
        try:
            loader(engine)
        except Exception as e:
            raise RuntimeError(
                f"cannot resume from '{self.load_path}': {e}. It was written by a run with other settings or is "
                "damaged; move it away to start from scratch (it is left untouched)."
            ) from e
        self.logger.info("resumed from %s at epoch %d, iteration %d", self.load_path, engine.state.epoch,
                         engine.state.iteration)


class EncoderExporter:
    """When training completes, write the teacher encoder's weights (``model.pt``) and its model card.

    Args:
        teacher: the teacher network (its ``encoder`` attribute is exported) or an encoder.
        save_path: the ``model.pt`` path.
        card: settings to record (network, preprocessing, data, budget); versions, epoch and
            iteration are added.
    """

    def __init__(self, teacher: nn.Module, save_path: str | os.PathLike, card: Mapping[str, Any] | None = None) -> None:
        self.teacher = teacher
        self.save_path = Path(save_path)
        self.card = dict(card or {})

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not _is_main_process():
            return
        net = unwrap(self.teacher)
        encoder = getattr(net, "encoder", net)
        card = {
            **self.card,
            "weights": "teacher encoder (EMA), without projection and reconstruction heads",
            "epochs_trained": int(engine.state.epoch),
            "iterations_trained": int(engine.state.iteration),
            "monai_version": monai.__version__,
            "torch_version": torch.__version__,
        }
        written = export_encoder(encoder, self.save_path, card)
        logging.getLogger(__name__).info("encoder weights written: %s (sha256 %s)", self.save_path, written["sha256"])
