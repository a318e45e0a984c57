"""Helpers of the zoo-style unit tests (after ci/unit_tests/utils.py of Project-MONAI/model-zoo)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.bundle import ConfigWorkflow

REPO = Path(__file__).resolve().parents[2]


def check_workflow(workflow: ConfigWorkflow, check_properties: bool = False) -> None:
    """As the zoo's: initialize, optionally check the properties, run, finalize."""
    workflow.initialize()
    if check_properties is True:
        check_result = workflow.check_properties()
        if check_result is not None and len(check_result) > 0:
            raise ValueError(f"check properties for workflow failed: {check_result}")
    workflow.run()
    workflow.finalize()


def copy_bundle(name: str, root: str | os.PathLike) -> Path:
    """The bundle's shipped files in ``root/<name>`` (no weights, no outputs), as the zoo's ``models/<name>``."""
    dst = Path(root) / name
    shutil.copytree(REPO / "bundles" / name, dst, ignore=shutil.ignore_patterns("models", "eval", "runs", "__pycache__"))
    (dst / "models").mkdir()
    return dst


def write_ct(folder: str | os.PathLike, count: int, shape: tuple[int, int, int], spacing: float, seed: int = 0) -> list[str]:
    """``count`` random CT-like volumes (HU) as ``image_<i>.nii.gz``."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        volume = rng.uniform(-1000, 400, size=shape).astype(np.float32)
        path = os.path.join(folder, f"image_{i}.nii.gz")
        nib.save(nib.Nifti1Image(volume, np.diag([spacing, spacing, spacing, 1.0])), path)
        paths.append(path)
    return paths
