# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Tests of the lung tumour segmentation bundle and dagman_components.segmentation, on real LIDC crops."""

from __future__ import annotations

import copy
import gzip
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from monai.networks.nets import SwinUNETR

from dagman_components.data import DataSourceError
from dagman_components.weights.encoder_io import EncoderSettingError, encoder_settings
from dagman_components.networks import SwinDAGMaN
from dagman_components.segmentation import (
    SegmentationPostprocessd,
    build_segmentation_datalist,
    init_swin_unetr,
    load_swin_unetr_encoder,
    pair_folders,
    segmentation_split,
    split_by_group,
    validate_image_label_pairs,
    write_datalist,
)
from dagman_components.weights.state_dict import WeightLoadError, export_encoder, sha256_of

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "dagman_lung_tumor_ct_segmentation"
SAMPLE = REPO / "data" / "lidc_nodules_sample"
SCRIPTS = REPO / "scripts"
# A tiny Swin for the tests (SwinUNETR needs feature_size % 12 == 0).
TINY = {"embed_dim": 12, "depths": [2, 2, 2, 2], "num_heads": [3, 3, 3, 3], "window_size": 4, "patch_size": 2}


def _tiny_unetr() -> SwinUNETR:
    return SwinUNETR(1, 2, feature_size=TINY["embed_dim"], depths=TINY["depths"], num_heads=TINY["num_heads"],
                     window_size=TINY["window_size"])


def _export_tiny_encoder(folder: Path, **overrides) -> tuple[Path, SwinDAGMaN]:
    """A random tiny DAGMaN encoder saved as the pretraining bundle does (model.pt + model_card.json)."""
    torch.manual_seed(1)
    settings = {**TINY, **overrides}
    encoder = SwinDAGMaN(in_channels=1, sa_heads=4, **settings)
    path = folder / "model.pt"
    export_encoder(encoder, path, {"network": {"in_channels": 1, **settings}})
    return path, encoder


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([0.7, 0.7, 2.5, 1.0]) if affine is None else affine), str(path))
    return path


# ------------------------------------------------------------------------------------------- encoder


def test_encoder_weights_transferred_tensor_by_tensor(tmp_path):
    path, encoder = _export_tiny_encoder(tmp_path)
    net = _tiny_unetr()
    decoder_before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("swinViT.")}
    report = load_swin_unetr_encoder(net, path)
    source = encoder.state_dict()
    target = net.swinViT.state_dict()
    assert len(report.loaded) == len(target) and not report.missing
    assert sorted(report.unexpected) == sorted(k for k in source if k == "mask_token" or k.startswith("sa."))
    for key, value in target.items():  # every Swin tensor equals the pretrained one
        assert torch.equal(value, source[key]), key
    for key, value in net.state_dict().items():  # the decoder is untouched
        if not key.startswith("swinViT."):
            assert torch.equal(value, decoder_before[key]), key


def test_null_path_keeps_random_init_and_says_so_other_spellings_are_refused(caplog):
    net = _tiny_unetr()
    before = copy.deepcopy(net.state_dict())
    with caplog.at_level(logging.WARNING, logger="dagman_components.weights.encoder_io"):
        assert init_swin_unetr(net, None) is net
    assert "pretrained_encoder is null" in caplog.text and "RANDOM" in caplog.text
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    for spelling in ("", "random", "None"):
        with pytest.raises(EncoderSettingError, match="config key 'pretrained_encoder'.*set it to null"):
            init_swin_unetr(net, spelling)


