"""Exact resume of the pretraining bundle: a run SIGKILLed at an epoch end or mid-epoch, then rerun
with the same command, ends with the weights and centres of an uninterrupted run (num_workers 0 and 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import test_pretraining_bundle
from conftest import REPO

BUNDLE = REPO / "bundles" / "dagman_ct_pretraining"
TINY = test_pretraining_bundle.TINY + """
dataset_dir: $os.path.join(@bundle_root, 'datalist.json')
device: $torch.device('cpu')
spacing: [4.0, 4.0, 4.0]
batch_size: 1
cache_rate: 0.0
max_epochs: 2
save_interval: 1
"""
# the test's SIGKILL (tests/killhook.py), attached after the checkpoint saver, so the kill follows a checkpoint
KILL = """
kill_at: -1
kill_hook:
  _target_: killhook.KillOnce
  marker: "$os.path.join(@bundle_root, 'killed')"
  iteration: "@kill_at"
train#handlers: "$@train#common_handlers + @train#main_process_handlers + [@kill_hook]"
"""
pytestmark = pytest.mark.slow


def make_bundle(root: Path) -> Path:
    """The bundle's configs, the tiny settings, the kill hook's config and three small synthetic CT volumes."""
    bundle = root / "bundle"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    (bundle / "configs" / "tiny.yaml").write_text(TINY)
    (bundle / "configs" / "kill.yaml").write_text(KILL)
    rng = np.random.default_rng(0)
    images = []
    for i in range(3):
        volume = (rng.normal(0, 300, (36, 40, 44)) - 200).astype(np.int16)
        path = root / f"ct{i}.nii.gz"
        nib.save(nib.Nifti1Image(volume, np.diag([3.0, 3.0, 3.0, 1.0])), path)
        images.append({"image": str(path)})
    (bundle / "datalist.json").write_text(json.dumps({"training": images}))
    return bundle


def train(bundle: Path, num_workers: int, kill_at: int = -1) -> subprocess.CompletedProcess:
    configs = [str(bundle / "configs" / c) for c in ("train.yaml", "tiny.yaml", "kill.yaml")]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(configs), "--bundle_root", str(bundle),
           "--num_workers", str(num_workers), "--kill_at", str(kill_at)]
    path = os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def final_state(bundle: Path) -> dict:
    ck = torch.load(bundle / "models" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ck["trainer"]["iteration"] == 6  # 3 volumes, batch 1, 2 epochs
    return {"student": ck["student"], "teacher": ck["teacher"], "loss": ck["loss"]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    bundle = make_bundle(tmp_path_factory.mktemp("reference"))
    result = train(bundle, num_workers=0)
    assert result.returncode == 0, result.stderr[-3000:]
    return final_state(bundle)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("kill_at", [3, 4], ids=["epoch_end", "mid_epoch"])
def test_killed_run_resumes_exactly(uninterrupted, tmp_path, num_workers, kill_at):
    bundle = make_bundle(tmp_path)
    killed = train(bundle, num_workers, kill_at=kill_at)
    assert killed.returncode == -9, killed.stderr[-3000:]
    ck = torch.load(bundle / "models" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ck["trainer"]["iteration"] == kill_at

    resumed = train(bundle, num_workers, kill_at=kill_at)  # the same command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at epoch {kill_at // 3}, iteration {kill_at}" in resumed.stdout + resumed.stderr
    state = final_state(bundle)
    for part in ("student", "teacher", "loss"):  # loss: the centres
        for key, value in uninterrupted[part].items():
            if value.is_floating_point():
                assert torch.allclose(state[part][key], value, rtol=0, atol=1e-6), f"{part} {key}"


def test_second_run_in_the_same_bundle_root_stops_at_once(tmp_path):
    from dagman_components.handlers import TrainingLock

    bundle = make_bundle(tmp_path)
    lock = TrainingLock(bundle / "models" / ".train.lock")
    lock.acquire()  # this process plays the running training
    try:
        result = train(bundle, num_workers=0)
    finally:
        lock.release()
    assert result.returncode != 0
    assert f"PID {os.getpid()}" in result.stderr and str(bundle / "models" / ".train.lock") in result.stderr
    assert not (bundle / "models" / "checkpoint.pt").exists()
