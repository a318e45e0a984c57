# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Lung-nodule malignancy classification from DAGMaN weights: linear probing and fine-tuning.

Network (:class:`NoduleClassifier`), nodule table (:func:`read_nodule_table`), patient-grouped
splits (:func:`cv_split`), nodule preprocessing at 1 mm / 32^3 (:data:`NODULE_SPACING`,
:data:`NODULE_ROI`, :func:`nodule_preprocessing`, :class:`CropWorldPointd` for full CT volumes),
metrics with bootstrap intervals (:func:`binary_report`), attention maps and bundle handlers.
"""

from __future__ import annotations

from dagman_components.classification.attention import attention_to_voxels, save_nifti_atomic
from dagman_components.classification.handlers import (
    AttentionOverlayWriter,
    ClassificationReportWriter,
    ScoreCollector,
    ValidationThreshold,
    load_threshold,
)
from dagman_components.classification.metrics import (
    binary_report,
    bootstrap_ci,
    mean_and_std,
    roc_auc,
    roc_curve,
    sensitivity_specificity,
    summarise_folds,
    youden_threshold,
)
from dagman_components.classification.network import (
    ClassifierMode,
    HeadToken,
    NoduleClassifier,
    classifier_param_groups,
)
from dagman_components.classification.plots import plot_attention_montage, plot_roc_curves
from dagman_components.classification.splits import (
    FEW_SHOT_FRACTIONS,
    SplitError,
    balanced_class_weights,
    check_two_classes,
    cv_split,
    few_shot_subset,
    grouped_stratified_folds,
)
from dagman_components.classification.table import (
    LIDC_ID_TEMPLATE,
    LabelRule,
    NoduleTableError,
    inference_datalist,
    read_nodule_table,
)
from dagman_components.classification.transforms import (
    NODULE_ROI,
    NODULE_SPACING,
    CoordinateSystem,
    CropWorldPointd,
    nodule_augmentation,
    nodule_preprocessing,
    world_to_voxel,
)
from dagman_components.classification.training import MODES, ProbeHeadInit, TrainingPlan, classifier_trainer
