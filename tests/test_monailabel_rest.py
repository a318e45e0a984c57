# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""The segmentation bundle in a real MONAI Label server on localhost, driven through its REST API.

The commands of the bundle README's MONAI Label section: ``monailabel apps --download`` copies the
``monaibundle`` sample app (offline, from the installed package), the bundle goes to
``model/dagman_lung_tumor_ct_segmentation`` and tiny DAGMaN encoder weights (with their model card) to
``model/dagman_ct_pretraining/models``, three LIDC crops and their masks form the studies folder, and
``monailabel start_server`` serves them. Then: POST ``/infer/`` (a uint8 mask on the CT's grid), POST
``/train/`` for one epoch (from the DAGMaN encoder; polled on GET ``/train/`` until done), POST
``/infer/`` with the trained model; then, with the pretraining weights moved away, POST ``/train/`` must
fail with a message in GET ``/train/``'s lines that names the missing file and what to do.

Needs ``monailabel`` (0.8.5): it runs in the separate environment made by ``.ci/monailabel_env.sh``
(``.ci/run`` runs it there) and is skipped wherever ``monailabel`` cannot be imported.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

try:
    import monailabel  # noqa: F401
    import requests
    from monailabel.tasks.infer.bundle import BundleInferTask  # noqa: F401  (imports torchvision)
except Exception as err:  # not installed, or installed without a loadable torchvision
    pytest.skip(f"monailabel is not importable here ({type(err).__name__}: {err}); "
                f"run .ci/monailabel_env.sh and use its environment", allow_module_level=True)

from monai.networks.nets import SwinUNETR

from dagman_components.networks import SwinDAGMaN
from dagman_components.segmentation import init_swin_unetr
from dagman_components.weights.state_dict import export_encoder

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "dagman_lung_tumor_ct_segmentation"
SAMPLE = REPO / "data" / "lidc_nodules_sample"
MODEL = BUNDLE.name
STUDIES = ("LIDC-IDRI-0001_R_1", "LIDC-IDRI-0003_R_2", "LIDC-IDRI-0007_R_1")
START_TIMEOUT_S = 180
TRAIN_TIMEOUT_S = 240
# tiny Swin settings: the bundle's configs (unchanged) take them from the encoder's model card
SETTINGS = {"embed_dim": 12, "depths": [2, 2, 2, 2], "num_heads": [3, 3, 3, 3], "window_size": 4, "patch_size": 2}
TRAIN_REQUEST = {"max_epochs": 1, "val_split": 0.34, "device": "cpu", "multi_gpu": False, "tracking": "none"}


def _make_app(root: Path) -> Path:
    """``monaibundle`` copied as the README says, with this bundle (configs unchanged), tiny DAGMaN encoder
    weights and their card where ``pretrained_encoder`` points, and a ``models/model.pt`` (for the first
    inference) whose encoder is that DAGMaN encoder."""
    subprocess.run([sys.executable, "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle",
                    "--output", str(root / "apps")], check=True, capture_output=True, timeout=120)
    app = root / "apps" / "monaibundle"
    (app / "model").mkdir()
    bundle = app / "model" / MODEL
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("sample_data", "runs", "eval", "models"))
    (bundle / "models").mkdir()
    encoder_path = app / "model" / "dagman_ct_pretraining" / "models" / "model.pt"
    torch.manual_seed(0)
    export_encoder(SwinDAGMaN(in_channels=1, **SETTINGS), encoder_path, {"network": {"in_channels": 1, **SETTINGS}})
    net = SwinUNETR(1, 2, feature_size=SETTINGS["embed_dim"], depths=SETTINGS["depths"],
                    num_heads=SETTINGS["num_heads"], window_size=SETTINGS["window_size"],
                    patch_size=SETTINGS["patch_size"])
    torch.save(init_swin_unetr(net, encoder_path).state_dict(), bundle / "models" / "model.pt")
    return app


