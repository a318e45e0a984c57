"""The process's rank under DDP, for the handlers that write files or hold locks on rank 0 only."""

from __future__ import annotations

import os

import torch

__all__ = ["rank", "is_main_process"]


def rank() -> int:
    """This process's rank: from the process group, or before it exists from torchrun's ``RANK`` (0 alone)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Whether this process is rank 0 (always, without DDP)."""
    return rank() == 0
