"""Saving and loading DAGMaN weights: atomic writes, the model card, and one loader for every bundle.

Key layout of a released ``models/model.pt`` (what :func:`export_encoder` writes): a flat state dict
of the teacher's :class:`~dagman_components.networks.SwinDAGMaN` encoder, with MONAI's Swin names
(``patch_embed.*``, ``layers1.0.*`` .. ``layers4.0.*``, identical to ``SwinUNETR.swinViT``), plus
``mask_token`` and the semantic-attention block ``sa.*`` (``sa.cls_token``, ``sa.blocks.N.*``,
``sa.norm.*``). The settings live in ``model_card.json`` beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dagman_components.atomic import atomic_save, atomic_write_png, atomic_write_text
from dagman_components.errors import DagmanError, is_pickled_objects_refusal, pickled_objects_message

__all__ = [
    "atomic_write_png",
    "atomic_save",
    "atomic_write_text",
    "file_hash",
    "sha256_of",
    "LoadReport",
    "WeightLoadError",
    "extract_state_dict",
    "load_weights_only",
    "is_pickled_objects_refusal",
    "pickled_objects_error",
    "load_pretrained_encoder",
    "export_encoder",
]

logger = logging.getLogger(__name__)

#: Wrapper prefixes stripped from checkpoint keys, in this order.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: Containers searched, in this order, when a checkpoint nests its state dict.
NESTED_KEYS = ("teacher", "state_dict", "model", "network", "student")


def file_hash(path: str | os.PathLike, hash_type: str = "sha256") -> str:
    """The hex digest of a file, read in 1 MiB chunks: the one file hash of the project (model cards, the
    bundle's ``large_files``).

    Args:
        path: the file.
        hash_type: a :func:`hashlib.new` name (``sha256``, ``md5``, ...).

    Returns:
        The hex digest.
    """
    digest = hashlib.new(hash_type)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (what model cards record)."""
    return file_hash(path, "sha256")


class WeightLoadError(DagmanError, ValueError):
    """A checkpoint could not be loaded into the target network; the message names the file."""


def load_weights_only(path: str | os.PathLike, map_location: Any = "cpu", what: str = "weights") -> Any:
    """``torch.load(path, weights_only=True)`` with short errors that name the file.

    Every weight and checkpoint file of the bundles is read through this function. A file that holds
    pickled Python objects (anything beyond tensors, numbers, strings and containers) is refused:
    unpickling it could run code from the file, so it is never loaded.

    Args:
        path: the file to read.
        map_location: device mapping for ``torch.load``.
        what: what the file is, for the message (``"pretrained weights"``, ``"checkpoint"``).

    Returns:
        The loaded object.

    Raises:
        WeightLoadError: the file is missing, unreadable, damaged, or holds pickled objects.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as e:
        raise WeightLoadError(f"{what} file '{path}' does not exist.") from e
    except Exception as e:  # corrupt, truncated, or pickled objects that weights_only refuses
        if is_pickled_objects_refusal(e):
            raise pickled_objects_error(path, what) from None
        raise WeightLoadError(f"cannot read {what} '{path}': {e}") from e


def pickled_objects_error(path: str | os.PathLike, what: str = "weights") -> WeightLoadError:
    """Our message for a file that holds pickled Python objects (torch's own text suggests
    ``weights_only=False``, which would run code from the file)."""
    return WeightLoadError(pickled_objects_message(path, what))


@dataclass
class LoadReport:
    """What :func:`load_pretrained_encoder` did."""

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def loaded_fraction(self) -> float:
        total = len(self.loaded) + len(self.missing)
        return len(self.loaded) / total if total else 0.0

    def summary(self) -> str:
        return (
            f"{self.path}: loaded {len(self.loaded)} tensors, missing {len(self.missing)}, "
            f"unexpected {len(self.unexpected)} ({100 * self.loaded_fraction:.1f}% of the target)"
        )


def extract_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Find the weights in a checkpoint: a flat state dict, or one nested under ``teacher``,
    ``state_dict``, ``model``, ``network`` or ``student``; wrapper prefixes (``module.``) stripped.
    From a full pretraining checkpoint this picks the teacher, and from it the encoder part."""
    sd: Any = checkpoint
    while isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        key = next((k for k in NESTED_KEYS if isinstance(sd.get(k), Mapping)), None)
        if key is None:
            break
        sd = sd[key]
    if not isinstance(sd, Mapping):
        raise WeightLoadError("no state dict found in the checkpoint.")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in WRAPPER_PREFIXES:
            k = k[len(prefix) :] if k.startswith(prefix) else k
        out[k] = v
    if any(k.startswith("encoder.") for k in out):  # a full DAGMaNPretrainNetwork: keep the encoder
        out = {k[len("encoder.") :]: v for k, v in out.items() if k.startswith("encoder.")}
    return out


def load_pretrained_encoder(
    target: nn.Module,
    path: str | os.PathLike,
    key_prefix: str = "",
    min_loaded_fraction: float = 1.0,
) -> LoadReport:
    """Load DAGMaN encoder weights into ``target`` (or its part named by ``key_prefix``) and report.

    The one call every bundle uses: it reads ``path`` with ``torch.load(weights_only=True)``, picks
    the encoder weights (:func:`extract_state_dict`), maps them to ``key_prefix + name`` in
    ``target``, refuses any shape mismatch (a checkpoint of another architecture), loads the rest,
    logs loaded / missing / unexpected counts, and fails when less than ``min_loaded_fraction`` of
    the target's parameters under ``key_prefix`` were found.

    Args:
        target: the network to fill in place.
        path: a ``model.pt`` (flat encoder state dict) or a full pretraining checkpoint.
        key_prefix: where the encoder lives in ``target``: ``""`` for a bare
            :class:`~dagman_components.networks.SwinDAGMaN`, ``"swinViT."`` for MONAI's ``SwinUNETR``,
            ``"encoder."`` for a network that holds the encoder as ``encoder``.
        min_loaded_fraction: the smallest acceptable share of the target's encoder tensors loaded
            (the project's rule: all of them, 1.0).

    Returns:
        A :class:`LoadReport`.

    Raises:
        WeightLoadError: the file is missing or unreadable, shapes differ, or too little loaded.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise WeightLoadError(f"pretrained weights '{path}' do not exist; run the pretraining bundle or fix the path.")
    checkpoint = load_weights_only(path, what="pretrained weights")
    source = extract_state_dict(checkpoint)
    own = target.state_dict()
    wanted = {k[len(key_prefix) :]: k for k in own if k.startswith(key_prefix)}
    report = LoadReport(path=path)
    update = {}
    mismatched = []
    for name, full in wanted.items():
        if name not in source:
            report.missing.append(full)
        elif source[name].shape != own[full].shape:
            mismatched.append(f"{name}: file {tuple(source[name].shape)} vs network {tuple(own[full].shape)}")
        else:
            update[full] = source[name]
            report.loaded.append(full)
    report.unexpected = sorted(set(source) - set(wanted))
    if mismatched:
        card = os.path.join(os.path.dirname(os.path.abspath(path)), "model_card.json")
        raise WeightLoadError(
            f"'{path}' was saved from another architecture ({len(mismatched)} shape mismatches, e.g. "
            f"{'; '.join(mismatched[:5])}). Build the network with the settings in the weights' model card"
            + (f"; if it was built from '{card}', that card does not describe these weights: use the card "
               f"written with them." if os.path.isfile(card) else ".")
        )
    if report.loaded_fraction < min_loaded_fraction:
        raise WeightLoadError(
            f"only {len(report.loaded)} of {len(wanted)} encoder tensors of the network were found in '{path}' "
            f"(need {100 * min_loaded_fraction:.0f}%); e.g. missing {report.missing[:3]}, unexpected "
            f"{report.unexpected[:3]}. Is this a DAGMaN encoder checkpoint, and is key_prefix='{key_prefix}' right?"
        )
    own.update(update)
    target.load_state_dict(own)
    logger.info(report.summary())
    return report


def export_encoder(
    encoder: nn.Module, path: str | os.PathLike, card: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Write the encoder's flat state dict to ``path`` atomically and its model card (with the
    file's sha256) to ``model_card.json`` beside it.

    Returns:
        The card as written.
    """
    path = Path(path)
    state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    atomic_save(state, path)
    full_card = {**(card or {}), "file": path.name, "sha256": sha256_of(path), "num_tensors": len(state)}
    atomic_write_text(json.dumps(full_card, indent=2, default=str) + "\n", path.with_name("model_card.json"))
    return full_card
