"""The process's rank under DDP, for the handlers that write files or hold locks on rank 0 only."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["rank", "is_main_process", "HandlerGroup"]


def rank() -> int:
    """This process's rank: from the process group, or before it exists from torchrun's ``RANK`` (0 alone)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Whether this process is rank 0 (always, without DDP)."""
    return rank() == 0


class HandlerGroup:
    """Several engine handlers attached as one list entry, in order; optionally on rank 0 only.

    MONAI's ``ConfigWorkflow.check_properties()`` reads ``train#handlers`` as a list of components
    (each a dict with ``_target_``). A bundle that keeps its handlers in separate lists (every
    process, rank 0 only) lists one group per list there instead of concatenating them in an
    expression.

    Args:
        handlers: objects with ``attach(engine)``, attached in this order.
        main_process_only: attach them on rank 0 only (:func:`is_main_process`, checked at ``attach``).

    Example:
        >>> group = HandlerGroup([], main_process_only=True)
        >>> group.attach(None)  # nothing to attach
    """

    def __init__(self, handlers: Sequence[Any], main_process_only: bool = False) -> None:
        self.handlers = list(handlers)
        self.main_process_only = bool(main_process_only)

    def attach(self, engine: Any) -> None:
        """Attach every handler to ``engine`` (none on ranks other than 0 when ``main_process_only``)."""
        if self.main_process_only and not is_main_process():
            return
        for handler in self.handlers:
            handler.attach(engine)