def test_wrong_weights_fail_loudly(tmp_path):
    net = _tiny_unetr()
    # missing file: names the file and the config key
    with pytest.raises(FileNotFoundError, match=r"absent.pt. \(config key 'pretrained_encoder'\) do not exist.*make demo"):
        init_swin_unetr(net, tmp_path / "absent.pt")
    # settings differ from the model card
    (tmp_path / "wide").mkdir()
    wide, _ = _export_tiny_encoder(tmp_path / "wide", embed_dim=24, num_heads=[3, 6, 12, 24])
    with pytest.raises(EncoderSettingError, match=r"embed_dim=12 contradicts embed_dim=24 in the model card '.*wide.model_card.json'"):
        load_swin_unetr_encoder(net, wide)
    # a deeper encoder without its card loads "completely" into the shallower net: refused
    (tmp_path / "deep").mkdir()
    deep, _ = _export_tiny_encoder(tmp_path / "deep", depths=[2, 2, 4, 2])
    os.remove(tmp_path / "deep" / "model_card.json")
    with pytest.raises(WeightLoadError, match=r"encoder tensors that the network has no place for.*layers3\.0\.blocks\.[23]"):
        load_swin_unetr_encoder(net, deep)
    # nothing of the encoder in the file
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}}, tmp_path / "other.pt")
    with pytest.raises(WeightLoadError, match=r"only 0 of"):
        load_swin_unetr_encoder(net, tmp_path / "other.pt")


# ------------------------------------------------------------------------------------------- datalists


def test_folder_pairs_match_by_name_and_name_the_unmatched(tmp_path):
    images, labels = tmp_path / "imagesTr", tmp_path / "labelsTr"
    images.mkdir(), labels.mkdir()
    for name in ("lung_001_0000.nii.gz", "lung_002.nii.gz"):
        (images / name).write_bytes(b"x")
    for name in ("lung_001.nii.gz", "lung_002.nii.gz", "._lung_002.nii.gz"):  # macOS junk is skipped
        (labels / name).write_bytes(b"x")
    items = build_segmentation_datalist(tmp_path)
    assert [(Path(i["image"]).name, Path(i["label"]).name) for i in items] == [
        ("lung_001_0000.nii.gz", "lung_001.nii.gz"), ("lung_002.nii.gz", "lung_002.nii.gz")]
    (images / "lung_003.nii.gz").write_bytes(b"x")
    (labels / "lung_009.nii.gz").write_bytes(b"x")
    with pytest.raises(DataSourceError, match=r"2 file\(s\)(.|\n)*lung_003.nii.gz has no label(.|\n)*lung_009.nii.gz has no image"):
        pair_folders(images, labels)


def test_lidc_sample_pairs_and_patient_split():
    items = build_segmentation_datalist(SAMPLE)
    assert len(items) == 24 and all(Path(i["image"]).name == Path(i["label"]).name for i in items)
    grouped = [dict(i, patient_id=f"p{n // 3}") for n, i in enumerate(items)]  # 8 patients of 3 crops
    train, val = split_by_group(grouped, 0.25, group_key="patient_id", seed=3)
    assert (len(train), len(val)) == (18, 6)
    assert not {i["patient_id"] for i in train} & {i["patient_id"] for i in val}
    assert split_by_group(grouped, 0.25, group_key="patient_id", seed=3) == (train, val)  # deterministic


def test_segmentation_split_reads_lists_or_splits(tmp_path):
    demo = BUNDLE / "configs" / "demo_datalist.json"
    train, val = segmentation_split(demo, "training"), segmentation_split(demo, "validation")
    assert (len(train), len(val)) == (18, 6)
    assert not {i["patient_id"] for i in train} & {i["patient_id"] for i in val}
    assert all(os.path.isfile(i["image"]) and os.path.isfile(i["label"]) for i in train + val)
    # an MSD-style dataset.json with 'training' only is split by the seed
    msd = {"training": [{"image": i["image"], "label": i["label"]} for i in train + val]}
    write_datalist(tmp_path / "dataset.json", msd)
    t2, v2 = (segmentation_split(tmp_path / "dataset.json", part, 0.25, seed=0) for part in ("training", "validation"))
    assert (len(t2), len(v2)) == (18, 6) and not {i["image"] for i in t2} & {i["image"] for i in v2}
    with pytest.raises(DataSourceError, match=r"no list 'test'"):
        segmentation_split(tmp_path / "dataset.json", "test")


