# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Checks of bundle settings, called from a config's ``initialize`` before anything is built or written.

Each check raises :class:`~dagman_components.errors.ConfigValueError` naming the config key, the
value it got and what to set instead, so that a wrong setting stops the run at once instead of
after the first epoch (or, for an output folder, at the first checkpoint).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterable
from typing import Any

import numpy as np

from dagman_components.errors import ConfigValueError

__all__ = [
    "BOOLEAN_SETTINGS",
    "as_bool",
    "check_positive_int",
    "check_choice",
    "check_writable_dir",
    "normalize_boolean_settings",
]

#: Every top-level on/off setting of every bundle config (tests/test_booleans.py checks that each ``true``/``false``
#: key of every bundle YAML is listed here). ``normalize_boolean_settings`` turns their values into ``bool``.
BOOLEAN_SETTINGS = frozenset(
    {
        "amp",
        "augment",
        "clean_teacher_attention",
        "compile",
        "fill_holes",
        "fused_optimizer",
        "head_batch_norm",
        "keep_largest_component",
        "probe_attention",
        "resume",
        "save_attention",
        "teacher_amp",
        "training_plan#run_on_images",
        "use_checkpoint",
        "use_flash_attention",
    }
)
_TRUE = frozenset({"true", "yes", "1", "on"})
_FALSE = frozenset({"false", "no", "0", "off"})


def as_bool(value: Any, key: str) -> bool:
    """Read an on/off setting the way a user writes it on the command line or in YAML.

    ``python -m monai.bundle run --resume false`` hands the string ``'false'`` to the config (Python Fire reads
    only ``False`` as a boolean), and a non-empty string is true in Python; this turns every usual spelling into
    a ``bool``.

    Args:
        value: the setting's value: a ``bool``, ``0``/``1``, or a string ``true``/``false``, ``yes``/``no``,
            ``on``/``off``, ``1``/``0`` in any case.
        key: the config key, named in the error.

    Returns:
        ``value`` as a ``bool``.

    Raises:
        ConfigValueError: any other value (e.g. ``'maybe'``, ``2``, ``None``).

    Example:
        >>> as_bool("False", key="resume"), as_bool("yes", key="augment"), as_bool(0, key="amp")
        (False, True, False)
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigValueError(f"{key} must be true or false (also yes/no, 1/0), got {value!r}; set --{key} true or --{key} false.")


def _running_resolver() -> Any:
    """The ``monai.bundle.ReferenceResolver`` evaluating the calling config expression, or ``None``."""
    from monai.bundle.reference_resolver import ReferenceResolver

    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, ReferenceResolver):
            return owner
        frame = frame.f_back
    return None


def normalize_boolean_settings() -> list[str]:
    """Turn every on/off setting of the running bundle config into a ``bool`` before anything reads it.

    Called as the first ``initialize`` expression of every bundle config (``monai.bundle run`` resolves items
    lazily, so nothing has read a setting yet). ``monai.bundle`` offers no hook between the command-line
    overrides and resolution, so this finds the resolver that evaluates the expression on the call stack and
    rewrites the raw value of each key of :data:`BOOLEAN_SETTINGS` it holds (values that are expressions or
    references, ``$...``/``@...``, are left alone). Outside a bundle run it does nothing.

    Returns:
        the keys that were rewritten (values that were not already ``bool``).

    Raises:
        ConfigValueError: a setting is not a boolean spelling (see :func:`as_bool`); the message names the key.
    """
    resolver = _running_resolver()
    if resolver is None:
        return []
    changed = []
    for key in sorted(BOOLEAN_SETTINGS):
        item = resolver.items.get(key)
        if item is None or key in resolver.resolved_content:
            continue
        value = item.get_config()
        if isinstance(value, str) and value[:1] in ("$", "@", "%"):
            continue
        flag = as_bool(value, key)
        if flag is not value:
            item.update_config(flag)
            changed.append(key)
    return changed


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
