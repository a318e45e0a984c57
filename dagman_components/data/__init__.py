# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""CT data: datalists from folders or JSON, volume checks, and the one CT preprocessing."""

from __future__ import annotations

from .datalist import DICOM_EXTENSION, VOLUME_EXTENSIONS, DataSourceError, build_datalist, validate_volumes
from .fit import available_cpus, check_batch_fits, check_roi_fits, fit_num_workers, volume_extent_mm
from .resumable import IterationSeeder, ResumableSampler, SamplerPosition, SeededItems, derive_seed
from .views import PretrainingViewsd, ViewMode
from .transforms import (
    DEFAULT_SPACING,
    HU_WINDOW,
    HU_WINDOWS,
    resolve_hu_window,
    WarnIfNotHounsfieldd,
    check_roi_size,
    ct_load_and_normalise,
    pretraining_transforms,
)

__all__ = [
    "DICOM_EXTENSION",
    "DEFAULT_SPACING",
    "HU_WINDOW",
    "HU_WINDOWS",
    "resolve_hu_window",
    "VOLUME_EXTENSIONS",
    "DataSourceError",
    "IterationSeeder",
    "ResumableSampler",
    "SamplerPosition",
    "SeededItems",
    "WarnIfNotHounsfieldd",
    "available_cpus",
    "build_datalist",
    "check_batch_fits",
    "check_roi_fits",
    "check_roi_size",
    "ct_load_and_normalise",
    "fit_num_workers",
    "derive_seed",
    "pretraining_transforms",
    "PretrainingViewsd",
    "ViewMode",
    "validate_volumes",
    "volume_extent_mm",
]
