# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""The nodule table (LIDC rows to a datalist), under its classification name:
the code is in :mod:`dagman_components.data.nodule_table`.

It lives in the core because the pretraining probe uses it too (the core imports no task package).
"""

from __future__ import annotations

from dagman_components.data.nodule_table import (
    NoduleTableError,
    LabelRule,
    read_nodule_table,
    inference_datalist,
    LIDC_ID_TEMPLATE,
)

__all__ = [
    "NoduleTableError", "LabelRule", "read_nodule_table", "inference_datalist", "LIDC_ID_TEMPLATE"
]
