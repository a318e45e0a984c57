"""Log the teacher's attention-head diversity per Swin stage to TensorBoard during pretraining.

A collapsing run (every head attending alike, or only to itself) shows itself as a falling
distance entropy and a head spread going to zero long before the downstream numbers say so. The
handler is off unless added to the trainer's handlers (``configs/diversity_logging.yaml`` of the
pretraining bundle does so) and then measures every ``interval`` epochs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from ignite.engine import Engine, Events

from dagman_components.handlers.events import DiagnosticEvents, register_diagnostic_events
from dagman_components.metrics.diversity_report import encoder_stage_diversity, iter_images, summarise_diversity
from dagman_components.networks.pretrain import unwrap

__all__ = ["AttentionDiversityHandler"]

logger = logging.getLogger(__name__)


class AttentionDiversityHandler:
    """Every ``interval`` epochs, run the encoder in ``eval`` mode (no mask, no patch dropout) on
    fixed images and log per stage ``diversity/stage<k>/distance_entropy_bits``,
    ``.../head_spread_of_mean_distance`` (standard deviation over heads of their mean attention
    distance), ``.../mean_distance`` and ``.../attention_entropy_bits`` (averaged over heads) to
    TensorBoard, against the epoch. The handler keeps the last summary (``summary``, measured at
    ``epoch``; both in ``state_dict``) and fires
    :attr:`~dagman_components.handlers.events.DiagnosticEvents.ATTENTION_DIVERSITY` on the engine after each.

    Args:
        network: the network to measure: the teacher (default in the config), a
            :class:`DAGMaNPretrainNetwork` or a bare Swin encoder (DDP-wrapped or not).
        log_dir: TensorBoard folder (ignored when ``summary_writer`` is given).
        interval: measure every this many epochs; 0 or less disables the handler.
        images: fixed inputs (B, C, D, H, W) or a sequence of (1, C, D, H, W); ``None`` takes the
            first view of the last batch of the epoch (``view_key``), up to ``max_images`` images.
        view_key: batch key of the images when ``images`` is ``None``.
        max_images: images measured per call.
        bins: histogram bins of the distance entropy.
        summary_writer: an existing ``SummaryWriter`` to write to.
        tag_prefix: prefix of the scalar tags.

    Example (bundle config)::

        - _target_: dagman_components.handlers.attention_diversity.AttentionDiversityHandler
          network: "@teacher"
          log_dir: "@output_dir"
          interval: 10
    """

    def __init__(
        self,
        network: nn.Module,
        log_dir: str | os.PathLike | None = None,
        interval: int = 0,
        images: torch.Tensor | Sequence[torch.Tensor] | None = None,
        view_key: str = "image",
        max_images: int = 1,
        bins: int = 64,
        summary_writer: Any | None = None,
        tag_prefix: str = "diversity",
    ) -> None:
        if summary_writer is None and log_dir is None and int(interval) > 0:
            raise ValueError("AttentionDiversityHandler needs log_dir or summary_writer when interval > 0.")
        self.network = network
        self.log_dir = log_dir
        self.interval = int(interval)
        self.images = images
        self.view_key = view_key
        self.max_images = max(1, int(max_images))
        self.bins = int(bins)
        self._writer = summary_writer
        self._owns_writer = False
        self.tag_prefix = tag_prefix
        #: The last per-stage summary (:func:`summarise_diversity`), or None before the first measurement.
        self.summary: dict[str, dict[str, Any]] | None = None
        #: The epoch of ``summary``.
        self.epoch: int | None = None

    def state_dict(self) -> dict:
        """The last summary and its epoch."""
        return {"summary": self.summary, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s content."""
        self.summary, self.epoch = state["summary"], state["epoch"]

    @property
    def writer(self) -> Any:
        """The TensorBoard writer, created on first use."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=os.fspath(self.log_dir))
            self._owns_writer = True
        return self._writer

    def attach(self, engine: Engine) -> None:
        """Measure at the end of every ``interval``-th epoch (nothing is attached when disabled)."""
        if self.interval <= 0:
            logger.info("attention-diversity logging is off (interval=%d)", self.interval)
            return
        register_diagnostic_events(engine)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self.close)

    def _encoder(self) -> nn.Module:
        net = unwrap(self.network)
        return net.encoder if hasattr(net, "encoder") else net

    def _inputs(self, engine: Engine) -> list[torch.Tensor]:
        if self.images is not None:
            source: Any = self.images
        else:
            batch = engine.state.batch
            if not isinstance(batch, dict) or self.view_key not in batch:
                raise KeyError(f"AttentionDiversityHandler: the batch has no '{self.view_key}' key; set view_key or images.")
            source = batch[self.view_key]
        images = []
        for img in iter_images(source):
            images.append(img.as_tensor() if hasattr(img, "as_tensor") else img)
            if len(images) == self.max_images:
                break
        return images

    def measure(self, engine: Engine) -> dict[str, dict[str, Any]]:
        """Per-stage summary (:func:`summarise_diversity`) of the network on the images."""
        encoder = self._encoder()
        device = next(encoder.parameters()).device
        per_image = [encoder_stage_diversity(encoder, img.to(device).float(), bins=self.bins)[0] for img in self._inputs(engine)]
        return summarise_diversity(per_image)

    def __call__(self, engine: Engine) -> None:
        """Measure and log against the epoch."""
        summary = self.measure(engine)
        epoch = int(engine.state.epoch)
        for stage, s in summary.items():
            scalars = {
                "distance_entropy_bits": s["distance_entropy_bits"]["mean"],
                "head_spread_of_mean_distance": s["head_spread_of_mean_distance"]["mean"],
                "mean_distance": float(np.mean(s["per_head_mean_distance"]["mean"])),
                "attention_entropy_bits": float(np.mean(s["per_head_attention_entropy_bits"]["mean"])),
            }
            for name, value in scalars.items():
                self.writer.add_scalar(f"{self.tag_prefix}/{stage}/{name}", value, epoch)
        self.writer.flush()
        self.summary, self.epoch = summary, epoch
        engine.fire_event(DiagnosticEvents.ATTENTION_DIVERSITY)
        logger.info(
            "epoch %d head diversity: %s",
            epoch,
            ", ".join(f"{k} {v['distance_entropy_bits']['mean']:.3f} bits" for k, v in summary.items()),
        )

    def close(self, engine: Engine | None = None) -> None:
        """Flush and close a writer this handler created."""
        if self._writer is not None and self._owns_writer:
            self._writer.close()
            self._writer = None
            self._owns_writer = False
