"""Checkpoint handlers: atomic full-state checkpoints, resume-if-present, and the released encoder."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import monai
import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.handlers import CheckpointLoader

from dagman_components.distributed import is_main_process
from dagman_components.errors import is_state_dict_error, summarise_state_dict_error
from dagman_components.networks.pretrain import unwrap
from dagman_components.weights import (
    atomic_save,
    export_encoder,
    is_pickled_objects_refusal,
    load_weights_only,
    pickled_objects_error,
)

__all__ = ["AtomicCheckpointSaver", "ResumeFromCheckpoint", "EncoderExporter", "CheckpointSettingsError",
           "WeightsOnlyCheckpointLoader"]

#: Checkpoint key of the run settings written by :class:`AtomicCheckpointSaver`.
SETTINGS_KEY = "settings"


class CheckpointSettingsError(ValueError):
    """The checkpoint in ``bundle_root`` was written by a run with other settings; the message names them."""


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
        settings: the run's settings (plain values), stored under ``"settings"`` so that
            :class:`ResumeFromCheckpoint` can refuse a run with other settings.
    """

    def __init__(self, save_path: str | os.PathLike, save_dict: Mapping[str, Any], save_interval: int = 0,
                 engine_key: str = "trainer", settings: Mapping[str, Any] | None = None) -> None:
        if save_interval < 0:
            raise ValueError(f"save_interval must be >= 0, got {save_interval}.")
        self.save_path = Path(save_path)
        self.save_dict = dict(save_dict)
        self.save_interval = save_interval
        self.engine_key = engine_key
        self.settings = _plain(settings) if settings is not None else None
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
        if not is_main_process():
            return
        objects = {**self.save_dict, self.engine_key: engine}
        state = {k: (unwrap(v) if isinstance(v, nn.Module) else v).state_dict() for k, v in objects.items()}
        if self.settings is not None:
            state[SETTINGS_KEY] = self.settings
        atomic_save(state, self.save_path)
        self.logger.debug("checkpoint written: %s (iteration %d)", self.save_path, engine.state.iteration)


