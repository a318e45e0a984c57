# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Fit the MLflow handlers that ``monai.bundle run --tracking mlflow`` adds to the project's engines.

MONAI's tracking settings (``monai.bundle.utils.DEFAULT_MLFLOW_SETTINGS``) append an ``MLFlowHandler`` to
``train#handlers`` (the trainer), ``validate#handlers`` (the validator) and ``handlers`` (an evaluator). Those
handlers log, but they read the loss with ``from_engine(['loss'], first=True)``, which returns a tuple for
an engine whose output is a dict (``decollate: false``, and the pretraining trainer), so the first iteration
stops with ``float() argument must be ... not 'tuple'``. :func:`configure_tracking` sits between a bundle's
handler list and its engine (``train_handlers: $dagman_components.handlers.configure_tracking(@train#handlers,
...)``): without ``--tracking`` it returns the list unchanged; with it, it gives each ``MLFlowHandler``
in the list the project's output transform, the run's settings as params and the files to log as artifacts.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch

from dagman_components.bundle_tools.config_checks import as_bool

__all__ = ["configure_tracking", "tracked_scalars"]


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def tracked_scalars(output: Any, scalars: Callable[[Any], Mapping[str, Any]] | None = None) -> dict[str, float] | None:
    """What an iteration logs: the engine output's ``scalars`` (the pretraining trainer's losses, learning rate
    and collapse diagnostics) with those of the diagnostic handlers (``scalars``: the collapse alarm, the in-loop
    probe's AUCs), else its ``loss`` as ``train_loss``.

    Args:
        output: ``engine.state.output``: a dict, or a decollated list of dicts (the loss in each).
        scalars: the bundle's :class:`~dagman_components.handlers.events.LoggedScalars`; ``None`` reads the
            output's ``scalars`` only.

    Returns:
        ``{name: value}`` of the finite numbers; ``None`` when there is nothing to log (e.g. a validator's output).
    """
    if isinstance(output, Sequence) and not isinstance(output, str) and output and isinstance(output[0], Mapping):
        output = output[0]
    if not isinstance(output, Mapping):
        return None
    if isinstance(output.get("scalars"), Mapping):
        logged = scalars(output) if scalars is not None else output["scalars"]
        numbers = {str(k): _number(v) for k, v in logged.items()}
    else:
        numbers = {"train_loss": _number(output.get("loss"))}
    numbers = {k: v for k, v in numbers.items() if v is not None}
    return numbers or None


def _flat(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def configure_tracking(
    handlers: Sequence[Any],
    params: Mapping[str, Any] | None = None,
    artifacts: Sequence[str] = (),
    close: bool | None = None,
    step_per_run: bool = False,
    scalars: Callable[[Any], Mapping[str, Any]] | None = None,
) -> list[Any]:
    """Fit each ``monai.handlers.MLFlowHandler`` of ``handlers`` (those ``--tracking mlflow`` added) to the project.

    Args:
        handlers: an engine's handler list, as the bundle config resolves it.
        params: the run's settings, logged once as MLflow params (nested dicts as ``a.b`` keys).
        artifacts: files logged as artifacts when the engine completes, beside MONAI's own (the executed config);
            files that do not exist then are skipped.
        close: end the MLflow run when the engine completes (an evaluation run); ``None`` keeps MONAI's setting.
        step_per_run: for a validator run once per validation round: its metrics are logged at step 1, 2, ...
            (the round) instead of the validator's own epoch, which is always 1.
        scalars: the bundle's :class:`~dagman_components.handlers.events.LoggedScalars`, so MLflow logs the
            diagnostic handlers' numbers too (:func:`tracked_scalars`).

    Returns:
        ``handlers`` as a new list (the same handler objects).
    """
    from monai.handlers import MLFlowHandler

    for handler in handlers:
        if not isinstance(handler, MLFlowHandler):
            continue
        handler.output_transform = partial(tracked_scalars, scalars=scalars)
        if params:
            handler.experiment_param = {**(handler.experiment_param or {}), **_flat(params)}
        extra = tuple(str(a) for a in artifacts)
        handler.artifacts = tuple(a for a in (handler.artifacts or ()) if a) + extra
        if close is not None:
            handler.close_on_complete = as_bool(close, key="close")
        if step_per_run:
            rounds = itertools.count(1)
            handler.global_epoch_transform = lambda _epoch, _rounds=rounds: next(_rounds)
    return list(handlers)
