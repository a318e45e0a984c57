# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Encoder I/O, one way for every bundle: read the model card, settle the settings, build, load, freeze.

The pretraining bundle writes ``models/model.pt`` (the teacher encoder's flat state dict) and
``models/model_card.json`` beside it (:func:`dagman_components.weights.state_dict.export_encoder`). Downstream
bundles, the comparison scripts and the diversity report go through this module:

- :func:`read_model_card` / :func:`card_path`: the card of a ``model.pt``; :func:`find_card`: the first
  of several weights that has one (a trained downstream model's own card before its encoder's);
- :func:`trained_model_card`: the card a downstream bundle writes beside the model it trains, so that
  the model runs without the pretraining bundle (its encoder settings travel with it);
- :func:`encoder_settings`: the encoder settings of the card; explicit config values that are not
  ``None`` must agree with it (else one line naming both values and the card); without a card, the
  config values over :data:`~dagman_components.networks.ENCODER_DEFAULTS`;
- :func:`card_preprocessing`: the one preprocessing factory: the spacing and HU window the weights were
  pretrained with, from the card's ``preprocessing`` (a config window that contradicts it is refused);
- :func:`build_encoder`: builds the card's ``class`` (:class:`SwinDAGMaN` or :class:`ViTDAGMaN`);
- :func:`load_encoder_weights`: the one loading policy: every encoder tensor of the target must be
  found with its shape, and the file may hold nothing else than the parts the target leaves out by
  design (``unused_prefixes``); ``key_prefix`` says where the encoder sits in the target;
- :func:`with_encoder_weights`: the one name a bundle config uses, when it builds its ``network``
  (the one moment weights are loaded): the policy above, or random weights for ``null``, and the
  network back;
- :func:`weights_or_random`: the one spelling of "start from random weights", ``null`` (in YAML and
  on the command line); ``''``, ``'none'``, ``'random'``, ``'false'`` are refused;
- :func:`prepare_encoder`: all of the above plus :func:`freeze`, for frozen-feature users;
- :func:`require_weights`: a missing ``model.pt`` names the command that makes it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import monai
import torch
import torch.nn as nn

from dagman_components.data.transforms import DEFAULT_SPACING, HU_WINDOW, resolve_hu_window
from dagman_components.errors import DagmanError
from dagman_components.networks.outputs import EncoderOutput
from dagman_components.networks.swin_dagman import ENCODER_DEFAULTS, SwinDAGMaN
from dagman_components.networks.vit_dagman import ViTDAGMaN
from dagman_components.weights.state_dict import LoadReport, WeightLoadError, load_pretrained_encoder, sha256_of

__all__ = [
    "MODEL_CARD_NAME",
    "RANDOM_WEIGHTS",
    "PRETRAINING_COMMAND",
    "EncoderOutput",
    "EncoderSettingError",
    "card_path",
    "find_card",
    "read_model_card",
    "trained_model_card",
    "encoder_settings",
    "card_preprocessing",
    "build_encoder",
    "weights_or_random",
    "require_weights",
    "encoder_weights_folder",
    "load_encoder_weights",
    "with_encoder_weights",
    "freeze",
    "prepare_encoder",
]

logger = logging.getLogger(__name__)

#: File name of the model card beside a ``model.pt``.
MODEL_CARD_NAME = "model_card.json"
#: What makes the pretrained encoder weights (named in messages when they are missing).
PRETRAINING_COMMAND = (
    "`make demo` (CPU demo weights) or the pretraining bundle bundles/dagman_ct_pretraining "
    "(configs/train.yaml), which writes models/model.pt and models/model_card.json"
)
#: Encoder classes a card may name (the last part of its ``network.class``).
ENCODER_CLASSES: dict[str, type[nn.Module]] = {"SwinDAGMaN": SwinDAGMaN, "ViTDAGMaN": ViTDAGMaN}
#: The one spelling of "no weights, start from random" on the command line (``null`` in YAML is ``None``).
RANDOM_WEIGHTS = "null"
#: Spellings refused for "no weights" (they would otherwise be read as file names).
_RANDOM_LOOKALIKES = ("", "none", "null", "random", "false")


class EncoderSettingError(DagmanError, ValueError):
    """An encoder setting contradicts the model card, or a weights key is spelled wrongly."""


def card_path(weights: str | os.PathLike | None, fallback: str | os.PathLike | None = None) -> Path | None:
    """The ``model_card.json`` beside ``weights`` (which need not exist).

    Args:
        weights: a ``model.pt``; ``None`` or ``"null"`` (random initialisation): use ``fallback``.
        fallback: the ``model.pt`` whose card gives the settings of a random encoder (like for like).

    Returns:
        The card's path, or ``None`` when neither is given.
    """
    if weights is None or weights == RANDOM_WEIGHTS:
        weights = fallback
    if weights is None:
        return None
    return Path(os.path.abspath(os.fspath(weights))).with_name(MODEL_CARD_NAME)


def find_card(*weights: str | os.PathLike | None) -> Path | None:
    """The model card beside the first of ``weights`` that has one.

    A downstream bundle's trained ``model.pt`` carries its own card (:func:`trained_model_card`); weights
    trained before that did not, and their encoder's card (the pretraining bundle's) describes them.

    Args:
        weights: ``model.pt`` paths in order of preference; ``None`` and ``"null"`` are skipped.

    Returns:
        The first existing card; when none exists, the card path of the first weights (a missing card:
        the settings are the config values, and the log names where the card was looked for); ``None``
        when no weights are given.

    Example:
        >>> find_card(None, "null") is None
        True
    """
    candidates = [card_path(w) for w in weights if w is not None and w != RANDOM_WEIGHTS]
    return next((c for c in candidates if c.is_file()), candidates[0] if candidates else None)


def read_model_card(card: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The content of a model card.

    Args:
        card: a ``model_card.json`` path, a ``model.pt`` path (its card beside it), or the card's dict.

    Returns:
        The card as a dict (settings under ``network``).

    Raises:
        FileNotFoundError: the card does not exist.
        EncoderSettingError: it is not valid JSON.
    """
    if isinstance(card, Mapping):
        return dict(card)
    path = Path(os.path.abspath(os.fspath(card)))
    if path.suffix != ".json":
        path = card_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model card '{path}' does not exist; {PRETRAINING_COMMAND}.")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EncoderSettingError(
            f"model card '{path}' is not valid JSON ({err}); put back the model_card.json written with the "
            f"model.pt beside it, or remove it to use the config's encoder settings."
        ) from err
    if not isinstance(content, dict):
        raise EncoderSettingError(f"model card '{path}' holds a JSON {type(content).__name__}, not an object; put "
                                  f"back the model_card.json written with the model.pt beside it.")
    return content


def _comparable(value: Any) -> Any:
    if isinstance(value, Sequence) and not isinstance(value, str):
        items = tuple(_comparable(v) for v in value)
        return items[0] if len(set(items)) == 1 and len(items) == 3 else items  # isotropic [4, 4, 4] == 4
    return float(value) if isinstance(value, float) else value


def _class_name(network: Mapping[str, Any]) -> str:
    name = str(network.get("class", "SwinDAGMaN")).rsplit(".", 1)[-1]
    if name not in ENCODER_CLASSES:
        raise EncoderSettingError(f"model card names encoder class '{name}'; known: {sorted(ENCODER_CLASSES)}.")
    return name


def encoder_settings(
    card: str | os.PathLike | Mapping[str, Any] | None = None, **explicit: Any
) -> dict[str, Any]:
    """The encoder settings to build with: the card's, checked against the explicit ones.

    Args:
        card: a ``model_card.json`` or ``model.pt`` path (a missing card means "no card"), the card's
            dict, or ``None``.
        explicit: config values; ``None`` means "not set" (take the card's or the default).

    Returns:
        ``{"class": "SwinDAGMaN" | "ViTDAGMaN", **constructor arguments}``. With a card, its
        ``network`` section plus the explicit values of settings it does not record (e.g.
        ``drop_path_rate``), over the Swin defaults for a Swin card; without one,
        :data:`ENCODER_DEFAULTS` updated with the explicit values.

    Raises:
        EncoderSettingError: an explicit value differs from the card's (one line: key, both values, card).
    """
    explicit = {k: v for k, v in explicit.items() if v is not None}
    content, where = _card_content(card)
    if content is None:
        if card is not None and not isinstance(card, Mapping):
            logger.info("no model card at %s: the encoder settings are the config values and defaults.", where)
        return {"class": "SwinDAGMaN", **ENCODER_DEFAULTS, **explicit}
    network = dict(content.get("network", content))
    name = _class_name(network)
    network.pop("class", None)
    for key, value in explicit.items():
        if key in network and _comparable(network[key]) != _comparable(value):
            raise EncoderSettingError(
                f"encoder setting {key}={value!r} contradicts {key}={network[key]!r} in the model card {where}: remove "
                f"the setting (or set it to null) to use the card's value, or use weights made with {key}={value!r}."
            )
    base = {**ENCODER_DEFAULTS} if name == "SwinDAGMaN" else {}
    return {"class": name, **base, **explicit, **network}


def _card_content(card: str | os.PathLike | Mapping[str, Any] | None) -> tuple[Mapping[str, Any] | None, str]:
    """The card's content (``None`` when there is none) and where it is, for messages."""
    if card is None or isinstance(card, Mapping):
        return card, "(given as a mapping)"
    path = Path(os.path.abspath(os.fspath(card)))
    path = path if path.suffix == ".json" else card_path(path)
    return (read_model_card(path) if path.is_file() else None), f"'{path}'"


def card_preprocessing(
    card: str | os.PathLike | Mapping[str, Any] | None,
    spacing: Sequence[float] | None = None,
    hu_window: str | Sequence[float] | None = None,
    key: str = "hu_window",
) -> dict[str, list[float]]:
    """The CT preprocessing to use with an encoder: the one factory for every bundle, probe and metric.

    The HU window is a property of the weights: features of a lung-window encoder mean nothing on
    soft-tissue-windowed input. So the card's ``preprocessing.hu_window`` is used; a config window that
    differs from it is an error. The spacing is a task choice (a segmentation bundle may work at a finer
    grid than pretraining did): an explicit one is kept, and a difference from the card is logged.

    Args:
        card: a ``model_card.json`` or ``model.pt`` path (a missing card means "no card"), the card's dict,
            or ``None``.
        spacing: the task's voxel spacing in mm; ``None``: the card's (:data:`DEFAULT_SPACING` without one).
        hu_window: ``None``: the card's (the soft-tissue window without one); else a name of
            :data:`~dagman_components.data.HU_WINDOWS` or ``[low, high]``, which must match the card's.
        key: the config key of the window, named in the messages.

    Returns:
        ``{"spacing": [x, y, z], "hu_window": [low, high]}``.

    Raises:
        EncoderSettingError: the window contradicts the card's (one line: both windows and the card).
        ConfigValueError: the window is not a known name or a valid pair.

    Example:
        >>> card_preprocessing({"preprocessing": {"spacing_mm": [1.0, 1.0, 1.0], "hu_window": [-1024.0, 300.0]}})
        {'spacing': [1.0, 1.0, 1.0], 'hu_window': [-1024.0, 300.0]}
        >>> card_preprocessing(None, hu_window="lung")["hu_window"]
        [-1024.0, 300.0]
    """
    content, where = _card_content(card)
    recorded = dict((content or {}).get("preprocessing", {}))
    card_window = resolve_hu_window(recorded["hu_window"], key=f"preprocessing.hu_window of the card {where}") \
        if recorded.get("hu_window") is not None else None
    window = resolve_hu_window(hu_window, key=key) if hu_window is not None else None
    if window is not None and card_window is not None and window != card_window:
        raise EncoderSettingError(
            f"{key}={list(window)} contradicts the window the encoder was pretrained with, {list(card_window)} in the "
            f"model card {where}: remove {key} (or set it to null) to use the card's window."
        )
    card_spacing = [float(s) for s in recorded["spacing_mm"]] if recorded.get("spacing_mm") else None
    chosen = [float(s) for s in spacing] if spacing is not None else card_spacing or [float(s) for s in DEFAULT_SPACING]
    if card_spacing is not None and chosen != card_spacing:
        logger.info("spacing %s mm (the task's), the encoder was pretrained at %s mm (card %s).", chosen, card_spacing,
                    where)
    return {"spacing": chosen, "hu_window": list(window or card_window or HU_WINDOW)}


#: Constructor arguments that shape training or execution only, not the weights; a trained model's card
#: leaves them out, so that another value at inference is no contradiction.
TRAINING_ONLY_SETTINGS = ("drop_path_rate", "use_checkpoint", "use_flash_attention")


def trained_model_card(
    encoder: Mapping[str, Any],
    source_weights: str | os.PathLike | None,
    recorded: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The model card of a model trained on top of an encoder, less what each saved file adds (its
    name, sha256 and selection: :class:`~dagman_components.handlers.TrainedModelCard`).

    Args:
        encoder: the encoder settings the model was built with (:func:`encoder_settings`'s result).
        source_weights: the encoder weights training started from; ``None`` or ``"null"``: random.
        recorded: further sections to record (the model's class and task settings, preprocessing).

    Returns:
        ``network`` (the encoder settings, in the pretraining card's form, without
        :data:`TRAINING_ONLY_SETTINGS`), ``recorded``, ``encoder_weights`` (path and sha256 of the
        starting weights, or ``"random"``) and the MONAI and torch versions.

    Example:
        >>> card = trained_model_card({"class": "SwinDAGMaN", "embed_dim": 24, "drop_path_rate": 0.1}, None)
        >>> card["network"], card["encoder_weights"]
        ({'class': 'dagman_components.networks.SwinDAGMaN', 'embed_dim': 24}, 'random')
    """
    settings = {k: v for k, v in encoder.items() if k not in TRAINING_ONLY_SETTINGS and k != "class"}
    network = {"class": f"dagman_components.networks.{_class_name(encoder)}", **settings}
    source = None if source_weights is None or source_weights == RANDOM_WEIGHTS else os.fspath(source_weights)
    return {
        "network": network,
        **dict(recorded or {}),
        "encoder_weights": "random" if source is None else {
            "path": os.path.abspath(source), "sha256": sha256_of(source) if os.path.isfile(source) else None},
        "monai_version": monai.__version__,
        "torch_version": torch.__version__,
    }


def build_encoder(card: str | os.PathLike | Mapping[str, Any] | None = None, **explicit: Any) -> nn.Module:
    """Build the encoder a card describes (its ``class``: Swin or ViT), see :func:`encoder_settings`.

    Args:
        card: as :func:`encoder_settings`, or the settings it returned (a dict with ``class``).
        explicit: config values (``None``: not set), e.g. ``drop_path_rate``.

    Returns:
        A :class:`SwinDAGMaN` or :class:`ViTDAGMaN`.

    Example:
        >>> build_encoder({"network": {"class": "ViTDAGMaN", "img_size": 32, "patch_size": 16,
        ...                "hidden_size": 24, "num_layers": 1, "num_heads": 2}}).__class__.__name__
        'ViTDAGMaN'
    """
    settings = encoder_settings(card, **explicit)
    cls = ENCODER_CLASSES[settings.pop("class")]
    if cls is ViTDAGMaN:  # the ViT has no stochastic depth, gradient checkpointing or fused attention switch
        for key in TRAINING_ONLY_SETTINGS:
            settings.pop(key, None)
    return cls(**settings)


def weights_or_random(value: str | os.PathLike | None, key: str) -> str | None:
    """The one spelling of "start from random weights": ``null``.

    ``null`` in YAML arrives as ``None``; ``--key null`` on the command line arrives as the string
    ``"null"`` (``monai.bundle run`` drops ``None`` overrides, so ``--key None`` would leave the
    default weights in place). Both mean random initialisation; look-alikes are refused.

    Args:
        value: a weights path, ``None`` or ``"null"``.
        key: the config key, named in the messages.

    Returns:
        The path as a string, or ``None`` (random initialisation, logged as a warning).

    Raises:
        EncoderSettingError: for ``''``, ``'none'``, ``'random'``, ``'false'`` or ``'NULL'``-like spellings.
    """
    if value is None or value == RANDOM_WEIGHTS:
        logger.warning("%s is null: the encoder starts from RANDOM weights.", key)
        return None
    if str(value).strip().lower() in _RANDOM_LOOKALIKES:
        raise EncoderSettingError(
            f"config key '{key}' is {str(value)!r}: for random initialisation set it to null "
            f"(YAML: {key}: null, command line: --{key} null); otherwise give the path of a model.pt."
        )
    return os.fspath(value)


#: The pretraining bundle's folder name: a downstream bundle beside it finds the encoder weights there.
PRETRAINING_BUNDLE = "dagman_ct_pretraining"


def encoder_weights_folder(bundle_root: str | os.PathLike) -> str:
    """Where a frozen-encoder bundle finds its encoder ``model.pt``: its own ``models/`` when that holds
    one (a packaged or zoo copy), else the pretraining bundle's ``models/`` beside it.

    Args:
        bundle_root: the bundle's folder.

    Returns:
        ``<bundle_root>/models`` or ``<bundle_root>/../dagman_ct_pretraining/models`` (the path as joined,
        not resolved).
    """
    own = os.path.join(bundle_root, "models")
    if os.path.isfile(os.path.join(own, "model.pt")):
        return own
    return os.path.join(bundle_root, "..", PRETRAINING_BUNDLE, "models")


def require_weights(path: str | os.PathLike, made_by: str = PRETRAINING_COMMAND, key: str | None = None) -> str:
    """Return ``path`` when the file exists, else fail naming the command that makes it.

    Args:
        path: a ``model.pt``.
        made_by: the bundle or command that writes it.
        key: the config key of ``path``; when given, the message adds how to start from random weights.

    Raises:
        FileNotFoundError: the file does not exist (the message names ``made_by``).
    """
    if not os.path.isfile(path):
        where = f" (config key '{key}')" if key else ""
        random = f"; or set {key} to null (--{key} null) to start from random weights" if key else ""
        raise FileNotFoundError(f"weights '{path}'{where} do not exist yet: they are made by {made_by}{random}.")
    return os.fspath(path)


def load_encoder_weights(
    target: nn.Module,
    path: str | os.PathLike,
    key_prefix: str = "",
    unused_prefixes: tuple[str, ...] = (),
) -> LoadReport:
    """Load encoder weights into ``target`` with the one policy of every bundle.

    Every tensor of ``target`` under ``key_prefix`` must be found with its shape (a shape mismatch
    names the settings to fix), and every tensor of the file must be used, except those starting
    with ``unused_prefixes`` (parts the target leaves out by design, e.g. ``sa.`` for ``SwinUNETR``).

    Args:
        target: the network, filled in place (``DistributedDataParallel`` unwrapped by the caller).
        path: a ``model.pt`` (flat encoder state dict), a full pretraining checkpoint, or a trained
            downstream ``model.pt`` (its ``encoder.`` part).
        key_prefix: where the encoder sits in ``target`` (``""``, ``"encoder."``, ``"swinViT."``).
        unused_prefixes: file tensors that may stay unused.

    Returns:
        The :class:`~dagman_components.weights.state_dict.LoadReport`.

    Raises:
        FileNotFoundError: the file does not exist (the message names :data:`PRETRAINING_COMMAND`).
        dagman_components.weights.state_dict.WeightLoadError: unreadable file, another architecture, missing or extra tensors.
    """
    require_weights(path)
    report = load_pretrained_encoder(target, path, key_prefix=key_prefix, min_loaded_fraction=1.0)
    extra = [k for k in report.unexpected if not k.startswith(tuple(unused_prefixes))]
    if extra:
        raise WeightLoadError(
            f"'{path}' holds {len(extra)} encoder tensors that the network has no place for (e.g. {extra[:3]}): "
            f"it was made with other settings (e.g. deeper stages). Use the settings of its model card."
        )
    return report


def with_encoder_weights(
    network: nn.Module,
    weights: str | os.PathLike | None,
    key: str,
    key_prefix: str = "",
    unused_prefixes: tuple[str, ...] = (),
) -> nn.Module:
    """Load encoder ``weights`` into ``network`` as it is built, and return it: the form bundle configs use.

    ``network: $dagman_components.weights.encoder_io.with_encoder_weights(@network_def, @pretrained_path,
    key='pretrained_path', key_prefix='encoder.').to(@device)``: the weights load when the network is
    built, before anything (a feature cache, an optimizer) uses it.

    Args:
        network: the network (a ``DistributedDataParallel`` wrapper is looked through), filled in place.
        weights: a ``model.pt`` or full pretraining checkpoint; ``None`` / ``"null"``: random weights,
            logged as a warning (:func:`weights_or_random`).
        key: the config key of ``weights``, named in messages.
        key_prefix: where the encoder sits in ``network`` (``""``, ``"encoder."``, ``"swinViT."``).
        unused_prefixes: file tensors that may stay unused (see :func:`load_encoder_weights`).

    Returns:
        ``network`` itself.

    Raises:
        FileNotFoundError, EncoderSettingError, dagman_components.weights.state_dict.WeightLoadError: as
            :func:`weights_or_random`, :func:`require_weights` and :func:`load_encoder_weights`.
    """
    path = weights_or_random(weights, key)
    if path is not None:
        require_weights(path, key=key)
        target = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
        load_encoder_weights(target, path, key_prefix=key_prefix, unused_prefixes=unused_prefixes)
    return network


def freeze(encoder: nn.Module) -> nn.Module:
    """Turn off every parameter's gradient and put ``encoder`` in ``eval`` mode; returns it."""
    encoder.requires_grad_(False)
    return encoder.eval()


def prepare_encoder(
    weights: str | os.PathLike | None,
    card: str | os.PathLike | Mapping[str, Any] | None = None,
    frozen: bool = True,
    seed: int | None = None,
    key: str = "model_path",
    **explicit: Any,
) -> nn.Module:
    """Build the encoder of the card, load ``weights`` (``None``: seeded random) and freeze it.

    Args:
        weights: a ``model.pt``, or ``None`` for random initialisation (see :func:`weights_or_random`).
        card: the settings (default: the card beside ``weights``; without any, the explicit values
            over the defaults).
        frozen: :func:`freeze` the encoder.
        seed: ``torch.manual_seed`` before building (``None``: leave the generator alone).
        key: the config key of ``weights``, named in errors.
        explicit: settings (``None``: not set), checked against the card.

    Returns:
        The encoder, with ``init`` (``"pretrained"`` or ``"random"``), ``load_report`` and
        ``weights_sha256`` (both ``None`` for random) set on it.

    Raises:
        FileNotFoundError, EncoderSettingError, dagman_components.weights.state_dict.WeightLoadError: as the steps above.
    """
    path = weights_or_random(weights, key)
    if path is not None:
        require_weights(path, key=key)
    if card is None and path is not None:
        card = read_model_card(path) if card_path(path).is_file() else None
    if seed is not None:
        torch.manual_seed(int(seed))
    encoder = build_encoder(card, **explicit)
    report = load_encoder_weights(encoder, path) if path is not None else None
    encoder.init = "random" if path is None else "pretrained"  # type: ignore[attr-defined]
    encoder.load_report = report  # type: ignore[attr-defined]
    encoder.weights_sha256 = None if path is None else sha256_of(path)  # type: ignore[attr-defined]
    return freeze(encoder) if frozen else encoder
