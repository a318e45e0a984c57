"""The pretraining bundle end to end on real CT: run, kill-and-resume, DDP on CPU, bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import DATA, REPO

import dagman_components.optim.schedules

BUNDLE = REPO / "bundles" / "dagman_ct_pretraining"
TINY = """
roi_size: [32, 32, 32]
embed_dim: 12
depths: [2, 2, 2, 2]
num_heads: [3, 3, 3, 3]
sa_heads: 4
head_out_dim: 64
head_hidden_dim: 32
head_bottleneck_dim: 16
warmup_epochs: 1
warmup_teacher_temp_epochs: 2
"""
pytestmark = pytest.mark.slow


def make_bundle(root: Path, images: list[str] | None = None) -> Path:
    """A copy of the bundle's configs plus a tiny override file and a datalist of real CT."""
    dst = root / "bundle"
    shutil.copytree(BUNDLE / "configs", dst / "configs")
    (dst / "configs" / "tiny.yaml").write_text(TINY)
    images = images or [str(DATA / "totalseg_example" / "example_ct_sm.nii.gz"), str(DATA / "totalseg_example" / "example_ct_dicom")]
    (dst / "datalist.json").write_text(json.dumps({"training": [{"image": p} for p in images]}))
    return dst


def command(bundle: Path, *extra: str, launcher: tuple[str, ...] = (sys.executable, "-m")) -> list[str]:
    configs = [str(bundle / "configs" / c) for c in ("train.yaml", "demo.yaml", "tiny.yaml")]
    configs += [str(bundle / "configs" / c) for c in extra if c.endswith(".yaml")]
    args = [a for a in extra if not a.endswith(".yaml")]
    return [*launcher, "monai.bundle", "run", "--config_file", repr(configs), "--bundle_root", str(bundle),
            "--dataset_dir", str(bundle / "datalist.json"), *args]


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO.parent), env=env)