class ResumeFromCheckpoint:
    """When ``load_path`` exists at the start of training, restore every object of ``load_dict`` from
    it (:func:`~dagman_components.weights.load_weights_only`, then Ignite's ``Checkpoint.load_objects``),
    including the trainer's epoch, iteration and state keys (the pretraining seed), so that the same
    command continues where a killed run stopped, mid-epoch too.
    Otherwise log that training starts from scratch.

    Args:
        load_path: the checkpoint written by :class:`AtomicCheckpointSaver`.
        load_dict: the same mapping as the saver's ``save_dict``; the engine is restored from ``engine_key``.
        map_location: device mapping for ``torch.load``.
        enabled: set False to ignore an existing checkpoint (it is then overwritten by the new run).
        engine_key: checkpoint key of the engine's state.
        settings: this run's settings; when the checkpoint stores other values (see
            :class:`AtomicCheckpointSaver`), or, for a checkpoint without stored settings, its
            tensors have other shapes, the run stops before loading anything
            (:class:`CheckpointSettingsError`, one line naming the differences).
        restart_completed: when the checkpoint's run already trained this run's ``max_epochs``, start
            from scratch instead of resuming (a downstream rerun, e.g. a MONAI Label training request,
            trains again); by default such a rerun restores the finished state and trains no further.
    """

    def __init__(self, load_path: str | os.PathLike, load_dict: Mapping[str, Any], map_location: Any = "cpu",
                 enabled: bool = True, engine_key: str = "trainer", settings: Mapping[str, Any] | None = None,
                 restart_completed: bool = False) -> None:
        self.engine_key = engine_key
        self.load_path = Path(load_path)
        self.load_dict = {k: unwrap(v) if isinstance(v, nn.Module) else v for k, v in load_dict.items()}
        self.map_location = map_location
        self.enabled = enabled
        self.settings = _plain(settings) if settings is not None else None
        self.restart_completed = restart_completed
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.enabled and self.load_path.is_file():
            self.logger.warning("resume is false: %s is ignored and will be overwritten", self.load_path)
            return
        if not self.load_path.is_file():
            self.logger.info("no checkpoint at %s: training starts from scratch", self.load_path)
            return
        objects = {**self.load_dict, self.engine_key: engine}
        checkpoint = load_weights_only(self.load_path, self.map_location, what="checkpoint")
        if self.settings is not None:
            self._check_settings(checkpoint)
        max_epochs = engine.state.max_epochs
        done = checkpoint.get(self.engine_key, {}) if isinstance(checkpoint, Mapping) else {}
        if self.restart_completed and max_epochs and done.get("iteration", 0) >= max_epochs * done.get("epoch_length", 1):
            self.logger.info("the run of %s completed %d epochs: training starts from scratch", self.load_path,
                             max_epochs)
            return
        missing = [k for k in engine.state_dict_user_keys if isinstance(done, Mapping) and done and k not in done]
        if missing:  # written before these keys were saved (e.g. the seed): keep this run's values
            self.logger.warning("%s has no %s (an older checkpoint): resuming with this run's values; the "
                                "continuation is not draw-for-draw that of the killed run", self.load_path, missing)
            checkpoint = {**checkpoint, self.engine_key: {**done, **{k: getattr(engine.state, k) for k in missing}}}
        try:
            Checkpoint.load_objects(to_load=objects, checkpoint=checkpoint)
            if max_epochs is not None and engine.state.epoch > max_epochs:
                raise ValueError(f"it holds {engine.state.epoch} epochs, more than max_epochs={max_epochs}")
        except Exception as e:
            detail = summarise_state_dict_error(str(e), advice=False) if is_state_dict_error(e) else str(e)
            then = "\n" if "\n" in detail else ". "
            raise RuntimeError(
                f"cannot resume from '{self.load_path}': {detail}{then}It was written by a run with other settings or "
                "is damaged; move it away to start from scratch (it is left untouched)."
            ) from e
        engine.state.max_epochs = max_epochs
        self.logger.info("resumed from %s at epoch %d, iteration %d", self.load_path, engine.state.epoch,
                         engine.state.iteration)

    def _check_settings(self, checkpoint: Any) -> None:
        """Raise :class:`CheckpointSettingsError` when ``checkpoint`` was written with other settings
        (before anything is loaded into the run's objects)."""
        stored = checkpoint.get(SETTINGS_KEY) if isinstance(checkpoint, Mapping) else None
        if isinstance(stored, Mapping):
            differing = [f"{k}: {stored.get(k, '(unset)')} in the checkpoint, {v} now"
                         for k, v in self.settings.items() if stored.get(k) != v]
        else:
            differing = _shape_differences(checkpoint, self.load_dict)
        if differing:
            raise CheckpointSettingsError(
                f"cannot resume from '{self.load_path}': it was written by a run with other settings "
                f"({'; '.join(differing)}). Give this run its own --bundle_root (output folder), or pass "
                "--resume false to start from scratch and overwrite it."
            )


def _plain(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as JSON-like values (tuples as lists), so stored and current values compare equal."""
    return json.loads(json.dumps(dict(settings), default=str))


def _shape_differences(checkpoint: Any, load_dict: Mapping[str, Any], shown: int = 3) -> list[str]:
    """For a checkpoint without stored settings: the module tensors whose shapes differ, counted."""
    differing: list[str] = []
    for name, obj in load_dict.items():
        saved = checkpoint.get(name) if isinstance(checkpoint, Mapping) else None
        if not isinstance(obj, nn.Module) or not isinstance(saved, Mapping):
            continue
        current = obj.state_dict()
        bad = [f"{k} {tuple(v.shape)} in the checkpoint, {tuple(current[k].shape)} now" for k, v in saved.items()
               if isinstance(v, torch.Tensor) and k in current and v.shape != current[k].shape]
        if bad:
            differing.append(f"{name}: {len(bad)} tensor(s) of other shape, e.g. {', '.join(bad[:shown])}")
    return differing


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
        if not is_main_process():
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


class WeightsOnlyCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` (``torch.load(weights_only=True)``) whose refusal of a file with
    pickled Python objects says so in our words (:func:`~dagman_components.weights.pickled_objects_error`)
    instead of torch's text, which suggests ``weights_only=False``. Same arguments as MONAI's."""

    def __call__(self, engine: Engine) -> None:
        try:
            super().__call__(engine)
        except Exception as e:
            if is_pickled_objects_refusal(e):
                raise pickled_objects_error(self.load_path, "model weights") from None
            raise
