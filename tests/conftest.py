"""Shared fixtures: tiny network settings and paths to the real data shipped in the repository."""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"

#: Encoder settings small enough for 32^3 inputs on 2 CPU cores.
TINY_ENCODER = {"embed_dim": 12, "depths": (2, 2, 2, 2), "num_heads": (3, 3, 3, 3), "sa_heads": 4}


@contextmanager
def imported_script(name: str) -> Iterator[ModuleType]:
    """Import ``scripts/<name>.py`` as a module for the duration of the block."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture(autouse=True)
def _restore_error_reporting():
    """A bundle run in process installs dagman_components.errors' excepthook and log-record factory; undo it."""
    hook, factory = sys.excepthook, logging.getLogRecordFactory()
    yield
    sys.excepthook = hook
    logging.setLogRecordFactory(factory)
