"""Saving and loading DAGMaN weights: atomic writes, the model card, and one loader for every bundle.

Key layout of a released ``models/model.pt`` (what :func:`export_encoder` writes): a flat state dict
of the teacher's :class:`~dagman_components.networks.SwinDAGMaN` encoder, with MONAI's Swin names
(``patch_embed.*``, ``layers1.0.*`` .. ``layers4.0.*``, identical to ``SwinUNETR.swinViT``), plus
``mask_token`` and the semantic-attention block ``sa.*`` (``sa.cls_token``, ``sa.blocks.N.*``,
``sa.norm.*``). The settings live in ``model_card.json`` beside it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "atomic_write_png",
    "atomic_save",
    "atomic_write_text",
    "sha256_of",
    "LoadReport",
    "WeightLoadError",
    "extract_state_dict",
    "load_pretrained_encoder",
    "export_encoder",
]

logger = logging.getLogger(__name__)

#: Wrapper prefixes stripped from checkpoint keys, in this order.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: Containers searched, in this order, when a checkpoint nests its state dict.
NESTED_KEYS = ("teacher", "state_dict", "model", "network", "student")


def _atomic_replace(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``: a kill
    at any moment leaves either the old file or the new one, never a truncated one."""
    _atomic_replace(Path(path), lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write text atomically (see :func:`atomic_save`)."""
    _atomic_replace(Path(path), lambda f: f.write(text.encode("utf-8")))


def atomic_write_png(fig: Any, path: str | os.PathLike) -> None:
    """Render a matplotlib figure to ``path`` as a PNG, atomically (see :func:`atomic_save`).

    Args:
        fig: a matplotlib ``Figure`` (left open; close pyplot figures yourself).
        path: the PNG file.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _atomic_replace(Path(path), lambda f: f.write(buf.getvalue()))


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class WeightLoadError(ValueError):
    """A checkpoint could not be loaded into the target network; the message names the file."""


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
    min_loaded_fraction: float = 0.9,
    exclude_prefixes: tuple[str, ...] = (),
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
        min_loaded_fraction: the smallest acceptable share of the target's encoder tensors loaded.
        exclude_prefixes: target keys (after ``key_prefix``) never counted as missing (e.g. a
            downstream head that the pretraining did not have).

    Returns:
        A :class:`LoadReport`.

    Raises:
        WeightLoadError: the file is missing or unreadable, shapes differ, or too little loaded.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise WeightLoadError(f"pretrained weights '{path}' do not exist; run the pretraining bundle or fix the path.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or pickled objects that weights_only refuses
        raise WeightLoadError(f"cannot read pretrained weights '{path}': {e}") from e
    source = extract_state_dict(checkpoint)
    own = target.state_dict()
    wanted = {k[len(key_prefix) :]: k for k in own if k.startswith(key_prefix)}
    wanted = {k: v for k, v in wanted.items() if not (exclude_prefixes and k.startswith(tuple(exclude_prefixes)))}
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
        raise WeightLoadError(
            f"'{path}' was saved from another architecture ({len(mismatched)} shape mismatches, e.g. "
            f"{'; '.join(mismatched[:3])}). Build the network with the settings in the weights' model card."
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
