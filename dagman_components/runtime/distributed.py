"""The process's rank under DDP, for the handlers that write files or hold locks on rank 0 only."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["rank", "world_size", "is_main_process", "HandlerGroup"]


def rank() -> int:
    """This process's rank: from the process group, or before it exists from torchrun's ``RANK`` (0 alone)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes in the job: the process group's size, or before it exists torchrun's ``WORLD_SIZE`` (1 alone)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process is rank 0 (always, without DDP)."""
    return rank() == 0


class HandlerGroup:
    """Several engine handlers attached as one list entry, in order; optionally on rank 0 only: the one
    rank-0 policy of the bundles (the config says which handlers run where; a handler that writes files
    may still check :func:`is_main_process` itself as a safeguard).

    MONAI's ``ConfigWorkflow.check_properties()`` reads ``train#handlers`` as a list of components
    (each a dict with ``_target_``). A bundle that keeps its handlers in separate lists (every
    process, rank 0 only) lists one group per list there instead of concatenating them in an
    expression.

    Args:
        handlers: objects with ``attach(engine)``, attached in this order.
        main_process_only: attach them on rank 0 only (:func:`is_main_process`, checked at ``attach``).
        main_process_types: handler types attached on rank 0 only while the others attach everywhere
            (for a handler list a config cannot split, e.g. one MONAI Label rewrites).

    Example:
        >>> group = HandlerGroup([], main_process_only=True)
        >>> group.attach(None)  # nothing to attach
    """

    def __init__(self, handlers: Sequence[Any] | None, main_process_only: bool = False,
                 main_process_types: Sequence[type] = ()) -> None:
        self.handlers = list(handlers or [])
        self.main_process_only = bool(main_process_only)
        self.main_process_types = tuple(main_process_types)

    def for_this_process(self) -> list[Any]:
        """The handlers this process attaches: all on rank 0; on the others none (``main_process_only``)
        or those that are not of ``main_process_types``."""
        if is_main_process():
            return list(self.handlers)
        if self.main_process_only:
            return []
        return [h for h in self.handlers if not isinstance(h, self.main_process_types)]

    def attach(self, engine: Any) -> None:
        """Attach :meth:`for_this_process`'s handlers to ``engine``, in order."""
        for handler in self.for_this_process():
            handler.attach(engine)
