# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""matplotlib for figures written to files: every figure of the project is drawn through :func:`pyplot`."""

from __future__ import annotations

from typing import Any

__all__ = ["pyplot"]


def pyplot() -> Any:
    """matplotlib's ``pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
