# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Patient-grouped, stratified cross-validation splits, few-shot subsets and class weights.

No patient is ever in two of train / validation / test: one patient's nodules are correlated, and
splitting them would inflate every figure. Folds come from scikit-learn's ``StratifiedGroupKFold``
(groups = patients, strata = labels), shuffled with a fixed seed, so a split is reproducible.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold

from dagman_components.data.nodule_table import NoduleTableError

__all__ = [
    "SplitError",
    "grouped_stratified_folds",
    "few_shot_subset",
    "cv_split",
    "check_two_classes",
    "balanced_class_weights",
    "FEW_SHOT_FRACTIONS",
]

logger = logging.getLogger(__name__)

#: The paper's few-shot settings: share of the training cases used.
FEW_SHOT_FRACTIONS: tuple[float, ...] = (0.25, 0.5, 1.0)


class SplitError(NoduleTableError):
    """A split cannot be made or is unusable (e.g. a single class); the message names it."""


def _labels_groups(items: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    missing = [str(it.get("id", i)) for i, it in enumerate(items) if "label" not in it or "patient" not in it]
    if missing:
        raise SplitError(f"items without 'label' or 'patient' cannot be split: {missing[:10]}.")
    return np.array([int(it["label"]) for it in items]), np.array([str(it["patient"]) for it in items])


def check_two_classes(items: Sequence[Mapping[str, Any]], split: str) -> None:
    """Raise :class:`SplitError` naming ``split`` and its counts when it lacks either class."""
    labels = [int(it["label"]) for it in items]
    n_pos = sum(labels)
    if not labels or n_pos in (0, len(labels)):
        raise SplitError(
            f"the {split} split has {len(labels)} nodule(s), {n_pos} malignant and {len(labels) - n_pos} benign: "
            "it needs both classes (AUC, the threshold and the loss weights are undefined otherwise). Use fewer folds, "
            "a larger val_fraction or few_shot_fraction, or more data."
        )


def grouped_stratified_folds(
    labels: Sequence[int], groups: Sequence[Any], n_folds: int = 3, seed: int = 0, key: str = "n_folds"
) -> list[np.ndarray]:
    """Split case indices into ``n_folds`` patient-disjoint folds with similar class balance.

    Args:
        labels: one label per case.
        groups: one patient id per case.
        n_folds: number of folds (>= 2).
        seed: shuffling seed.
        key: the setting that chose ``n_folds``, named in the error message.

    Returns:
        The sorted case indices of each fold; together they are a partition of ``range(len(labels))``.

    Raises:
        SplitError: for ``n_folds < 2`` or fewer patients than folds.

    Example:
        >>> folds = grouped_stratified_folds([0, 1, 0, 1, 0, 1], ["a", "a", "b", "c", "d", "e"], n_folds=2)
        >>> sorted(np.concatenate(folds).tolist())
        [0, 1, 2, 3, 4, 5]
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    if n_folds < 2:
        raise SplitError(f"n_folds must be at least 2, got {n_folds}.")
    n_groups = len(np.unique(groups))
    if n_groups < n_folds:
        raise SplitError(
            f"{n_groups} patient(s) cannot be split into {n_folds} patient-disjoint folds ({key}); "
            + ("raise val_fraction or add data." if key == "val_fraction" else
               f"lower {key} to at most {max(n_groups, 2)} or add data.")
        )
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [np.sort(test) for _, test in splitter.split(np.zeros(len(labels)), labels, groups)]


def few_shot_subset(items: Sequence[Mapping[str, Any]], fraction: float, seed: int = 0) -> list[Mapping[str, Any]]:
    """The training cases of a random share of the patients, stratified by class and nested.

    Patients are labelled malignant when any of their nodules is; within each class the patients are
    shuffled with ``seed`` and taken in that order until ``fraction`` of the class's nodules are in.
    Hence the 25 % subset lies inside the 50 % subset for the same seed, and every subset keeps
    both classes and whole patients.

    Args:
        items: training items with ``label`` and ``patient``.
        fraction: share in (0, 1]; 1 returns ``items`` unchanged.
        seed: shuffling seed.

    Returns:
        The chosen items, in their original order.

    Raises:
        SplitError: for a fraction outside (0, 1].
    """
    if not 0.0 < float(fraction) <= 1.0:
        raise SplitError(f"few_shot_fraction must be in (0, 1], got {fraction}.")
    if float(fraction) == 1.0:
        return list(items)
    labels, groups = _labels_groups(items)
    patients: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        patients[g].append(i)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for cls in (0, 1):
        members = sorted(p for p, idx in patients.items() if int(max(labels[idx])) == cls)
        target = math.ceil(fraction * sum(len(patients[p]) for p in members))
        taken = 0
        for j in rng.permutation(len(members)):
            if taken >= target:
                break
            chosen += patients[members[j]]
            taken += len(patients[members[j]])
    return [items[i] for i in sorted(chosen)]


def cv_split(
    items: Sequence[Mapping[str, Any]],
    n_folds: int = 3,
    fold: int = 0,
    val_fraction: float = 0.2,
    few_shot_fraction: float = 1.0,
    seed: int = 0,
    test_items: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, list[Mapping[str, Any]]]:
    """Train / validation / test items of one cross-validation fold.

    Without ``test_items``: fold ``fold`` of :func:`grouped_stratified_folds` is the test set, and a
    patient-grouped stratified ``val_fraction`` of the remaining folds is the validation set (model
    selection and the decision threshold); the rest is the training set. With ``test_items`` (a
    held-out test table): fold ``fold`` is the validation set, the other folds train, and
    ``test_items`` are the test set. Then ``few_shot_fraction`` of the training set is kept
    (:func:`few_shot_subset`); validation and test stay the same for every fraction.

    Args:
        items: labelled items of the development table.
        n_folds: number of folds.
        fold: which fold (0-based).
        val_fraction: share of the training folds used for validation when there is no test table.
        few_shot_fraction: share of the training cases kept.
        seed: seed of the folds, the validation split and the few-shot subset.
        test_items: optional labelled items of a held-out test table (no patient may also be in ``items``).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``.

    Raises:
        SplitError: an invalid ``fold`` / ``val_fraction``, patients shared with the test table, or a
            split without both classes (named with its counts).
    """
    if not 0 <= int(fold) < int(n_folds):
        raise SplitError(f"fold must be in 0..{n_folds - 1} for n_folds={n_folds}, got {fold}.")
    if not 0.0 < float(val_fraction) <= 0.5:
        raise SplitError(f"val_fraction must be in (0, 0.5], got {val_fraction}.")
    items = list(items)
    labels, groups = _labels_groups(items)
    folds = grouped_stratified_folds(labels, groups, n_folds, seed)
    held_out = set(folds[fold].tolist())
    rest = [i for i in range(len(items)) if i not in held_out]
    if test_items is not None:
        test_items = list(test_items)
        shared = sorted({str(it["patient"]) for it in test_items} & set(groups.tolist()))
        if shared:
            raise SplitError(
                f"{len(shared)} patient(s) are both in the test table and in the development table, e.g. {shared[:5]}; "
                "remove them from one of the two."
            )
        train_idx, val_idx, test = rest, sorted(held_out), test_items
    else:
        n_val_folds = max(2, round(1.0 / float(val_fraction)))
        inner = grouped_stratified_folds(labels[rest], groups[rest], n_val_folds, seed + 1, key="val_fraction")[0]
        inner_set = {rest[i] for i in inner.tolist()}
        train_idx = [i for i in rest if i not in inner_set]
        val_idx = sorted(inner_set)
        test = [items[i] for i in sorted(held_out)]
    train = few_shot_subset([items[i] for i in train_idx], few_shot_fraction, seed)
    out = {"train": train, "val": [items[i] for i in val_idx], "test": test}
    for name, split in out.items():
        check_two_classes(split, f"{name} (fold {fold} of {n_folds}, few_shot_fraction {few_shot_fraction})")
    logger.info(
        "fold %d/%d, few-shot %.2f: %s", fold, n_folds, few_shot_fraction,
        ", ".join(f"{k} {len(v)} ({sum(int(it['label']) for it in v)} malignant)" for k, v in out.items()),
    )
    return out


def balanced_class_weights(items: Sequence[Mapping[str, Any]], num_classes: int = 2) -> torch.Tensor:
    """Cross-entropy class weights ``n / (num_classes * n_c)`` (scikit-learn's "balanced"), so that each
    class contributes equally to the loss however imbalanced the training split is.

    Raises:
        SplitError: when a class has no case.
    """
    counts = np.bincount([int(it["label"]) for it in items], minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        raise SplitError(f"class counts {counts.astype(int).tolist()}: every class needs at least one training case.")
    return torch.as_tensor(counts.sum() / (num_classes * counts), dtype=torch.float32)
