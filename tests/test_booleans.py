# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""On/off settings mean what they say: every spelling a user types, through the real ``monai.bundle run``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DATA, REPO
from test_pretraining_bundle import TINY as TINY_PRETRAIN

from dagman_components.bundle_tools.config_checks import BOOLEAN_SETTINGS, as_bool
from dagman_components.errors import ConfigValueError

BUNDLES = REPO / "bundles"
PRETRAIN = BUNDLES / "dagman_ct_pretraining"
CLASSIFY = BUNDLES / "dagman_lung_nodule_ct_classification"
TINY_ENCODER = ["--embed_dim", "12", "--depths", "[2,2,2,2]", "--num_heads", "[3,3,3,3]", "--sa_heads", "4"]


@pytest.mark.parametrize("value", [True, "true", "TRUE", "True", "yes", "Yes", "on", "1", 1])
def test_true_spellings(value):
    assert as_bool(value, key="resume") is True


@pytest.mark.parametrize("value", [False, "false", "FALSE", "False", "no", "NO", "off", "0", 0])
def test_false_spellings(value):
    assert as_bool(value, key="resume") is False


@pytest.mark.parametrize("value", ["maybe", "", 2, -1, None, 0.5, [True]])
def test_other_values_are_refused_naming_the_key(value):
    with pytest.raises(ConfigValueError) as info:
        as_bool(value, key="augment")
    message = str(info.value)
    assert message.startswith("augment must be true or false") and repr(value) in message and "\n" not in message


def test_every_boolean_setting_of_every_bundle_is_listed():
    """A new ``true``/``false`` key in a bundle YAML that is not in BOOLEAN_SETTINGS would miss the conversion."""
    found = set()
    for path in BUNDLES.glob("*/configs/**/*.yaml"):
        config = yaml.safe_load(path.read_text()) or {}
        found |= {key for key, value in config.items() if isinstance(value, bool)}
    assert found and found <= BOOLEAN_SETTINGS, sorted(found - BOOLEAN_SETTINGS)


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], capture_output=True, text=True,
                          env=env, cwd=str(cwd), timeout=600)


def _pretraining(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    configs = [str(bundle / "configs" / c) for c in ("train.yaml", "demo.yaml", "tiny.yaml")]
    return _cli(["--config_file", repr(configs), "--bundle_root", str(bundle), "--dataset_dir",
                 str(bundle / "datalist.json"), "--max_epochs", "1", "--num_workers", "0", *args], bundle.parent)


@pytest.mark.slow
def test_resume_false_starts_over_and_resume_maybe_is_refused(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(PRETRAIN / "configs", bundle / "configs")
    (bundle / "configs" / "tiny.yaml").write_text(TINY_PRETRAIN)
    image = DATA / "totalseg_example" / "example_ct_sm.nii.gz"
    (bundle / "datalist.json").write_text(json.dumps({"training": [{"image": str(image)}]}))
    first = _pretraining(bundle)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = bundle / "models" / "checkpoint.pt"
    assert torch.load(checkpoint, weights_only=True)["settings"]["embed_dim"] == 12
    before = checkpoint.read_bytes()

    refused = _pretraining(bundle, "--embed_dim", "24", "--resume", "maybe")
    assert refused.returncode != 0
    lines = [line for line in refused.stderr.splitlines() if "resume must be true or false" in line]
    assert lines and "'maybe'" in lines[0], refused.stderr[-3000:]
    assert checkpoint.read_bytes() == before

    again = _pretraining(bundle, "--embed_dim", "24", "--resume", "false")  # the spelling the messages use
    assert again.returncode == 0, again.stderr[-3000:]
    assert torch.load(checkpoint, weights_only=True)["settings"]["embed_dim"] == 24  # started over

    kept = _pretraining(bundle, "--embed_dim", "12", "--resume", "true")  # resuming a run of other settings
    assert kept.returncode != 0 and "--resume false" in kept.stderr


@pytest.mark.slow
@pytest.mark.parametrize("spelling, augmented", [("false", False), ("No", False), ("TRUE", True)])
def test_augment_spellings_decide_the_training_transforms(tmp_path, spelling, augmented):
    """Classification fine-tuning through ``monai.bundle run``: ``--augment false`` leaves the training crops
    unaugmented (the string 'false' used to switch augmentation on). A run id that prints the training transforms
    after the bundle's own initialize shows what training would use."""
    bundle = tmp_path / "dagman_lung_nodule_ct_classification"
    shutil.copytree(CLASSIFY, bundle, ignore=shutil.ignore_patterns("models", "eval"))
    (bundle / "models").mkdir()
    show = "$print('TRAIN_TRANSFORMS', sorted({type(t).__name__ for t in @train#preprocessing.transforms}))"
    run = _cli(["--config_file", repr([str(bundle / "configs" / "train.yaml")]), "--bundle_root", str(bundle),
                "--dataset_dir", str(REPO / "data" / "lidc_nodules_sample"), "--num_workers", "0", "--batch_size", "4",
                *TINY_ENCODER, "--pretrained_path", "null", "--augment", spelling, "--run_id", "show",
                "--show", show, "--final_id", "no_finalize"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    (line,) = [line for line in run.stdout.splitlines() if line.startswith("TRAIN_TRANSFORMS")]
    assert ("RandFlipd" in line) is augmented, line
