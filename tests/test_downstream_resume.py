"""Resume of the downstream training bundles: a classification or segmentation run SIGKILLed in its
second epoch and rerun with the same command ends with the model, threshold and curves of an
uninterrupted run (no epoch counted twice, no best model lost)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from dagman_components.segmentation import build_segmentation_datalist, write_datalist

SAMPLE = REPO / "data" / "lidc_nodules_sample"
TINY_ARGS = ["--embed_dim", "12", "--depths", "[2,2,2,2]", "--num_heads", "[3,3,3,3]"]
# the test's SIGKILL (tests/killhook.py): once, at the first iteration of epoch 2 (after the epoch-1 checkpoint)
KILL = """
kill_hook:
  _target_: killhook.KillOnce
  marker: "$os.path.join(@bundle_root, 'killed')"
  epoch: 2
train#trainer#train_handlers: "$@train#handlers + [@kill_hook]"
"""
pytestmark = pytest.mark.slow


def bundle_copy(root: Path, name: str, kill: bool) -> Path:
    bundle = root / name
    shutil.copytree(REPO / "bundles" / name / "configs", bundle / "configs")
    (bundle / "configs" / "kill.yaml").write_text(KILL if kill else "{}\n")
    return bundle


def train(bundle: Path, configs: list[str], *args: str) -> subprocess.CompletedProcess:
    files = repr([str(bundle / "configs" / c) for c in [*configs, "kill.yaml"]])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--bundle_root", str(bundle),
           "--num_workers", "0", *TINY_ARGS, *args]
    path = os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                                   "PYTHONPATH": path})


def killed_then_rerun(bundle: Path, configs: list[str], *args: str) -> str:
    killed = train(bundle, configs, *args)
    assert killed.returncode == -9, killed.stderr[-3000:]
    ck = torch.load(bundle / "models" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ck["trainer"]["iteration"] == ck["trainer"]["epoch_length"]  # the checkpoint of epoch 1
    rerun = train(bundle, configs, *args)  # the same command
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    return rerun.stdout + rerun.stderr


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=0, atol=1e-6), key


def test_classification_resumes_with_the_same_model_threshold_and_curves(tmp_path):
    name = "dagman_lung_nodule_ct_classification"
    args = ["--dataset_dir", str(SAMPLE), "--sa_heads", "4", "--batch_size", "4", "--pretrained_path", "null",
            "--max_epochs", "3"]
    reference = bundle_copy(tmp_path / "reference", name, kill=False)
    assert train(reference, ["train.yaml"], *args).returncode == 0
    bundle = bundle_copy(tmp_path / "killed", name, kill=True)
    log = killed_then_rerun(bundle, ["train.yaml"], *args)
    assert "resumed from" in log and "at epoch 1" in log
    load = lambda b: torch.load(b / "models" / "model.pt", map_location="cpu", weights_only=True)  # noqa: E731
    assert_same_weights(load(bundle), load(reference))
    threshold = json.loads((bundle / "models" / "threshold.json").read_text())
    expected = json.loads((reference / "models" / "threshold.json").read_text())
    assert threshold.pop("model_sha256") and expected.pop("model_sha256")
    assert threshold == pytest.approx(expected, abs=1e-6)
    curves = (bundle / "eval" / "training_curves.csv").read_text()
    assert [row.split(",")[0] for row in curves.splitlines()[1:]] == ["1", "2", "3"]  # each epoch once
    assert curves == (reference / "eval" / "training_curves.csv").read_text()


def test_segmentation_resumes_with_the_same_best_model_and_curves(tmp_path):
    name = "dagman_lung_tumor_ct_segmentation"
    items = build_segmentation_datalist(SAMPLE)
    write_datalist(tmp_path / "data.json", {"training": items[:3], "validation": items[3:4]})
    args = ["--dataset_dir", str(tmp_path / "data.json"), "--pretrained_encoder", "null", "--max_epochs", "3",
            "--val_interval", "1", "--batch_size", "1", "--num_samples", "1", "--cache_rate", "0"]
    reference = bundle_copy(tmp_path / "reference", name, kill=False)
    result = train(reference, ["train.yaml", "demo.yaml"], *args)
    assert result.returncode == 0, result.stderr[-3000:]
    bundle = bundle_copy(tmp_path / "killed", name, kill=True)
    log = killed_then_rerun(bundle, ["train.yaml", "demo.yaml"], *args)
    assert "resumed from" in log and "at epoch 1" in log
    load = lambda b: torch.load(b / "models" / "model.pt", map_location="cpu", weights_only=True)  # noqa: E731
    assert_same_weights(load(bundle), load(reference))
    curves = (bundle / "runs" / "training_curves.csv").read_text()
    assert [row.split(",")[0] for row in curves.splitlines()[1:]] == ["1", "2", "3"]
    assert curves == (reference / "runs" / "training_curves.csv").read_text()
