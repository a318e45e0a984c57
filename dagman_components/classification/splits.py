# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""The patient-grouped splits and few-shot subsets, under its classification name:
the code is in :mod:`dagman_components.data.splits`.

It lives in the core because the pretraining probe uses it too (the core imports no task package).
"""

from __future__ import annotations

from dagman_components.data.splits import (
    SplitError,
    grouped_stratified_folds,
    few_shot_subset,
    cv_split,
    check_two_classes,
    balanced_class_weights,
    FEW_SHOT_FRACTIONS,
)

__all__ = [
    "SplitError", "grouped_stratified_folds", "few_shot_subset", "cv_split", "check_two_classes",
    "balanced_class_weights", "FEW_SHOT_FRACTIONS"
]
