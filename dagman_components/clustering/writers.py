# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Atomic writers for the clustering outputs: bytes, JSON, CSV and PNG.

Each writer renders the whole file in memory, writes it to a temporary file in the target folder,
flushes it to disk and renames it over the target, so a failed or killed run leaves either the
previous output or the new one, never a truncated file.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dagman_components.atomic import atomic_write_bytes

__all__ = ["atomic_write_bytes", "write_json", "write_csv", "to_jsonable"]


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars / arrays and tuples to plain JSON types; NaN and inf become ``None``."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON, atomically (see :func:`to_jsonable` for conversions)."""
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(text.encode("utf-8"), path)


def write_csv(columns: Mapping[str, Sequence[Any]], path: str | os.PathLike) -> None:
    """Write equal-length columns as a CSV with a header row, atomically.

    Raises:
        ValueError: when the columns differ in length.
    """
    import pandas as pd

    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"CSV columns differ in length: {lengths}.")
    buf = io.StringIO()
    pd.DataFrame({k: list(v) for k, v in columns.items()}).to_csv(buf, index=False, float_format="%.6g")
    atomic_write_bytes(buf.getvalue().encode("utf-8"), path)
