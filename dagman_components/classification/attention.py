# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""The [CLS]-to-patch attention on the input's voxel grid, and its NIfTI writer, under their classification names.

Both live in the core now (the core imports no task package): :func:`attention_to_voxels` in
:mod:`dagman_components.networks.attention_map` and :func:`save_nifti_atomic` in
:mod:`dagman_components.atomic`. This module keeps the names importable from here.
"""

from __future__ import annotations

from dagman_components.atomic import save_nifti_atomic
from dagman_components.networks.attention_map import attention_to_voxels

__all__ = ["attention_to_voxels", "save_nifti_atomic"]
