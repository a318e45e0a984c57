"""Checks a newcomer meets first: sizes that fit the data and the machine, resuming with other settings."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn
from ignite.engine import Engine

from dagman_components.data import check_batch_fits, check_roi_fits, fit_num_workers, volume_extent_mm
from dagman_components.classification.splits import SplitError, grouped_stratified_folds
from dagman_components.handlers import AtomicCheckpointSaver, CheckpointSettingsError, ResumeFromCheckpoint


def test_batch_larger_than_the_split_names_batch_size_and_what_fits():
    with pytest.raises(ValueError, match=r"batch_size 16 is larger than the training split \(13 cases\).*"
                                         r"lower batch_size to at most 13"):
        check_batch_fits(16, 13)
    assert check_batch_fits(4, 13) == 3
    assert check_batch_fits(16, 13, drop_last=False) == 1
    with pytest.raises(ValueError, match="split is empty"):
        check_batch_fits(2, 0, drop_last=False)


def test_too_few_patients_for_the_folds_says_what_to_lower():
    with pytest.raises(SplitError, match=r"3 patient\(s\) cannot be split into 5 .*lower n_folds to at most 3"):
        grouped_stratified_folds([0, 1, 0], ["a", "b", "c"], n_folds=5)


def test_num_workers_is_capped_by_the_cpus():
    assert fit_num_workers(4, cpus=2) == 2
    assert fit_num_workers(0, cpus=2) == 0
    assert fit_num_workers(1, cpus=16) == 1
    with pytest.raises(ValueError, match="num_workers"):
        fit_num_workers(-1, cpus=2)


def test_capped_workers_make_no_dataloader_warning(recwarn):
    workers = fit_num_workers(64)
    loader = torch.utils.data.DataLoader(list(range(4)), num_workers=workers)
    loader.check_worker_number_rationality()
    assert not [w for w in recwarn if "worker" in str(w.message)]


def _volume(path, shape, zooms):
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.diag([*zooms, 1.0])), str(path))
    return {"image": str(path)}


def test_roi_larger_than_every_volume_is_refused_with_a_size_that_fits(tmp_path, caplog):
    items = [_volume(tmp_path / "a.nii.gz", (100, 80, 40), (1.0, 1.0, 2.5)),
             _volume(tmp_path / "b.nii.gz", (50, 50, 20), (1.0, 1.0, 2.5))]
    assert volume_extent_mm(items[0]["image"]) == (100.0, 80.0, 100.0)
    with pytest.raises(ValueError, match=r"roi_size \[64, 64, 64\] at spacing \[2.0, 2.0, 2.0\] mm covers "
                                         r"\[128.0, 128.0, 128.0\] mm, larger than the largest volume "
                                         r"\(\[100.0, 80.0, 100.0\] mm\); lower roi_size to at most \[32, 32, 32\]"):
        check_roi_fits([64, 64, 64], [2.0, 2.0, 2.0], items)
    with caplog.at_level(logging.INFO):
        check_roi_fits([32, 32, 32], [2.0, 2.0, 2.0], items)  # fits a; b is padded
    assert "b.nii.gz" in caplog.text and "a.nii.gz" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):  # already the smallest sides: padded with a warning, not refused
        check_roi_fits([32, 32, 32], [4.0, 4.0, 4.0], items)
    assert "every view is partly padding" in caplog.text and "finer spacing" in caplog.text


def _engine_with_checkpoint(path, width, settings):
    net = nn.Linear(2, width)
    engine = Engine(lambda e, b: None)
    engine.state.iteration, engine.state.epoch, engine.state.epoch_length, engine.state.max_epochs = 5, 1, 5, 1
    AtomicCheckpointSaver(path, {"net": net}, settings=settings)(engine)
    return net


def test_resume_with_other_settings_stops_in_one_line_before_loading(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _engine_with_checkpoint(path, 3, {"embed_dim": 24, "roi_size": (64, 64, 64), "seed": 0})
    before = path.read_bytes()
    net = nn.Linear(2, 3)
    weights = net.weight.detach().clone()
    resume = ResumeFromCheckpoint(path, {"net": net}, settings={"embed_dim": 48, "roi_size": [64, 64, 64], "seed": 0})
    with pytest.raises(CheckpointSettingsError) as info:
        resume(Engine(lambda e, b: None))
    message = str(info.value)
    assert "\n" not in message
    assert "embed_dim: 24 in the checkpoint, 48 now" in message
    assert "roi_size" not in message and "seed" not in message  # equal values (tuple vs list) are not named
    assert "--bundle_root" in message and "--resume false" in message
    assert torch.equal(net.weight, weights) and path.read_bytes() == before


def test_resume_with_the_same_settings_loads_and_resume_false_ignores(tmp_path):
    path = tmp_path / "checkpoint.pt"
    saved = _engine_with_checkpoint(path, 3, {"embed_dim": 24})
    net, engine = nn.Linear(2, 3), Engine(lambda e, b: None)
    ResumeFromCheckpoint(path, {"net": net}, settings={"embed_dim": 24})(engine)
    assert torch.equal(net.weight, saved.weight) and engine.state.iteration == 5
    fresh = nn.Linear(2, 5)  # other shape: would fail to load, but resume is off
    ResumeFromCheckpoint(path, {"net": fresh}, enabled=False, settings={"embed_dim": 48})(Engine(lambda e, b: None))


def test_checkpoint_without_settings_is_compared_by_shapes_in_one_line(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _engine_with_checkpoint(path, 3, None)
    resume = ResumeFromCheckpoint(path, {"net": nn.Linear(2, 5)}, settings={"embed_dim": 48})
    with pytest.raises(CheckpointSettingsError, match=r"net: 2 tensor\(s\) of other shape, e.g. weight \(3, 2\) in "
                                                      r"the checkpoint, \(5, 2\) now") as info:
        resume(Engine(lambda e, b: None))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bundle", ["dagman_ct_pretraining", "dagman_lung_nodule_ct_classification",
                                    "dagman_lung_tumor_ct_segmentation"])
def test_every_bundle_loads_data_with_workers_capped_by_the_cpus(bundle):
    from conftest import REPO
    from monai.bundle import ConfigParser

    from dagman_components.data import available_cpus

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "train.yaml"))
    parser["num_workers"] = 64
    assert parser.get_parsed_content("loader_workers") == available_cpus()
    loaders = [k for k in ("train#dataloader", "validate#dataloader") if k in parser]
    assert loaders and all(parser.get_parsed_content(f"{k}#num_workers") == available_cpus() for k in loaders)
    if "training_plan" in parser:  # classification: cached features are in memory, loaded without workers
        parser.update({"mode": "linear_probe"})
        assert all(parser.get_parsed_content(f"{k}#num_workers") == 0 for k in loaders)


def test_progress_shows_count_and_eta_and_can_be_switched_off(capsys, monkeypatch):
    from dagman_components.runtime.progress import progress

    assert list(progress(range(3), "cases", unit="case")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "cases: 100%" in err and "3/3" in err and "ETA" in err and "case/s" in err
    monkeypatch.setenv("DAGMAN_PROGRESS", "0")
    assert list(progress(range(3), "cases")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_packaging_shows_progress(tmp_path, capsys):
    from conftest import REPO

    from dagman_components.bundle_tools.package import package_bundle

    zip_path = package_bundle(REPO / "bundles" / "dagman_organ_ct_clustering", tmp_path, require_weights=False)
    assert zip_path.is_file()
    assert "packaging dagman_organ_ct_clustering: 100%" in capsys.readouterr().err
