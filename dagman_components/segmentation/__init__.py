# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Segmentation with a DAGMaN-pretrained encoder: SwinUNETR initialisation, image/label datalists and
checks, post-processing and the handlers of the ``dagman_lung_tumor_ct_segmentation`` bundle."""

from __future__ import annotations

from .datalist import (
    FOLDER_PAIRS,
    build_segmentation_datalist,
    find_image_label_folders,
    pair_folders,
    segmentation_split,
    split_by_group,
    volume_stem,
    write_datalist,
)
from .encoder_init import (
    PRETRAINING_ONLY_PREFIXES,
    SWIN_UNETR_ENCODER_PREFIX,
    check_card_matches,
    init_swin_unetr,
    load_swin_unetr_encoder,
    swin_unetr_encoder_settings,
)
from .handlers import (
    FinalValidationHandler,
    MetricDetailsPlotter,
    SegmentationProgressBar,
    logging_handler_types,
)
from .inferers import CPUAutocastInferer
from .pairs import read_geometry, validate_image_label_pairs
from .transforms import HideKeyPrefixedItemsd, RestoreHiddenItemsd, SegmentationPostprocessd, keep_largest_component

__all__ = [
    "CPUAutocastInferer",
    "FOLDER_PAIRS",
    "PRETRAINING_ONLY_PREFIXES",
    "SWIN_UNETR_ENCODER_PREFIX",
    "FinalValidationHandler",
    "HideKeyPrefixedItemsd",
    "MetricDetailsPlotter",
    "SegmentationPostprocessd",
    "SegmentationProgressBar",
    "build_segmentation_datalist",
    "check_card_matches",
    "find_image_label_folders",
    "keep_largest_component",
    "logging_handler_types",
    "init_swin_unetr",
    "load_swin_unetr_encoder",
    "pair_folders",
    "read_geometry",
    "RestoreHiddenItemsd",
    "segmentation_split",
    "split_by_group",
    "swin_unetr_encoder_settings",
    "validate_image_label_pairs",
    "volume_stem",
    "write_datalist",
]