def _make_studies(root: Path) -> Path:
    """Three LIDC crops, their masks as MONAI Label's final labels (same file names)."""
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for name in STUDIES:
        shutil.copy(SAMPLE / "image" / f"{name}.nii.gz", studies / f"{name}.nii.gz")
        shutil.copy(SAMPLE / "mask" / f"{name}.nii.gz", studies / "labels" / "final" / f"{name}.nii.gz")
    return studies


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """``monailabel start_server`` in a subprocess (log in a file), stopped on exit."""

    def __init__(self, app: Path, studies: Path, log: Path) -> None:
        self.app = app
        self.info: dict = {}
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false"}
        cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
               "--conf", "models", MODEL, "--conf", "zoo_source", "github", "--conf", "sam2", "false",
               "--host", "127.0.0.1", "--port", str(self.port)]
        self._log_file = open(log, "w")
        self.process = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)

    def wait_ready(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                r = requests.get(f"{self.url}/info/", timeout=5)
                if r.status_code == 200:
                    return r.json()
            except requests.ConnectionError:
                pass
            time.sleep(1)
        pytest.fail(f"the server did not answer GET /info/ within {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)  # the server and the training subprocess it may have started
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(timeout=30)
        self._log_file.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[_Server]:
    root = tmp_path_factory.mktemp("monailabel")
    s = _Server(_make_app(root), _make_studies(root), root / "server.log")
    try:
        s.info = s.wait_ready(START_TIMEOUT_S)
        yield s
    finally:
        s.stop()


def _infer(server: _Server, image_id: str) -> nib.Nifti1Image:
    r = requests.post(f"{server.url}/infer/{MODEL}", params={"image": image_id, "output": "image"},
                      data={"params": json.dumps({"device": "cpu"})}, timeout=120)
    assert r.status_code == 200, f"{r.status_code} {r.text[:2000]}\n{server.log_tail()}"
    data = gzip.decompress(r.content) if r.content[:2] == b"\x1f\x8b" else r.content
    return nib.Nifti1Image.from_bytes(data)


def _check_mask(mask: nib.Nifti1Image, image_id: str) -> None:
    image = nib.load(str(SAMPLE / "image" / f"{image_id}.nii.gz"))
    assert mask.shape == image.shape
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-4)
    assert mask.get_data_dtype() == np.uint8  # inference.yaml's CastToTyped (MONAI Label drops SaveImaged)
    assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1}


def _train(server: _Server, timeout_s: float) -> dict:
    """POST /train/<model>, then GET /train/ until this task (by its id) has finished; its status."""
    r = requests.post(f"{server.url}/train/{MODEL}", json=TRAIN_REQUEST, timeout=30)
    assert r.status_code == 200, f"{r.status_code} {r.text[:2000]}"
    task_id = r.json()["id"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tasks = requests.get(f"{server.url}/train/", params={"all": "true"}, timeout=10).json()
        status = next(t for t in tasks if t["id"] == task_id)
        if status["status"] not in ("SUBMITTED", "RUNNING"):
            return status
        time.sleep(2)
    pytest.fail(f"training did not finish within {timeout_s} s:\n{server.log_tail()}")


def test_info_lists_the_bundle(server):
    assert MODEL in server.info["models"]
    assert server.info["models"][MODEL]["labels"] == {"tumour": 1}
    assert MODEL in server.info["trainers"]
    objects = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=10).json()["objects"]
    assert set(STUDIES) <= set(objects)  # image ids: the file names without extension


def test_infer_train_infer(server):
    _check_mask(_infer(server, STUDIES[0]), STUDIES[0])

    model_pt = server.app / "model" / MODEL / "models" / "model.pt"
    before = torch.load(model_pt, weights_only=True)
    mtime = model_pt.stat().st_mtime_ns
    status = _train(server, TRAIN_TIMEOUT_S)
    assert status["status"] == "DONE", f"{json.dumps(status, indent=1)[-3000:]}\n{server.log_tail()}"
    assert model_pt.stat().st_mtime_ns != mtime
    after = torch.load(model_pt, weights_only=True)
    assert set(after) == set(before)
    assert any(not torch.equal(after[k], before[k]) for k in after)  # trained and saved again

    log_before = server.log.read_text(errors="replace")
    _check_mask(_infer(server, STUDIES[1]), STUDIES[1])
    new_log = server.log.read_text(errors="replace")[len(log_before):]
    assert "Reload model" in new_log  # MONAI Label noticed the newer model.pt and infers with the trained model


def test_training_without_pretraining_weights_says_what_is_missing(server):
    """The default ``pretrained_encoder`` (the pretraining bundle beside this one) missing: training stops
    with a message, in the lines GET /train/ returns, that names the config key, the file and what to do."""
    encoder_dir = server.app / "model" / "dagman_ct_pretraining"
    aside = server.app / "dagman_ct_pretraining.aside"
    encoder_dir.rename(aside)
    try:
        status = _train(server, TRAIN_TIMEOUT_S)
    finally:
        aside.rename(encoder_dir)
    assert status["status"] == "ERROR", json.dumps(status, indent=1)
    error = [line for line in status["details"] if line.startswith("ERROR")]
    assert error, "\n".join(status["details"])
    assert "pretrained_encoder" in error[0] and "dagman_ct_pretraining" in error[0] and "null" in error[0], error[0]
