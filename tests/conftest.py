"""Shared fixtures: tiny network settings and paths to the real data shipped in the repository."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"

#: Encoder settings small enough for 32^3 inputs on 2 CPU cores.
TINY_ENCODER = {"embed_dim": 12, "depths": (2, 2, 2, 2), "num_heads": (3, 3, 3, 3), "sa_heads": 4}


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)
    yield
