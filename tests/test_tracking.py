# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""``python -m monai.bundle run ... --tracking mlflow`` on one tiny epoch of each training bundle (and the
classification and segmentation evaluations): the local MLflow store, read back with ``MlflowClient``, holds
finite metrics, the run's settings as params and the artifacts."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import DATA, REPO

from dagman_components.handlers.events import LoggedScalars
from dagman_components.handlers.tracking import configure_tracking, tracked_scalars

mlflow = pytest.importorskip("mlflow", reason="the tracking extra: pip install -e .[tracking]")

BUNDLES = REPO / "bundles"
NODULES = DATA / "lidc_nodules_sample"
TINY_ENCODER = {"embed_dim": 12, "depths": [2, 2, 2, 2], "num_heads": [3, 3, 3, 3], "sa_heads": 4}
TINY_ARGS = ["--embed_dim", "12", "--depths", "[2,2,2,2]", "--num_heads", "[3,3,3,3]", "--sa_heads", "4"]


def test_tracked_scalars_reads_dicts_and_decollated_lists():
    assert tracked_scalars({"loss": torch.tensor(0.5), "scalars": {"loss": 0.5, "lr": 1e-3, "bad": float("nan")}}) == {
        "loss": 0.5, "lr": 1e-3}
    assert tracked_scalars({"loss": torch.tensor(0.25), "pred": torch.zeros(2)}) == {"train_loss": 0.25}
    assert tracked_scalars([{"loss": torch.tensor(2.0)}, {"loss": torch.tensor(2.0)}]) == {"train_loss": 2.0}
    assert tracked_scalars([{"pred": torch.zeros(1)}]) is None and tracked_scalars(None) is None