def load_ckpt(bundle: Path) -> dict:
    return torch.load(bundle / "models" / "checkpoint.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    bundle = make_bundle(tmp_path_factory.mktemp("run"))
    result = run(command(bundle, "--max_epochs", "2"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return bundle


def test_run_writes_checkpoint_weights_logs_and_plot(trained):
    ck = load_ckpt(trained)
    assert set(ck) == {"student", "teacher", "optimizer", "loss", "loss_history", "collapse_alarm", "trainer", "settings"}
    assert ck["collapse_alarm"]["alarms"] == [] and len(ck["collapse_alarm"]["streak"]) == 9  # 3 terms x 3 kinds
    assert ck["trainer"]["iteration"] == 4  # 2 volumes, batch 1, 2 epochs
    assert ck["loss"]["cls_ce.center"].abs().sum() > 0  # centres were updated
    card = json.loads((trained / "models" / "model_card.json").read_text())
    from dagman_components.weights.encoder_io import build_encoder
    from dagman_components.weights.state_dict import load_pretrained_encoder, sha256_of

    assert card["sha256"] == sha256_of(trained / "models" / "model.pt")
    assert card["network"]["embed_dim"] == 12 and card["iterations_trained"] == 4
    report = load_pretrained_encoder(build_encoder(card), trained / "models" / "model.pt", min_loaded_fraction=1.0)
    assert report.unexpected == []
    encoder_from_teacher = {k[len("encoder."):]: v for k, v in ck["teacher"].items() if k.startswith("encoder.")}
    model = torch.load(trained / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(model[k], encoder_from_teacher[k]) for k in model)
    png = trained / "runs" / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(png).size[0] > 300
    rows = (trained / "runs" / "loss_curves.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:6] == ["iteration", "loss", "loss_amip", "loss_ampd", "loss_aitd", "loss_gitd"] and len(rows) == 5
    from dagman_components.handlers.monitoring import DIAGNOSTIC_KEYS, LOSS_KEYS

    assert header[1:] == list(LOSS_KEYS + DIAGNOSTIC_KEYS)
    last = dict(zip(header, map(float, rows[-1].split(","))))
    assert 0.0 <= last["aitd/teacher_entropy"] <= np.log(64) + 1e-4  # K = 64 in TINY
    assert last["satt/log_n"] == pytest.approx(np.log(8))  # ROI 32, SA after stage 3 (stride 16): 2^3 cells
    assert last["aitd/kl"] == pytest.approx(last["loss_aitd"] - last["aitd/teacher_entropy"], abs=1e-3)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained / "runs")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "loss_amip", "loss_ampd", "loss_aitd", "loss_gitd", "lr", "teacher_temp", "teacher_momentum",
            "aitd/teacher_entropy", "gitd/spread", "ampd/kl", "satt/entropy", "collapse_alarm"} <= tags
    assert len(events.Scalars("loss_ampd")) == 4


def wait_for_iteration(bundle: Path, proc: subprocess.Popen, at_least: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "training ended before it could be killed"
        path = bundle / "models" / "checkpoint.pt"
        if path.exists() and load_ckpt(bundle)["trainer"]["iteration"] >= at_least:
            return
        time.sleep(0.2)
    raise TimeoutError("no checkpoint appeared")


def test_sigkill_mid_epoch_then_same_command_resumes(tmp_path):
    bundle = make_bundle(tmp_path)
    cmd = command(bundle, "--max_epochs", "3", "--save_interval", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        wait_for_iteration(bundle, proc, at_least=3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    saved = load_ckpt(bundle)  # loads with weights_only: never truncated
    it = saved["trainer"]["iteration"]
    assert 3 <= it < 6

    # the same objects, restored in process from the bundle config, equal what was saved
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / c) for c in ("train.yaml", "demo.yaml", "tiny.yaml")])
    parser.update({"bundle_root": str(bundle), "dataset_dir": str(bundle / "datalist.json"), "max_epochs": 3, "num_workers": 0})
    trainer = parser.get_parsed_content("train#trainer")
    from dagman_components.handlers import ResumeFromCheckpoint

    resume = next(h for h in parser.get_parsed_content("train#common_handlers") if isinstance(h, ResumeFromCheckpoint))
    resume(trainer)
    assert trainer.state.iteration == it and trainer.state.epoch == it // 2
    teacher = parser.get_parsed_content("teacher").state_dict()
    assert all(torch.equal(teacher[k], saved["teacher"][k]) for k in saved["teacher"])
    loss = parser.get_parsed_content("loss_function").state_dict()
    assert all(torch.equal(loss[k], saved["loss"][k]) for k in saved["loss"])
    opt = parser.get_parsed_content("optimizer").state_dict()
    assert opt["state"][0]["step"] == saved["optimizer"]["state"][0]["step"] == it
    lr = dagman_components.optim.schedules.value_at(parser.get_parsed_content("schedules#lr"), it)
    assert saved["optimizer"]["param_groups"][0]["lr"] == lr  # the lr of the last step taken, from the schedule

    result = run(cmd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resumed from {bundle / 'models' / 'checkpoint.pt'} at epoch {it // 2}, iteration {it}" in result.stdout
    assert load_ckpt(bundle)["trainer"]["iteration"] == 6
    iterations = [int(r.split(",")[0]) for r in (bundle / "runs" / "loss_curves.csv").read_text().splitlines()[1:]]
    assert iterations == list(range(1, 7))
    assert not list((bundle / "models").glob(".*.tmp"))


def test_ddp_two_processes_on_cpu(tmp_path):
    bundle = make_bundle(tmp_path)
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m")
    result = run(command(bundle, "multi_gpu_train.yaml", "--max_epochs", "2", launcher=launcher))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert out.count("Epoch[2] Complete") == 2  # both ranks trained
    ck = load_ckpt(bundle)
    assert ck["trainer"]["iteration"] == 2  # 2 volumes split over 2 ranks, batch 1
    assert "module." not in next(iter(ck["student"]))
    assert (bundle / "models" / "model.pt").is_file()


# ---- bad input: a clear error naming the file or key, a non-zero exit, nothing overwritten


def run_in_process(bundle: Path, **override):
    from monai.bundle import run as bundle_run

    configs = [str(bundle / "configs" / c) for c in ("train.yaml", "demo.yaml", "tiny.yaml")]
    override = {"bundle_root": str(bundle), "dataset_dir": str(bundle / "datalist.json"), "num_workers": 0, **override}
    bundle_run(config_file=configs, **override)


def messages(exc: BaseException) -> str:
    text = []
    while exc is not None:
        text.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(text)


@pytest.fixture
def sentinel_bundle(tmp_path):
    bundle = make_bundle(tmp_path)
    (bundle / "models").mkdir()
    (bundle / "models" / "model.pt").write_bytes(b"previous weights")
    return bundle


def test_missing_dataset_dir_exits_non_zero(sentinel_bundle, tmp_path):
    missing = tmp_path / "no_such_folder"
    cmd = command(sentinel_bundle, "--max_epochs", "1")
    cmd[cmd.index("--dataset_dir") + 1] = str(missing)
    result = run(cmd)
    assert result.returncode != 0
    assert str(missing) in result.stderr and "does not exist" in result.stderr
    assert (sentinel_bundle / "models" / "model.pt").read_bytes() == b"previous weights"


@pytest.mark.parametrize("case", ["empty", "corrupt", "2d", "4d", "roi", "head_batch_norm"])
def test_bad_input_is_named_and_harmless(sentinel_bundle, tmp_path, case):
    override = {}
    bad_dir = tmp_path / "cts"
    bad_dir.mkdir()
    affine = np.eye(4)
    if case == "corrupt":
        (bad_dir / "broken.nii.gz").write_bytes(b"\x1f\x8b" + os.urandom(64))
        expect = "broken.nii.gz"
    elif case == "2d":
        nib.save(nib.Nifti1Image(np.zeros((40, 40), np.int16), affine), bad_dir / "slice.nii.gz")
        expect = "slice.nii.gz"
    elif case == "4d":
        nib.save(nib.Nifti1Image(np.zeros((40, 40, 40, 2), np.int16), affine), bad_dir / "series4d.nii.gz")
        expect = "series4d.nii.gz"
    elif case == "roi":
        override["roi_size"] = [48, 48, 48]
        expect = "roi_size"
    elif case == "head_batch_norm":  # batch norm in the heads with one volume per batch
        override["head_batch_norm"] = True
        expect = "head_batch_norm needs batch_size >= 4 (got 1)"
    else:
        expect = str(bad_dir)
    if case not in ("roi", "head_batch_norm"):
        override["dataset_dir"] = str(bad_dir)
    with pytest.raises(Exception) as info:
        run_in_process(sentinel_bundle, max_epochs=1, **override)
    assert expect in messages(info.value)
    assert (sentinel_bundle / "models" / "model.pt").read_bytes() == b"previous weights"
    assert not (sentinel_bundle / "models" / "checkpoint.pt").exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(trained, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(trained, bundle)
    good = (bundle / "models" / "checkpoint.pt").read_bytes()
    img = nib.load(DATA / "totalseg_example" / "example_ct_sm.nii.gz")
    data = img.get_fdata().astype(np.float32)
    data[:, :, 10:20] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), tmp_path / "nan_ct.nii.gz")
    (bundle / "datalist.json").write_text(json.dumps({"training": [{"image": str(tmp_path / "nan_ct.nii.gz")}]}))
    with pytest.raises(Exception) as info:
        run_in_process(bundle, max_epochs=3)
    assert "non-finite loss" in messages(info.value)
    assert (bundle / "models" / "checkpoint.pt").read_bytes() == good


def test_checkpoint_of_another_architecture_is_refused_and_kept(trained, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(trained, bundle)
    good = (bundle / "models" / "checkpoint.pt").read_bytes()
    with pytest.raises(Exception) as info:
        run_in_process(bundle, max_epochs=3, embed_dim=24)
    text = messages(info.value)
    assert "cannot resume from" in text and "checkpoint.pt" in text
    # one line, naming the differing setting and the two ways on, instead of hundreds of size mismatches
    assert "embed_dim: 12 in the checkpoint, 24 now" in text and "--resume false" in text
    assert "size mismatch" not in text
    assert (bundle / "models" / "checkpoint.pt").read_bytes() == good


def test_small_cpu_recipe_trains_with_batch_norm_heads(tmp_path):
    """train.yaml + small_cpu.yaml (the recipe) on the shipped nodule crops, with a tiny network: the heads carry
    batch norm, the incomplete last batch is dropped, and the teacher's bottleneck features are spread out."""
    from monai.bundle import run as bundle_run

    crops = sorted((REPO / "data" / "lidc_nodules_sample" / "image").glob("*.nii.gz"))[:10]
    bundle = make_bundle(tmp_path, [str(p) for p in crops])
    configs = [str(bundle / "configs" / c) for c in ("train.yaml", "small_cpu.yaml", "tiny.yaml")]
    bundle_run(config_file=configs, bundle_root=str(bundle), dataset_dir=str(bundle / "datalist.json"),
               batch_size=4, max_epochs=1, save_interval=1)
    ck = load_ckpt(bundle)
    assert ck["trainer"]["iteration"] == 2  # 10 crops, batch 4: the last batch of 2 is dropped
    assert "cls_head.mlp.1.weight" in ck["teacher"]  # TokenBatchNorm after the first hidden layer
    rows = list(csv.DictReader((bundle / "runs" / "loss_curves.csv").open()))
    assert float(rows[-1]["aitd/spread"]) > 0.3
