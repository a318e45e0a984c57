"""Helpers of the zoo-style unit tests (after ci/unit_tests/utils.py of Project-MONAI/model-zoo)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

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


def run_inference(bundle_root: str | os.PathLike, **overrides) -> None:
    """The bundle's ``configs/inference.json`` as the zoo runs it: a ``ConfigWorkflow`` of type ``infer``
    with the bundle's logging and metadata files, its properties checked, then run."""
    configs = os.path.join(bundle_root, "configs")
    workflow = ConfigWorkflow(
        workflow_type="infer",
        config_file=os.path.join(configs, "inference.json"),
        logging_file=os.path.join(configs, "logging.conf"),
        meta_file=os.path.join(configs, "metadata.json"),
        bundle_root=str(bundle_root),
        **overrides,
    )
    check_workflow(workflow, check_properties=True)


def save_network_weights(bundle_root: str | os.PathLike, **overrides) -> None:
    """``models/model.pt`` of the inference config's ``network_def`` built with ``overrides``, as the zoo's CI
    makes weights (a flat state dict)."""
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_root, "configs", "inference.json"))
    parser.update({"bundle_root": str(bundle_root), **overrides})
    torch.save(parser.get_parsed_content("network_def").state_dict(), os.path.join(bundle_root, "models", "model.pt"))


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