def test_configure_tracking_fits_only_mlflow_handlers(tmp_path):
    from monai.handlers import MLFlowHandler, StatsHandler

    stats, tracker = StatsHandler(), MLFlowHandler(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db", artifacts="config.json")
    stats_transform = stats.output_transform
    alarm = SimpleNamespace(scalars={"collapse_alarm": 1.0})  # a diagnostic handler's numbers of this iteration
    out = configure_tracking([stats, tracker], params={"a": {"b": (1, 2)}, "c": 3}, artifacts=["card.json"],
                             close="false", step_per_run=True, scalars=LoggedScalars([alarm]))
    assert out == [stats, tracker] and stats.output_transform is stats_transform  # not an MLFlowHandler
    output = {"loss": torch.tensor(0.5), "scalars": {"loss": 0.5}}
    assert tracker.output_transform(output) == {"loss": 0.5, "collapse_alarm": 1.0}
    assert output["scalars"] == {"loss": 0.5}  # read, not changed
    assert tracker.experiment_param == {"a.b": [1, 2], "c": 3}
    assert tracker.artifacts == ("config.json", "card.json") and tracker.close_on_complete is False
    assert [tracker.global_epoch_transform(1) for _ in range(3)] == [1, 2, 3]


def _cli(configs: list[Path], bundle: Path, *args: str) -> str:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr([str(c) for c in configs]),
           "--bundle_root", str(bundle), "--tracking", "mlflow", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(bundle.parent), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _runs(store: Path) -> list:
    """Every run of MONAI's default experiment in the SQLite store ``--tracking mlflow`` writes, oldest first."""
    from monai.utils import path_to_sqlite_uri

    client = mlflow.MlflowClient(path_to_sqlite_uri(str(store)))
    experiment = client.get_experiment_by_name("monai_experiment")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return [(client, run) for run in runs]


def _check(client, run, metrics: set[str], params: set[str], artifacts: set[str]) -> None:
    assert run.info.status == "FINISHED"
    assert metrics <= set(run.data.metrics), sorted(set(metrics) - set(run.data.metrics))
    for name in run.data.metrics:
        assert all(math.isfinite(m.value) for m in client.get_metric_history(run.info.run_id, name)), name
    assert params <= set(run.data.params), sorted(params - set(run.data.params))
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts <= logged, sorted(artifacts - logged)


@pytest.mark.slow
def test_pretraining_logs_losses_diagnostics_probe_params_and_artifacts(tmp_path):
    bundle = tmp_path / "dagman_ct_pretraining"
    shutil.copytree(BUNDLES / "dagman_ct_pretraining" / "configs", bundle / "configs")
    (bundle / "datalist.json").write_text(json.dumps(
        {"training": [{"image": str(DATA / "totalseg_example" / "example_ct_sm.nii.gz")}]}))
    configs = [bundle / "configs" / c for c in ("train.yaml", "demo.yaml", "probe.yaml")]
    _cli(configs, bundle, "--dataset_dir", str(bundle / "datalist.json"), "--max_epochs", "1", "--num_workers", "0",
         *TINY_ARGS, "--roi_size", "[32,32,32]", "--probe_roi_size", "[32,32,32]", "--head_out_dim", "64",
         "--head_hidden_dim", "32", "--head_bottleneck_dim", "16", "--warmup_epochs", "1",
         "--warmup_teacher_temp_epochs", "1", "--probe_dir", str(NODULES), "--probe_interval", "1")
    ((client, run),) = _runs(bundle / "runs" / "mlruns.db")
    _check(client, run,
           metrics={"loss", "loss_amip", "loss_aitd", "loss_ampd", "loss_gitd", "lr", "aitd/teacher_entropy",
                    "aitd/spread", "satt/entropy", "collapse_alarm", "probe_auc_cls", "probe_auc_global"},
           params={"card.network.embed_dim", "card.training.roi_size", "learning_rate", "seed", "max_epochs"},
           artifacts={"model_card.json", "loss_curves.png", "probe_auc.png", "probe_auc.csv"})
    assert run.data.params["card.network.embed_dim"] == "12"
    card = json.loads((bundle / "models" / "model_card.json").read_text())
    with open(client.download_artifacts(run.info.run_id, "model_card.json", str(tmp_path))) as f:
        assert json.load(f) == card


@pytest.mark.slow
def test_classification_train_and_evaluate_log_metrics_params_and_artifacts(tmp_path):
    bundle = tmp_path / "dagman_lung_nodule_ct_classification"
    shutil.copytree(BUNDLES / bundle.name, bundle, ignore=shutil.ignore_patterns("models", "eval"))
    (bundle / "models").mkdir()
    common = ["--dataset_dir", str(NODULES), "--num_workers", "0", "--batch_size", "4"]
    _cli([bundle / "configs" / "train.yaml"], bundle, *common, *TINY_ARGS, "--pretrained_path", "null",
         "--max_epochs", "2")
    _cli([bundle / "configs" / "train.yaml", bundle / "configs" / "evaluate.yaml"], bundle, *common, "--n_boot", "10")
    (client, train), (_, evaluation) = _runs(bundle / "eval" / "mlruns.db")
    settings = {"mode", "fold", "few_shot_fraction", "augment", "learning_rate", "max_epochs"}
    _check(client, train, {"train_loss", "lr_group_0", "val_auc"}, settings, {"model_card.json", "training_curves.png"})
    assert [m.step for m in client.get_metric_history(train.info.run_id, "val_auc")] == [1, 2]  # validation rounds
    assert train.data.params["mode"] == "finetune"
    _check(client, evaluation, {"test_auc"}, settings, {"model_card.json", "test_metrics.json", "test_roc.png"})
    test_auc = json.loads((bundle / "eval" / "test_metrics.json").read_text())["auc"]["value"]
    assert evaluation.data.metrics["test_auc"] == pytest.approx(test_auc, abs=1e-9)


@pytest.mark.slow
def test_segmentation_train_and_evaluate_log_metrics_params_and_artifacts(tmp_path):
    from dagman_components.networks import SwinDAGMaN
    from dagman_components.segmentation import build_segmentation_datalist, write_datalist
    from dagman_components.weights.state_dict import export_encoder

    bundle = tmp_path / "dagman_lung_tumor_ct_segmentation"
    shutil.copytree(BUNDLES / bundle.name / "configs", bundle / "configs")
    items = build_segmentation_datalist(NODULES)
    write_datalist(tmp_path / "data.json", {"training": items[:2], "validation": items[2:3]})
    encoder_dir = tmp_path / "dagman_ct_pretraining" / "models"  # where the bundle looks by default
    encoder_dir.mkdir(parents=True)
    torch.manual_seed(1)
    settings = {"in_channels": 1, "window_size": 4, "patch_size": 2, **TINY_ENCODER}
    export_encoder(SwinDAGMaN(**settings), encoder_dir / "model.pt", {"network": settings})
    configs = [bundle / "configs" / c for c in ("train.yaml", "demo.yaml")]
    common = ["--dataset_dir", str(tmp_path / "data.json")]
    _cli(configs, bundle, *common, "--max_epochs", "1", "--val_interval", "1", "--batch_size", "1",
         "--num_samples", "1", "--cache_rate", "0")
    _cli([*configs, bundle / "configs" / "evaluate.yaml"], bundle, *common, "--num_workers", "0")
    (client, train), (_, evaluation) = _runs(bundle / "runs" / "mlruns.db")
    settings = {"max_epochs", "learning_rate", "roi_size", "num_classes", "seed"}
    _check(client, train, {"train_loss", "lr_group_0", "val_mean_dice"}, settings,
           {"model_card.json", "training_curves.png"})
    _check(client, evaluation, {"val_mean_dice"}, settings, {"model_card.json", "dice_per_case.png", "metrics.csv"})
