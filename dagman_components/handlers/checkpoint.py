"""Checkpoint handlers: atomic full-state checkpoints, resume-if-present, the best model by a validation
metric, and the released encoder."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import monai
import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.handlers import CheckpointLoader

from dagman_components.atomic import atomic_save, atomic_write_text
from dagman_components.runtime.distributed import is_main_process
from dagman_components.weights.encoder_io import card_path, trained_model_card
from dagman_components.errors import DagmanError
from dagman_components.errors import is_state_dict_error, summarise_state_dict_error
from dagman_components.networks.pretrain import unwrap
from dagman_components.weights.state_dict import (
    export_encoder,
    is_pickled_objects_refusal,
    load_weights_only,
    pickled_objects_error,
    sha256_of,
)

__all__ = ["AtomicCheckpointSaver", "BestMetricSaver", "TrainedModelCard", "ResumeFromCheckpoint", "EncoderExporter",
           "CheckpointSettingsError", "WeightsOnlyCheckpointLoader"]

#: Checkpoint key of the run settings written by :class:`AtomicCheckpointSaver`.
SETTINGS_KEY = "settings"


class CheckpointSettingsError(DagmanError, ValueError):
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


class BestMetricSaver:
    """Save the network's weights whenever the evaluator's key metric improves: the one best-model saver
    of the downstream bundles. Attach it to the validation evaluator.

    ``save_path`` holds the flat state dict of ``network`` (wrappers such as ``DistributedDataParallel``
    removed), what ``torch.load(..., weights_only=True)``, MONAI's ``CheckpointLoader`` with
    ``load_dict: {model: "@network"}``, ``monai.bundle.load`` and MONAI Label read. Rank 0 writes,
    atomically (:mod:`dagman_components.atomic`). NaN values never improve.

    With ``publish_at_end`` the files are staged in ``<folder of save_path>/.staging`` and moved into place
    by :meth:`publish` (the bundle's ``finalize``), so a failed run never replaces the weights of an
    earlier one; a resumed run finds the staged best of the killed run there (its value comes back through
    :meth:`load_state_dict`), so no best model is lost.

    Args:
        save_path: the model file (e.g. ``models/model.pt``).
        network: the trained network (DDP-wrapped or not).
        key_metric_name: metric in ``engine.state.metrics``; default the engine's key metric.
        greater_is_better: whether a larger value is better.
        publish_at_end: stage the files and move them into place only in :meth:`publish`.
        companions: files written with the model after each improvement, each a callable
            ``(model_sha256, metric_name, value, epoch) -> text`` with a ``path`` attribute (its final
            file); ``model_sha256`` is the sha256 of the model just written (hashed once for all of
            them). Published after the model.
    """

    def __init__(
        self,
        save_path: str | os.PathLike,
        network: nn.Module,
        key_metric_name: str | None = None,
        greater_is_better: bool = True,
        publish_at_end: bool = False,
        companions: Sequence[Callable[[str, str, float, int], str]] = (),
    ) -> None:
        self.save_path = Path(save_path)
        self.network = network
        self.key_metric_name = key_metric_name
        self.greater_is_better = greater_is_better
        self.publish_at_end = publish_at_end
        self.companions = list(companions)
        self.staging = self.save_path.parent / ".staging"
        self.best = -math.inf if greater_is_better else math.inf
        self.best_epoch = -1

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _written_path(self, final: Path) -> Path:
        return self.staging / final.name if self.publish_at_end else final

    def _improves(self, value: float) -> bool:
        return not math.isnan(value) and (value > self.best if self.greater_is_better else value < self.best)

    def __call__(self, engine: Engine) -> None:
        name = self.key_metric_name or getattr(engine.state, "key_metric_name", None)
        if name is None or name not in engine.state.metrics:
            raise KeyError(f"BestMetricSaver: metric '{name}' not in the evaluator's metrics "
                           f"{sorted(engine.state.metrics)}; set key_metric_name.")
        value = float(engine.state.metrics[name])
        if not self._improves(value):
            return
        self.best, self.best_epoch = value, int(engine.state.epoch)
        if not is_main_process():
            return
        model_file = self._written_path(self.save_path)
        atomic_save(unwrap(self.network).state_dict(), model_file)
        digest = sha256_of(model_file) if self.companions else ""
        for companion in self.companions:
            atomic_write_text(companion(digest, name, value, self.best_epoch),
                              self._written_path(Path(companion.path)))
        logging.getLogger(__name__).info("new best %s %.4f at epoch %d: %s %s", name, value, self.best_epoch,
                                         "staged" if self.publish_at_end else "saved", self.save_path)

    def publish(self) -> None:
        """Move the staged model, then its companion files, into place (with ``publish_at_end``). Nothing
        staged: log and keep whatever is there."""
        if not self.publish_at_end or not is_main_process():
            return
        log = logging.getLogger(__name__)
        staged = self._written_path(self.save_path)
        if not staged.is_file():
            log.warning("no validation improved on %s: nothing to publish, %s left as it was", self.best,
                        self.save_path)
            return
        os.replace(staged, self.save_path)
        for companion in self.companions:
            os.replace(self._written_path(Path(companion.path)), companion.path)
        shutil.rmtree(self.staging, ignore_errors=True)
        log.info("best model (epoch %d, %s %.4f) written to %s%s", self.best_epoch,
                 self.key_metric_name or "key metric", self.best, self.save_path,
                 "".join(f" and {c.path}" for c in self.companions))

    def state_dict(self) -> dict:
        """The best value so far and its epoch, for a resumed run."""
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = float(state["best"]), int(state.get("best_epoch", -1))


class TrainedModelCard:
    """The ``model_card.json`` written beside a downstream bundle's best model by
    :class:`BestMetricSaver` (one of its ``companions``): the encoder settings the model was built with,
    so that its inference config builds the same network without the pretraining bundle beside it
    (:func:`~dagman_components.weights.encoder_io.trained_model_card`, made once per run), the model file's name
    and sha256, and the validation value that chose it.

    Args:
        model_path: the model file (the card is :func:`~dagman_components.weights.encoder_io.card_path` of it).
        encoder: the encoder settings (:func:`~dagman_components.weights.encoder_io.encoder_settings`).
        source_weights: the encoder weights training started from (``None`` or ``"null"``: random).
        recorded: further sections (the model's class and task settings, preprocessing).
    """

    def __init__(self, model_path: str | os.PathLike, encoder: Mapping[str, Any],
                 source_weights: str | os.PathLike | None = None, recorded: Mapping[str, Any] | None = None) -> None:
        self.model_name = Path(model_path).name
        self.path = card_path(model_path)
        self.encoder = dict(encoder)
        self.source_weights = source_weights
        self.recorded = dict(recorded or {})
        self._run_card: dict[str, Any] | None = None  # the parts fixed for the run (the encoder file hashed once)

    def __call__(self, model_sha256: str, metric_name: str, value: float, epoch: int) -> str:
        if self._run_card is None:
            self._run_card = trained_model_card(self.encoder, self.source_weights, self.recorded)
        card = {**self._run_card, "file": self.model_name, "sha256": model_sha256,
                "selected_by": {metric_name: value, "epoch": epoch}}
        return json.dumps(card, indent=2, default=str) + "\n"


class ResumeFromCheckpoint:
    """When ``load_path`` exists at the start of training, restore every object of ``load_dict`` from
    it (:func:`~dagman_components.weights.state_dict.load_weights_only`, then Ignite's ``Checkpoint.load_objects``),
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
    pickled Python objects says so in our words (:func:`~dagman_components.weights.state_dict.pickled_objects_error`)
    instead of torch's text, which suggests ``weights_only=False``. Same arguments as MONAI's."""

    def __call__(self, engine: Engine) -> None:
        try:
            super().__call__(engine)
        except Exception as e:
            if is_pickled_objects_refusal(e):
                raise pickled_objects_error(self.load_path, "model weights") from None
            raise
