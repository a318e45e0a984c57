# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Checks of bundle settings, called from a config's ``initialize`` before anything is built or written.

Each check raises :class:`~dagman_components.errors.ConfigValueError` naming the config key, the
value it got and what to set instead, so that a wrong setting stops the run at once instead of
after the first epoch (or, for an output folder, at the first checkpoint).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from typing import Any

import numpy as np

from dagman_components.errors import ConfigValueError

__all__ = ["check_positive_int", "check_choice", "check_writable_dir"]


def check_positive_int(value: Any, key: str) -> int:
    """Check that a count setting (``max_epochs``, ``batch_size``, ...) is an integer of at least 1.

    Args:
        value: the setting's value.
        key: the config key, named in the error.

    Returns:
        ``value`` as an int.

    Raises:
        ConfigValueError: ``value`` is not a whole number of at least 1 (``True``/``False`` included).

    Example:
        >>> check_positive_int(30, key="max_epochs")
        30
    """
    whole = isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or int(value) < 1:
        raise ConfigValueError(f"{key} must be a whole number of at least 1, got {value!r}; set --{key} to e.g. 1.")
    return int(value)


def check_choice(value: Any, choices: Iterable[Any], key: str) -> str:
    """Check that a setting is one of the accepted names (e.g. ``masking_strategy``).

    Args:
        value: the setting's value.
        choices: the accepted values (an ``Enum`` class works: its values are used).
        key: the config key, named in the error.

    Returns:
        ``value`` as a string.

    Raises:
        ConfigValueError: ``value`` is not among ``choices``; the message lists them.

    Example:
        >>> check_choice("random", ["random", "block"], key="masking_strategy")
        'random'
    """
    names = [str(getattr(c, "value", c)) for c in choices]
    if str(value) not in names:
        raise ConfigValueError(f"{key} {value!r} is unknown; set --{key} to one of: {', '.join(names)}.")
    return str(value)


def check_writable_dir(path: str | os.PathLike, key: str = "bundle_root") -> str:
    """Check that outputs can be written to ``path``, by writing and removing a file there.

    When ``path`` does not exist yet, its nearest existing parent is tried (the run will create the
    rest), so the check creates nothing. A real write is tried because ``os.access`` does not see
    read-only mounts; nothing is left behind and no existing file is touched.

    Args:
        path: the output folder (e.g. ``models/`` under ``bundle_root``).
        key: the config key that decides the folder, named in the error.

    Returns:
        ``path`` as a string.

    Raises:
        ConfigValueError: the folder (or its nearest existing parent) cannot be written to.
    """
    path = os.fspath(path)
    existing = os.path.abspath(path)
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".write_check."):
            pass
    except OSError as err:
        raise ConfigValueError(
            f"cannot write outputs to '{path}' ('{existing}': {err.strerror or err}); make it writable or set "
            f"--{key} to a writable folder."
        ) from err
    return path