def _script(name: str):
    """Import a script of scripts/ as a module (in process: no interpreter start-up)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_lidc_segmentation_set_script(tmp_path):
    out = tmp_path / "lidc" / "datalist.json"
    main = _script("make_lidc_segmentation_set").main
    assert main(["--source", str(SAMPLE), "--output", str(out), "--val_fraction", "0.25", "--test_fraction", "0.25"]) == 0
    content = json.loads(out.read_text())
    parts = {p: content[p] for p in ("training", "validation", "test")}
    assert [len(v) for v in parts.values()] == [12, 6, 6]
    patients = [{i["patient_id"] for i in v} for v in parts.values()]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    assert not os.path.isabs(parts["training"][0]["image"])  # portable: relative to the JSON
    assert len(segmentation_split(out, "test")) == 6
    malignant = sum(i["Malignancy_value"] >= 4 for v in parts.values() for i in v)
    assert malignant == 12  # the rows of nodules.csv travel with the items


def test_prepare_segmentation_datalist_from_msd_folder(tmp_path):
    task = tmp_path / "Task06_Lung"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task / sub).mkdir(parents=True)
    for n in range(5):
        _nifti(task / "imagesTr" / f"lung_{n:03d}.nii.gz", np.full((8, 8, 4), -500, np.int16))
        _nifti(task / "labelsTr" / f"lung_{n:03d}.nii.gz", (np.arange(256).reshape(8, 8, 4) % 2).astype(np.uint8))
    _nifti(task / "imagesTs" / "lung_100.nii.gz", np.zeros((8, 8, 4), np.int16))
    meta = {"labels": {"0": "background", "1": "cancer"},
            "training": [{"image": f"./imagesTr/lung_{n:03d}.nii.gz", "label": f"./labelsTr/lung_{n:03d}.nii.gz"}
                         for n in range(5)],
            "test": ["./imagesTs/lung_100.nii.gz"]}
    (task / "dataset.json").write_text(json.dumps(meta))
    out = tmp_path / "task06.json"
    main = _script("prepare_segmentation_datalist").main
    assert main(["--source", str(task), "--output", str(out), "--val_fraction", "0.4"]) == 0
    assert main(["--images", str(task / "imagesTr"), "--output", str(tmp_path / "x.json")]) == 1  # no --labels
    content = json.loads(out.read_text())
    assert (len(content["training"]), len(content["validation"]), len(content["test"])) == (3, 2, 1)
    assert content["labels"]["1"] == "cancer"
    assert len(segmentation_split(out, "training")) == 3 and len(segmentation_split(out, "test")) == 1


# ------------------------------------------------------------------------------------------- pair checks


def _pair(tmp_path: Path, label: np.ndarray, affine: np.ndarray | None = None) -> dict:
    image = _nifti(tmp_path / "ct.nii.gz", np.full((12, 12, 4), -600, np.int16))
    return {"image": str(image), "label": str(_nifti(tmp_path / "seg.nii.gz", label, affine))}


def test_pair_checks_name_both_files(tmp_path):
    good = _pair(tmp_path, np.zeros((12, 12, 4), np.uint8))
    validate_image_label_pairs([good])
    # shape mismatch
    shape = _pair(tmp_path, np.zeros((12, 12, 5), np.uint8))
    with pytest.raises(DataSourceError, match=r"image '.*ct.nii.gz' / label '.*seg.nii.gz': shapes differ "
                                              r"\(image \(12, 12, 4\), label \(12, 12, 5\)\)"):
        validate_image_label_pairs([shape])
    # corrupt label: a truncated gzip stream
    data = gzip.compress(nib.Nifti1Image(np.zeros((12, 12, 4), np.uint8), np.eye(4)).to_bytes())
    (tmp_path / "seg.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataSourceError, match=r"image '.*ct.nii.gz' / label '.*seg.nii.gz': the label .*(corrupt|truncated)"):
        validate_image_label_pairs([shape])
    # label values out of range, and a label on another grid
    values = _pair(tmp_path, np.full((12, 12, 4), 2, np.uint8))
    with pytest.raises(DataSourceError, match=r"seg.nii.gz': the label holds values \[2\] outside 0..1"):
        validate_image_label_pairs([values], num_classes=2)
    moved_affine = np.diag([0.7, 0.7, 2.5, 1.0])
    moved_affine[0, 3] = 5.0
    moved = _pair(tmp_path, np.zeros((12, 12, 4), np.uint8), moved_affine)
    with pytest.raises(DataSourceError, match=r"affines differ by up to 5 mm"):
        validate_image_label_pairs([moved])


# ------------------------------------------------------------------------------------------- post-processing


def test_postprocess_largest_component_and_holes():
    pred = torch.zeros(1, 9, 9, 9)
    pred[0, 1:6, 1:6, 1:6] = 1  # a 5^3 cube with a hole at its centre
    pred[0, 3, 3, 3] = 0
    pred[0, 8, 8, 8] = 1  # a single-voxel speck
    out = SegmentationPostprocessd("pred", largest_component=True, fill_holes=True, applied_labels=[1])({"pred": pred})
    assert out["pred"].sum().item() == 125 and out["pred"][0, 8, 8, 8] == 0 and out["pred"][0, 3, 3, 3] == 1
    same = SegmentationPostprocessd("pred")({"pred": pred})
    assert torch.equal(same["pred"], pred)
    # one-hot channels: the speck moves to the background channel, the hole is filled
    onehot = torch.cat([1 - pred, pred])
    out = SegmentationPostprocessd("pred", largest_component=True, fill_holes=True, applied_labels=[1])({"pred": onehot})
    assert out["pred"][1].sum().item() == 125 and out["pred"][0, 8, 8, 8] == 1
    assert torch.equal(out["pred"].sum(0), torch.ones(9, 9, 9))


# ------------------------------------------------------------------------------------------- configs


def _yaml(name: str) -> dict:
    with open(BUNDLE / "configs" / name) as f:
        return yaml.safe_load(f)


def test_inference_and_train_configs_agree():
    train, infer = _yaml("train.yaml"), _yaml("inference.yaml")
    for key in ("spacing", "hu_window", "roi_size", "in_channels", "num_classes", "embed_dim", "depths", "num_heads",
                "window_size", "patch_size", "sw_overlap", "keep_largest_component", "fill_holes"):
        assert train[key] == infer[key], key
    assert train["network_def"]["_target_"] == infer["network_def"]["_target_"] == "SwinUNETR"
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "tumour"}
    assert isinstance(train["train"]["handlers"], list)  # MONAI Label inserts a CheckpointLoader into it
    for key in ("max_epochs",):
        assert key in train["train"]["trainer"]
    assert "data" in train["train"]["dataset"] and "data" in train["validate"]["dataset"]


# ------------------------------------------------------------------------------------------- bundle runs


def _run_bundle(configs: list[str], bundle: Path, *overrides: str) -> subprocess.CompletedProcess:
    files = "[" + ",".join(f"'{bundle / 'configs' / c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--bundle_root", str(bundle),
           "--logging_file", str(bundle / "configs" / "logging.conf"), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=bundle.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_bundle_train_evaluate_inference_export(tmp_path):
    bundle = tmp_path / "dagman_lung_tumor_ct_segmentation"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    items = build_segmentation_datalist(SAMPLE)
    write_datalist(tmp_path / "data.json", {"training": items[:2], "validation": items[2:3], "test": items[3:5]})
    encoder_dir = tmp_path / "dagman_ct_pretraining" / "models"  # where the bundle looks by default
    encoder_dir.mkdir(parents=True)
    encoder_path, encoder = _export_tiny_encoder(encoder_dir)
    common = ["--dataset_dir", str(tmp_path / "data.json")]  # no network settings: they come from the model card

    # train: one epoch of two crops, validation at its end -> models/model.pt, a flat state dict
    result = _run_bundle(["train.yaml", "demo.yaml"], bundle, *common,
                         "--max_epochs", "1", "--val_interval", "1", "--batch_size", "1", "--num_samples", "1",
                         "--cache_rate", "0")
    log = result.stdout + result.stderr
    n_swin = len(_tiny_unetr().swinViT.state_dict())
    assert f"loaded {n_swin} tensors, missing 0" in log  # the whole tiny swinViT came from the DAGMaN encoder
    saved = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert "swinViT.patch_embed.proj.weight" in saved and all(isinstance(v, torch.Tensor) for v in saved.values())
    assert (bundle / "runs" / "training_curves.png").stat().st_size > 0
    # its model card: the encoder's settings, the weights it started from, its own sha256
    card = json.loads((bundle / "models" / "model_card.json").read_text())
    assert encoder_settings(card) == encoder_settings(encoder_dir / "model_card.json")
    assert card["encoder_weights"]["sha256"] == sha256_of(encoder_path)
    assert card["sha256"] == sha256_of(bundle / "models" / "model.pt")
    # from here on the trained bundle runs alone: its own card gives the tiny settings
    shutil.rmtree(tmp_path / "dagman_ct_pretraining")

    # evaluate in the images' own geometry: per-case CSV, summary and PNG
    _run_bundle(["train.yaml", "demo.yaml", "evaluate.yaml"], bundle, *common, "--num_workers", "0")
    name, dice = (bundle / "eval" / "metrics.csv").read_text().split()[0].split(",")
    assert name == "val_mean_dice" and 0.0 <= float(dice) <= 1.0
    assert (bundle / "eval" / "dice_per_case.png").stat().st_size > 0

    # inference (validation case + two test cases): masks with the input's affine and shape
    out = tmp_path / "masks"
    write_datalist(tmp_path / "infer.json", {"test": items[2:5]})
    _run_bundle(["inference.yaml"], bundle, "--dataset_dir", str(tmp_path / "infer.json"), "--output_dir", str(out),
                "--device", "cpu", "--num_workers", "0", "--cpu_bf16", "false")  # fp32, as the evaluation
    masks = []
    for item in items[2:5]:
        image = nib.load(item["image"])
        mask = nib.load(out / Path(item["image"]).name.replace(".nii.gz", "_seg.nii.gz"))
        assert mask.shape == image.shape
        np.testing.assert_allclose(mask.affine, image.affine, atol=1e-4)
        assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1}
        masks.append(np.asarray(mask.dataobj) > 0)
    # the evaluated Dice is the Dice of the saved mask against the stored label, by hand
    label = np.asarray(nib.load(items[2]["label"]).dataobj) > 0
    by_hand = 2 * (masks[0] & label).sum() / (masks[0].sum() + label.sum())
    assert float(dice) == pytest.approx(by_hand, abs=1e-5)

    # TorchScript by tracing at the ROI: same output as the eager network; metadata shapes verified
    from monai.bundle import ckpt_export, verify_net_in_out

    meta, infer = str(bundle / "configs" / "metadata.json"), str(bundle / "configs" / "inference.yaml")
    overrides = {"bundle_root": str(bundle)}
    verify_net_in_out("network_def", meta_file=meta, config_file=infer, device="cpu", **overrides)
    ts_path = tmp_path / "model.ts"
    ckpt_export("network_def", filepath=str(ts_path), ckpt_file=str(bundle / "models" / "model.pt"), meta_file=meta,
                config_file=infer, use_trace=True, input_shape=[1, 1, 64, 64, 32], **overrides)
    eager = _tiny_unetr()
    eager.load_state_dict(saved)
    eager.eval()
    scripted = torch.jit.load(str(ts_path))
    x = torch.rand(1, 1, 64, 64, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(scripted(x), eager(x))


# ------------------------------------------------------------------------------------------- handlers, comparison


def test_best_model_saver_writes_only_improvements(tmp_path):
    from ignite.engine import Engine

    from dagman_components.handlers import BestMetricSaver

    net = torch.nn.Linear(2, 1)
    saver = BestMetricSaver(tmp_path / "model.pt", net, key_metric_name="dice")
    engine = Engine(lambda e, b: None)
    for value, expect_saved in ((0.3, True), (0.2, False), (float("nan"), False), (0.5, True)):
        engine.state.metrics = {"dice": value}
        with torch.no_grad():
            net.weight.fill_(value)
        saver(engine)
        saved = torch.load(tmp_path / "model.pt", weights_only=True)
        assert set(saved) == {"weight", "bias"}  # a flat state dict
        if expect_saved:  # the file holds the weights of the last improvement, not of worse epochs
            assert saved["weight"][0, 0].item() == pytest.approx(value)
        else:
            assert saved["weight"][0, 0].item() == pytest.approx(0.3)
    assert saved["weight"][0, 0].item() == pytest.approx(0.5) and saver.best == 0.5
    # a checkpoint of a run before best_epoch was stored still resumes
    saver.load_state_dict({"best": 0.7})
    assert saver.best == 0.7 and saver.best_epoch == -1


def test_best_model_saver_lower_is_better_and_missing_metric(tmp_path):
    from ignite.engine import Engine

    from dagman_components.handlers import BestMetricSaver

    net = torch.nn.Linear(2, 1)
    saver = BestMetricSaver(tmp_path / "model.pt", net, key_metric_name="loss", greater_is_better=False)
    engine = Engine(lambda e, b: None)
    engine.state.metrics = {"loss": 2.0}
    saver(engine)
    engine.state.metrics = {"loss": 3.0}
    saver(engine)
    assert saver.best == 2.0 and (tmp_path / "model.pt").is_file()
    engine.state.metrics = {"dice": 1.0}
    with pytest.raises(KeyError, match="'loss' not in the evaluator's metrics"):
        saver(engine)


def test_rank_zero_policy_keeps_non_logging_handlers_on_every_rank(monkeypatch):
    from monai.handlers import StatsHandler

    from dagman_components.runtime.distributed import HandlerGroup
    from dagman_components.segmentation import logging_handler_types

    stats, other = StatsHandler(), object()
    group = HandlerGroup([other, stats], main_process_types=logging_handler_types())
    assert group.for_this_process() == [other, stats]  # rank 0 (no process group, no RANK)
    monkeypatch.setenv("RANK", "1")
    assert group.for_this_process() == [other]
    assert HandlerGroup(None, main_process_types=logging_handler_types()).for_this_process() == []
    assert HandlerGroup([other, stats], main_process_only=True).for_this_process() == []


def test_compare_script_pairs_cases_and_bootstraps_patients(tmp_path):
    module = _script("dagman_lung_tumor_ct_segmentation_compare")
    for run, values in (("a", [0.2, 0.4, 0.6, 0.8]), ("b", [0.3, 0.5, 0.6, 0.9])):
        (tmp_path / run).mkdir()
        rows = ["filename,class0,mean"] + [f"/x/LIDC-IDRI-000{i // 2}_R_{i}.nii.gz,{v},{v}" for i, v in enumerate(values)]
        (tmp_path / run / "val_mean_dice_raw.csv").write_text("\n".join(rows) + "\n")
    assert module.main(["--run", f"a={tmp_path / 'a'}", "--run", f"b={tmp_path / 'b'}", "--output", str(tmp_path / "c")]) == 0
    summary = json.loads((tmp_path / "c.json").read_text())
    assert (summary["cases"], summary["patients"]) == (4, 2)
    assert summary["runs"]["a"]["mean"] == pytest.approx(0.5)
    paired = summary["paired_vs_a"]["b"]
    assert paired["mean_difference"] == pytest.approx(0.075)
    low, high = paired["ci95_patient_bootstrap"]  # patient means of the differences: 0.1 and 0.05
    assert 0.05 - 1e-9 <= low <= 0.075 <= high <= 0.1 + 1e-9
    assert (tmp_path / "c.png").stat().st_size > 0


def test_train_config_refuses_bad_pair_before_training(tmp_path):
    from monai.bundle import ConfigWorkflow

    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    good = build_segmentation_datalist(SAMPLE)[:2]
    bad = _pair(tmp_path, np.zeros((12, 12, 5), np.uint8))  # label of another shape
    write_datalist(tmp_path / "data.json", {"training": [good[0], bad], "validation": [good[1]]})
    workflow = ConfigWorkflow(config_file=[str(bundle / "configs" / "train.yaml"), str(bundle / "configs" / "demo.yaml")],
                              workflow_type="train", bundle_root=str(bundle), dataset_dir=str(tmp_path / "data.json"),
                              pretrained_encoder=None, **{"train#dataset#cache_rate": 0})
    with pytest.raises(RuntimeError) as err:  # the config expression's error, caused by the check's
        workflow.initialize()
    assert isinstance(err.value.__cause__, DataSourceError)
    message = str(err.value.__cause__)
    assert "1 of 3 image/label pair(s)" in message and "ct.nii.gz' / label '" in message and "seg.nii.gz" in message
    assert [p.name for p in (bundle / "models").glob("*")] in ([], [".train.lock"])  # nothing but the lock
