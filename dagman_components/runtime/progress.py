# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""One progress bar for every long loop of the components and scripts (tqdm: count, rate and ETA).

Bundle engines use Ignite's ``ProgressBar`` (per iteration or case) and MONAI's
``SlidingWindowInferer(progress=True)`` (per window batch) instead. Bars go to stderr and can be
switched off with ``enabled=False`` or the environment variable ``DAGMAN_PROGRESS=0`` (logs of batch jobs).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

__all__ = ["progress", "progress_enabled"]

T = TypeVar("T")

#: The bar's layout: what, done/total, time elapsed, the ETA (time remaining), rate, and postfix.
BAR_FORMAT = (
    "{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} [{elapsed} elapsed, ETA {remaining}, {rate_fmt}{postfix}]"
)


def progress_enabled(enabled: bool = True) -> bool:
    """Whether bars are shown: ``enabled`` and not switched off by ``DAGMAN_PROGRESS=0``."""
    return bool(enabled) and os.environ.get("DAGMAN_PROGRESS", "1").strip().lower() not in ("0", "false", "no")


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
             enabled: bool = True, **kwargs: Any) -> Iterator[T]:
    """Iterate over ``iterable`` with a tqdm bar that shows the count and the ETA.

    Args:
        iterable: what to loop over.
        desc: what is being done (the bar's label).
        total: number of items when ``iterable`` has no ``len``.
        unit: the name of one item (``case``, ``file``, ``run``).
        enabled: show the bar (see :func:`progress_enabled`).
        kwargs: further ``tqdm`` arguments.

    Returns:
        An iterator over the items of ``iterable``.

    Example:
        >>> sum(progress(range(3), "adding", enabled=False))
        3
    """
    return iter(tqdm(iterable, desc=desc, total=total, unit=unit, disable=not progress_enabled(enabled),
                     bar_format=BAR_FORMAT, dynamic_ncols=True, **kwargs))
