"""Build an encoder from a model card, so downstream bundles match the pretrained weights' settings."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from dagman_components.networks.swin_dagman import ENCODER_DEFAULTS, SwinDAGMaN

__all__ = ["encoder_settings", "build_encoder"]


def encoder_settings(card: Mapping[str, Any] | str | os.PathLike | None = None, **overrides: Any) -> dict[str, Any]:
    """The encoder settings of a model card (``model_card.json`` beside a ``model.pt``, or its dict),
    on top of :data:`ENCODER_DEFAULTS`, with ``overrides`` applied last.

    Raises:
        FileNotFoundError: when a card path does not exist.
        ValueError: for an override that is not an encoder setting.
    """
    if isinstance(card, (str, os.PathLike)):
        if not os.path.isfile(card):
            raise FileNotFoundError(f"model card '{card}' does not exist (it is written beside model.pt).")
        with open(card) as f:
            card = json.load(f)
    network = dict((card or {}).get("network", card or {}))
    unknown = set(overrides) - set(ENCODER_DEFAULTS) - {"drop_path_rate", "use_checkpoint", "sa_depth", "mlp_ratio"}
    if unknown:
        raise ValueError(f"unknown encoder setting(s) {sorted(unknown)}; valid: {sorted(ENCODER_DEFAULTS)}.")
    settings = {k: network.get(k, v) for k, v in ENCODER_DEFAULTS.items()}
    settings.update(overrides)
    return settings


def build_encoder(card: Mapping[str, Any] | str | os.PathLike | None = None, **overrides: Any) -> SwinDAGMaN:
    """A :class:`SwinDAGMaN` with the settings of :func:`encoder_settings`."""
    s = encoder_settings(card, **overrides)
    return SwinDAGMaN(**s)
