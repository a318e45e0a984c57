# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""ONNX export through ``monai.bundle onnx_export`` (scripts/export_onnx.py) of tiny networks of each bundle:
onnxruntime gives eager PyTorch's outputs; bad requests stop in one line."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA, REPO

from dagman_components.bundle_tools import deploy
from dagman_components.errors import ConfigValueError

BUNDLES = REPO / "bundles"
SCRIPT = REPO / "scripts" / "export_onnx.py"
TINY = {"class": "SwinDAGMaN", "in_channels": 1, "embed_dim": 12, "depths": [2, 2, 2, 2], "num_heads": [3, 3, 3, 3],
        "sa_heads": 4, "window_size": 4, "patch_size": 2}
CT = DATA / "lidc_nodules_sample" / "image" / "LIDC-IDRI-0001_R_1.nii.gz"


@pytest.mark.parametrize("shape, fragment", [
    ([1, 1, 32, 32, 30], "every spatial side must be a multiple of 32 (the Swin grid: patch size x 2^4 merges), got [30]; "
                         "use e.g. [1, 1, 32, 32, 32]"),
    ([2, 1, 32, 32, 32], "the export is traced at batch 1"),
    ([1, 32, 32, 32], "must be five positive whole numbers"),
    ("x", "must be five positive whole numbers"),
])
def test_bad_export_shape_is_refused_in_one_line(shape, fragment):
    with pytest.raises(ConfigValueError) as info:
        deploy.check_export_shape(shape, divisor=32)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_missing_extra_is_named_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(deploy.DeployExtraMissingError) as info:
        deploy.require_deploy_extra()
    assert str(info.value) == ("ONNX export and onnxruntime need onnxscript, not installed; install the deploy extra: "
                               "pip install -e .[deploy] (or pip install onnxscript).")


def _tiny_bundle(tmp_path: Path, name: str) -> Path:
    """A copy of a bundle whose models/ holds a random tiny network (weights and card) of its inference config."""
    bundle = tmp_path / name
    shutil.copytree(BUNDLES / name / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    (bundle / "models" / "model_card.json").write_text(json.dumps({"network": TINY}))
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle)})
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")
    return bundle


def _export(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(SCRIPT), str(bundle), "--repeats", "1", *args], capture_output=True,
                          text=True, env=env, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("name, shape, out_shape", [
    ("dagman_lung_nodule_ct_classification", None, [1, 2]),
    ("dagman_ct_pretraining", None, [1, 96]),  # the [CLS] token: embed 12 x 2^3
])
def test_onnxruntime_gives_the_eager_outputs(tmp_path, name, shape, out_shape):
    pytest.importorskip("onnxruntime", reason="the deploy extra: pip install -e .[deploy]")
    bundle = _tiny_bundle(tmp_path, name)
    result = _export(bundle)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["input_shape"] == [1, 1, 32, 32, 32] and report["max_abs_difference"] < 1e-4
    onnx_net, eager = deploy.OnnxNetwork(bundle / "models" / "model.onnx"), deploy.bundle_network(bundle)
    x = torch.rand(3, 1, 32, 32, 32, generator=torch.Generator().manual_seed(7))  # a batch: item by item
    with torch.no_grad():
        expected = eager(x)
    got = onnx_net(x)
    assert list(got.shape) == [3, *out_shape[1:]]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"the ONNX graph takes \[1, 32, 32, 32\]"):
        onnx_net(torch.rand(1, 1, 64, 32, 32))


@pytest.mark.slow
def test_segmentation_sliding_window_masks_agree_on_a_shipped_ct(tmp_path):
    pytest.importorskip("onnxruntime", reason="the deploy extra: pip install -e .[deploy]")
    bundle = _tiny_bundle(tmp_path, "dagman_lung_tumor_ct_segmentation")
    result = _export(bundle, "--image", str(CT))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["input_shape"] == [1, 1, 64, 64, 32] and report["max_abs_difference"] < 1e-4
    case = report["case"]
    assert case["mask_voxels"] > 0 and case["differing_outside_0_5_band"] == 0, case
    assert case["max_abs_difference"] < 1e-3


@pytest.mark.slow
def test_export_refuses_a_shape_and_keeps_an_earlier_file(tmp_path):
    bundle = _tiny_bundle(tmp_path, "dagman_lung_nodule_ct_classification")
    (bundle / "models" / "model.onnx").write_bytes(b"earlier export")
    result = _export(bundle, "--input_shape", "[1,1,32,48,32]")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().endswith("got [48]; use e.g. [1, 1, 32, 64, 32].")
    assert len(result.stderr.strip().splitlines()) == 1
    assert (bundle / "models" / "model.onnx").read_bytes() == b"earlier export"
