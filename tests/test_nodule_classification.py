# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Tests of the lung-nodule classification components and bundle, on the 24 real LIDC crops of the repository."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.transforms import Compose
from sklearn.metrics import confusion_matrix, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

import dagman_components.classification as nc
from dagman_components.weights.encoder_io import EncoderSettingError, with_encoder_weights
from dagman_components.networks import ENCODER_DEFAULTS, DAGMaNPretrainNetwork, SwinDAGMaN
from dagman_components.weights.state_dict import WeightLoadError, sha256_of

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "lidc_nodules_sample"
CSV = SAMPLE / "nodules.csv"
IMAGES = SAMPLE / "image"
BUNDLE = REPO / "bundles" / "dagman_lung_nodule_ct_classification"
TINY = {"embed_dim": 12, "depths": (2, 2, 2, 2), "num_heads": (3, 3, 3, 3), "sa_heads": 4}
#: the same settings as bundle command-line overrides
TINY_ARGS = ["--embed_dim", "12", "--depths", "[2,2,2,2]", "--num_heads", "[3,3,3,3]", "--sa_heads", "4"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread per process: the tests run beside other work on 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _encoder(seed: int = 0) -> SwinDAGMaN:
    torch.manual_seed(seed)
    return SwinDAGMaN(**TINY)


def _items(n_patients: int = 30, seed: int = 0) -> list[dict]:
    """Synthetic labelled items: 1-3 nodules per patient, about a third malignant."""
    rng = np.random.default_rng(seed)
    items = []
    for p in range(n_patients):
        for k in range(int(rng.integers(1, 4))):
            items.append({"id": f"p{p}_{k}", "patient": f"p{p}", "label": int(rng.random() < 0.35), "image": "x"})
    return items


# ------------------------------------------------------------------------------------------------ table


def test_table_reads_the_sample_with_the_paper_rule():
    items = nc.read_nodule_table(CSV, IMAGES)
    df = pd.read_csv(CSV)
    assert len(items) == 24 and sum(it["label"] for it in items) == 12 == int((df.Malignancy_value >= 4).sum())
    assert items[0]["id"] == "LIDC-IDRI-0001_R_1" and items[0]["patient"] == "LIDC-IDRI-0001"
    assert all(os.path.isabs(it["image"]) and os.path.isfile(it["image"]) for it in items)
    assert [it["label"] for it in items] == (df.Malignancy_value >= 4).astype(int).tolist()


def test_table_diagnosis_rule_and_excluding_gap():
    df = pd.read_csv(CSV)
    rule = {"positive_values": ["Malign"], "negative_values": ["Benign"]}
    items = nc.read_nodule_table(CSV, IMAGES, label_column="Diagnosis", label_rule=rule)
    assert [it["label"] for it in items] == (df.Diagnosis == "Malign").astype(int).tolist()
    # threshold with a gap: the indeterminate score 3 is left out
    items = nc.read_nodule_table(CSV, IMAGES, label_rule={"positive_min": 4, "negative_max": 2})
    assert len(items) == int((df.Malignancy_value != 3).sum())


@pytest.mark.parametrize("rule", [
    {"positive_min": 3, "negative_max": 3},  # overlapping thresholds
    {"positive_min": 4, "positive_values": ["Malign"], "negative_values": ["Benign"]},  # both kinds
    {"positive_values": ["Malign"]},  # one class only
    {"threshold": 4},  # unknown key
])
def test_label_rule_rejects_bad_rules(rule):
    with pytest.raises(ValueError, match="label_rule"):
        nc.LabelRule.from_config(rule)


def _write_csv(tmp_path: Path, df: pd.DataFrame) -> Path:
    path = tmp_path / "nodules.csv"
    df.to_csv(path, index=False)
    return path


def test_table_errors_name_rows_and_columns(tmp_path):
    df = pd.read_csv(CSV).head(4)
    # missing images: every row listed with its CSV line
    bad = df.copy()
    bad.loc[[1, 3], "nodule_id"] = 99
    with pytest.raises(nc.NoduleTableError, match=r"(?s)2 of 4 row\(s\).*line 3 .*_R_99.*line 5 ") as e:
        nc.read_nodule_table(_write_csv(tmp_path, bad), IMAGES)
    assert "LIDC-IDRI-0003_R_99.nii.gz" in str(e.value)
    # the same nodule listed twice
    with pytest.raises(nc.NoduleTableError, match=r"(?s)listed twice.*LIDC-IDRI-0001_R_1.*lines \[2, 6\]"):
        nc.read_nodule_table(_write_csv(tmp_path, pd.concat([df, df.head(1)])), IMAGES)
    # unknown label column, named with the setting and the columns that exist
    with pytest.raises(nc.NoduleTableError, match=r"unknown column\(s\) 'Malignancy_score' \(from label_column\).*Diagnosis"):
        nc.read_nodule_table(_write_csv(tmp_path, df), IMAGES, label_column="Malignancy_score")
    # an empty label cell
    empty = df.copy()
    empty.loc[2, "Malignancy_value"] = np.nan
    with pytest.raises(nc.NoduleTableError, match=r"line 4 \(LIDC-IDRI-0007_R_1\): Malignancy_value"):
        nc.read_nodule_table(_write_csv(tmp_path, empty), IMAGES)


# ------------------------------------------------------------------------------------------------ splits


def test_folds_keep_patients_apart_and_partition_the_cases():
    items = _items()
    labels, groups = [it["label"] for it in items], [it["patient"] for it in items]
    folds = nc.grouped_stratified_folds(labels, groups, n_folds=3, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(items)))
    patients = [{groups[i] for i in f} for f in folds]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])


def test_cv_split_is_patient_disjoint_and_few_shot_is_nested():
    items = _items()
    all_ids = {it["id"] for it in items}
    for fold in range(3):
        s = nc.cv_split(items, n_folds=3, fold=fold, val_fraction=0.25, seed=1)
        sets = {k: {it["patient"] for it in v} for k, v in s.items()}
        assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
        assert {it["id"] for v in s.values() for it in v} == all_ids
        quarter = nc.cv_split(items, n_folds=3, fold=fold, val_fraction=0.25, few_shot_fraction=0.25, seed=1)
        half = nc.cv_split(items, n_folds=3, fold=fold, val_fraction=0.25, few_shot_fraction=0.5, seed=1)
        q, h, full = ({it["id"] for it in x["train"]} for x in (quarter, half, s))
        assert q < h < full  # nested, strictly smaller
        assert quarter["val"] == s["val"] and quarter["test"] == s["test"]  # same validation and test
        for cls in (0, 1):  # each class's share is at least the fraction
            n_cls = sum(it["label"] == cls for it in s["train"])
            assert sum(it["label"] == cls for it in quarter["train"]) >= 0.25 * n_cls
        kept = {it["patient"] for it in quarter["train"]}
        assert all(it["id"] in q for it in s["train"] if it["patient"] in kept)  # whole patients


def test_split_errors():
    items = _items()
    single = [dict(it, label=0) for it in items]
    with pytest.raises(nc.SplitError, match=r"the train \(fold 0 of 3.*30 nodule\(s\), 0 malignant"):
        nc.cv_split(single, n_folds=3, fold=0)
    with pytest.raises(nc.SplitError, match="fold must be in 0..2"):
        nc.cv_split(items, n_folds=3, fold=3)
    with pytest.raises(nc.SplitError, match="both in the test table"):
        nc.cv_split(items, n_folds=3, fold=0, test_items=items[:4])
    w = nc.balanced_class_weights([{"label": 0}] * 3 + [{"label": 1}])
    assert torch.allclose(w, torch.tensor([4 / 6, 4 / 2]))


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) * 0.6 + 0.3 * y, 2)  # rounded: many ties
    assert nc.roc_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert nc.roc_auc(torch.tensor(s), torch.tensor(y)) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, thr = nc.roc_curve(s, y)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    t = nc.youden_threshold(s, y)
    assert t == sk_thr[1:][np.argmax((sk_tpr - sk_fpr)[1:])]
    tn, fp, fn, tp = confusion_matrix(y, (s >= t).astype(int)).ravel()
    assert nc.sensitivity_specificity(s, y, t) == pytest.approx((tp / (tp + fn), tn / (tn + fp)))


def test_bootstrap_interval_reproduces_a_hand_computed_one():
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(15, int), np.ones(10, int)]
    s = rng.random(25) + 0.3 * y
    low, high = nc.bootstrap_ci(s, y, nc.roc_auc, n_boot=200, seed=7)
    draw, values = np.random.default_rng(7), []
    while len(values) < 200:
        idx = draw.integers(0, 25, size=25)
        if len(set(y[idx])) == 2:
            values.append(roc_auc_score(y[idx], s[idx]))
    assert (low, high) == pytest.approx(tuple(np.percentile(values, [2.5, 97.5])))
    report = nc.binary_report(s, y, threshold=0.6, n_boot=100)
    assert report["auc"]["ci95"][0] <= report["auc"]["value"] <= report["auc"]["ci95"][1]
    assert report["n"] == 25 and report["n_malignant"] == 10
    with pytest.raises(ValueError, match="only one class"):
        nc.roc_auc([0.1, 0.2], [1, 1])


# ------------------------------------------------------------------------------------------------ cropping


def _synthetic_volume(tmp_path: Path) -> tuple[Path, np.ndarray, tuple[int, int, int]]:
    """A 60x60x24 volume at 0.7 x 0.7 x 2.5 mm (axes flipped like DICOM), air with a bright blob."""
    data = np.full((60, 60, 24), -1000, np.int16)
    blob = (20, 41, 9)
    data[blob[0] - 2: blob[0] + 3, blob[1] - 2: blob[1] + 3, blob[2] - 1: blob[2] + 2] = 400
    affine = np.array([[-0.7, 0, 0, 30.0], [0, -0.7, 0, 12.0], [0, 0, 2.5, -200.0], [0, 0, 0, 1]])  # RAS
    path = tmp_path / "1.2.3.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path, affine, blob


def test_world_point_crop_centres_the_nodule(tmp_path):
    path, affine, blob = _synthetic_volume(tmp_path)
    ras = (affine @ np.r_[blob, 1.0])[:3]
    lps = ras * np.array([-1, -1, 1])
    np.testing.assert_allclose(nc.world_to_voxel(lps, affine, "LPS"), blob, atol=1e-9)
    near_edge = (affine @ np.r_[2, 2, 1, 1.0])[:3] * np.array([-1, -1, 1])
    pd.DataFrame({"seriesuid": ["1.2.3", "1.2.3"], "coordX": [lps[0], near_edge[0]], "coordY": [lps[1], near_edge[1]],
                  "coordZ": [lps[2], near_edge[2]], "label": [1, 0]}).to_csv(tmp_path / "c.csv", index=False)
    items = nc.read_nodule_table(tmp_path / "c.csv", tmp_path, id_column="{seriesuid}_{row}", patient_column="seriesuid",
                                 label_column="label", label_rule={"positive_min": 1, "negative_max": 0},
                                 image_template="{seriesuid}.nii.gz", center_columns=["coordX", "coordY", "coordZ"])
    assert [it["id"] for it in items] == ["1.2.3_2", "1.2.3_3"]
    pre = Compose(nc.nodule_preprocessing(center_key="center", coordinate_system="LPS"))
    out = pre(items[0])["image"]
    assert tuple(out.shape) == (1, 32, 32, 32)
    centroid = np.argwhere(out[0].numpy() > 0.5).mean(axis=0)
    np.testing.assert_allclose(centroid, [16, 16, 16], atol=0.6)  # the 3.5 x 3.5 x 7.5 mm blob sits at the centre
    assert float(out[0, 15:18, 15:18, 14:19].min()) > 0.9 and float(out[0, :8].max()) == 0.0
    edge = pre(items[1])["image"]  # mostly outside the image: padded, still 32^3
    assert tuple(edge.shape) == (1, 32, 32, 32) and float(edge[0, :8, :8].max()) == 0.0
    # the same point read as RAS lies outside this volume: a clear error
    bad = Compose(nc.nodule_preprocessing(center_key="center", coordinate_system="RAS"))
    with pytest.raises(RuntimeError) as e:  # MONAI wraps it: "applying transform ..." from the ValueError
        bad(items[0])
    assert "outside image" in str(e.value.__cause__) and "coordinate_system" in str(e.value.__cause__)


def test_luna16_style_metaimage_with_itk_world_coordinates(tmp_path):
    """LUNA16: a .mhd volume and a centre in ITK's physical (LPS) space, computed by ITK itself."""
    itk = pytest.importorskip("itk")
    arr = np.full((24, 60, 60), -1000, np.int16)  # ITK arrays are z, y, x
    blob = (20, 41, 9)  # x, y, z index
    arr[blob[2] - 1: blob[2] + 2, blob[1] - 2: blob[1] + 3, blob[0] - 2: blob[0] + 3] = 400
    image = itk.image_from_array(arr)
    image.SetSpacing([0.7, 0.7, 2.5])
    image.SetOrigin([-120.0, -90.0, -300.0])
    itk.imwrite(image, str(tmp_path / "1.3.6.mhd"))
    x, y, z = image.TransformIndexToPhysicalPoint(list(blob))
    pd.DataFrame({"seriesuid": ["1.3.6"], "coordX": [x], "coordY": [y], "coordZ": [z], "malignant": [1]}).to_csv(
        tmp_path / "annotations.csv", index=False)
    items = nc.read_nodule_table(tmp_path / "annotations.csv", tmp_path, id_column="{seriesuid}_{row}",
                                 patient_column="seriesuid", label_column="malignant",
                                 label_rule={"positive_min": 1, "negative_max": 0}, image_template="{seriesuid}.mhd",
                                 center_columns=["coordX", "coordY", "coordZ"])
    out = Compose(nc.nodule_preprocessing(center_key="center"))(items[0])["image"]
    np.testing.assert_allclose(np.argwhere(out[0].numpy() > 0.5).mean(axis=0), [16, 16, 16], atol=0.6)


def test_crop_preprocessing_of_real_nodules():
    items = nc.read_nodule_table(CSV, IMAGES)[:2]
    out = Compose(nc.nodule_preprocessing())(items[0])["image"]
    assert tuple(out.shape) == (1, *nc.NODULE_ROI) and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    np.testing.assert_allclose(np.abs(np.diag(np.asarray(out.affine))[:3]), nc.NODULE_SPACING)
    # the LIDC table's world centres are LPS: they fall at the centre of the (nodule-centred) crops
    for it in nc.read_nodule_table(CSV, IMAGES, center_columns=["coordX", "coordY", "coordZ"]):
        crop = nib.load(it["image"])
        offset = nc.world_to_voxel(it["center"], crop.affine, "LPS") - (np.array(crop.shape) - 1) / 2
        assert np.abs(offset * np.array(crop.header.get_zooms())).max() < 5.0, it["id"]  # mm


# ------------------------------------------------------------------------------------------------ network


def test_linear_probe_freezes_the_encoder_and_keeps_it_in_eval_mode():
    net = nc.NoduleClassifier(_encoder(), mode="linear_probe")
    net.train()
    assert not net.encoder.training and net.head.training
    assert not any(p.requires_grad for p in net.encoder.parameters())
    groups = nc.classifier_param_groups(net, lr=1e-3)
    assert sum(len(g["params"]) for g in groups) == 2  # head weight and bias only (its norm has no parameters)
    x = torch.rand(2, 1, 32, 32, 32)
    net(x).sum().backward()
    assert all(p.grad is None for p in net.encoder.parameters()) and net.head.fc.weight.grad is not None
    net.set_mode("finetune")
    net.train()
    assert net.encoder.training and all(p.requires_grad for p in net.encoder.parameters() if p.ndim)
    glob = nc.NoduleClassifier(_encoder(), token="global")
    assert glob.head.fc.in_features == glob.encoder.out_dim and net.head.fc.in_features == net.encoder.sa_dim
    with pytest.raises(ValueError, match="linear_probe"):
        nc.NoduleClassifier(_encoder(), mode="linear_prob")


def test_training_plan_decides_every_mode_dependent_part():
    """One component decides what `mode` changes: the items, the trained module, the loader workers, the
    augmentation and the probe head init; evaluation and inference run the whole model on images."""
    from monai.data import Dataset
    from monai.transforms import Lambdad

    from dagman_components.data import SeededItems
    from dagman_components.features.frozen_features import FrozenFeatureDataset

    torch.manual_seed(0)
    images = [{"image": torch.rand(1, 32, 32, 32), "label": i % 2} for i in range(4)]
    dataset = Dataset(images, transform=Compose([Lambdad("image", lambda x: x)]))
    prep = [Lambdad("image", lambda x: x)]
    net = nc.NoduleClassifier(_encoder(), mode="linear_probe")
    probe = nc.TrainingPlan("linear_probe", token="cls", num_workers=3, augment=True)
    assert probe.cached_features and probe.trained_module(net) is net.head and probe.item_workers == 0
    assert not probe.probe_head_init and probe.train_transforms(prep) == prep  # embedded once, unaugmented
    items = probe.train_items(dataset, net)
    assert isinstance(items, FrozenFeatureDataset) and len(items) == 4
    assert items.features[0].shape == (4, net.encoder.sa_dim)
    assert isinstance(probe.validation_items(dataset, net), FrozenFeatureDataset)
    tune = nc.TrainingPlan("finetune", num_workers=3, augment=True)
    assert not tune.cached_features and tune.trained_module(net) is net and tune.item_workers == 3 and tune.probe_head_init
    assert len(tune.train_transforms(prep)) == 1 + len(nc.nodule_augmentation())
    assert isinstance(tune.train_items(dataset, net), SeededItems) and tune.validation_items(dataset, net) is dataset
    assert nc.TrainingPlan("finetune", augment=False, head_init="random").train_transforms(prep) == prep
    assert not nc.TrainingPlan("finetune", head_init="random").probe_head_init
    evaluation = nc.TrainingPlan("linear_probe", run_on_images=True)
    assert evaluation.trained_module(net) is net and evaluation.validation_items(dataset, net) is dataset
    with pytest.raises(ValueError, match="mode must be one of"):
        nc.TrainingPlan("linear_prob")
    with pytest.raises(ValueError, match="head_init"):
        nc.TrainingPlan("finetune", head_init="zeros")


def test_attention_overlay_has_the_input_shape_and_sums_to_one():
    net = nc.NoduleClassifier(_encoder()).eval()
    x = torch.rand(2, 1, 32, 64, 32)
    att = net.attention_map(x)
    assert att.shape == x.shape
    np.testing.assert_allclose(att.sum(dim=(1, 2, 3, 4)).numpy(), [1.0, 1.0], rtol=1e-5)
    s_att = net.encoder(x)["s_att"]  # (2, 2*4*2) on the SA grid, one cell = 16^3 voxels
    cell = att[:, 0, 16:32, 32:48, 0:16]
    assert torch.allclose(cell.mean(), s_att[:, 1 * 8 + 2 * 2 + 0].mean() / 16**3, rtol=1e-5)


def test_loading_a_pretraining_checkpoint_changes_the_encoder(tmp_path, caplog):
    pre = DAGMaNPretrainNetwork(_encoder(seed=1), out_dim=16, hidden_dim=8, bottleneck_dim=4)
    path = tmp_path / "checkpoint.pt"
    torch.save({"student": pre.state_dict(), "teacher": pre.state_dict()}, path)
    net = nc.NoduleClassifier(_encoder(seed=0))

    def load(network, weights):  # what train.yaml's network line does
        return with_encoder_weights(network, weights, key="pretrained_path", key_prefix="encoder.")

    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert load(net, path) is net
    after = net.state_dict()
    source = pre.encoder.state_dict()
    differed = [k for k, v in source.items() if not torch.equal(before[f"encoder.{k}"], v)]
    assert len(differed) > 60  # every randomly initialised tensor (norms and zero-initialised ones coincide)
    assert all(torch.equal(after[f"encoder.{k}"], v) for k, v in source.items())
    assert torch.equal(before["head.fc.weight"], after["head.fc.weight"])
    with pytest.raises(FileNotFoundError, match=r"missing.pt' \(config key 'pretrained_path'\) do not exist yet.*make demo"):
        load(net, tmp_path / "missing.pt")
    torch.save(SwinDAGMaN(embed_dim=24, depths=(2, 2, 2, 2), num_heads=(3, 3, 3, 3), sa_heads=4).state_dict(), path)
    with pytest.raises(WeightLoadError, match="another architecture"):
        load(net, path)
    with caplog.at_level(logging.WARNING):
        assert load(net, None) is net
        assert load(net, "null") is net  # --pretrained_path null on the command line
    assert "RANDOM" in caplog.text
    for spelling in ("", "random", "none", "None"):  # one spelling of random: null
        with pytest.raises(EncoderSettingError, match="config key 'pretrained_path'.*set it to null"):
            load(net, spelling)


# ------------------------------------------------------------------------------------------------ bundle


def _copy_bundle(parent: Path) -> Path:
    bundle = parent / "dagman_lung_nodule_ct_classification"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("models", "eval"))
    (bundle / "models").mkdir()
    return bundle


def _cli_run(bundle: Path, configs: list[str], *args: str) -> None:
    """``python -m monai.bundle run`` in a subprocess on the sample, with the tiny encoder."""
    files = "[" + ",".join(f"'{bundle / 'configs' / c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--bundle_root", str(bundle),
           "--dataset_dir", str(SAMPLE), "--num_workers", "0", "--batch_size", "4", *TINY_ARGS, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=bundle.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _run(bundle: Path, configs: list[str], tiny_encoder: bool = True, **overrides) -> None:
    """The same ``monai.bundle run`` entry point in this process (no interpreter start-up); the bundle's
    logging.conf is not applied so that pytest keeps its log capture. ``tiny_encoder=False``: no encoder
    settings are passed (they must come from a model card)."""
    from monai.bundle import run

    tiny = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()} if tiny_encoder else {}
    run(config_file=[str(bundle / "configs" / c) for c in configs], logging_file=False, bundle_root=str(bundle),
        dataset_dir=str(SAMPLE), num_workers=0, batch_size=4, **tiny, **overrides)


@pytest.fixture(scope="module")
def trained_bundle(tmp_path_factory):
    """A copy of the bundle trained for one epoch (fine-tuning, random init) on the sample, from the command line."""
    bundle = _copy_bundle(tmp_path_factory.mktemp("b"))
    _cli_run(bundle, ["train.yaml"], "--pretrained_path", "null", "--max_epochs", "1")
    return bundle


@pytest.mark.slow
def test_train_then_evaluate(trained_bundle):
    info = json.loads((trained_bundle / "models" / "threshold.json").read_text())
    assert info["n_val"] >= 2 and 0.0 <= info["threshold"] <= 1.0
    assert not (trained_bundle / "models" / ".staging").exists()
    assert (trained_bundle / "eval" / "training_curves.png").stat().st_size > 1000
    # the model card written with model.pt: the encoder settings it was built with, random start, its sha256
    card = json.loads((trained_bundle / "models" / "model_card.json").read_text())
    assert card["network"] == {"class": "dagman_components.networks.SwinDAGMaN", **ENCODER_DEFAULTS,
                               "embed_dim": 12, "depths": [2, 2, 2, 2], "num_heads": [3, 3, 3, 3], "sa_heads": 4}
    assert card["encoder_weights"] == "random" and card["model"]["mode"] == "finetune"
    assert card["sha256"] == sha256_of(trained_bundle / "models" / "model.pt") == info["model_sha256"]
    assert card["selected_by"]["val_auc"] == pytest.approx(info["val_auc"]) and card["selected_by"]["epoch"] == 1
    _run(trained_bundle, ["train.yaml", "evaluate.yaml"], tiny_encoder=False, n_boot=50)  # settings from the card
    report = json.loads((trained_bundle / "eval" / "test_metrics.json").read_text())
    pred = pd.read_csv(trained_bundle / "eval" / "test_predictions.csv")
    assert report["n"] == len(pred) == 8 and report["threshold"] == info["threshold"]  # fold 0 of 3 on 24 patients
    assert report["auc"]["value"] == pytest.approx(roc_auc_score(pred.label, pred.probability_malignant), abs=1e-5)
    assert (pred.prediction == (pred.probability_malignant >= info["threshold"]).astype(int)).mean() >= 0.99
    assert (trained_bundle / "eval" / "test_roc.png").stat().st_size > 1000


@pytest.mark.slow
def test_inference_writes_probabilities_and_attention(trained_bundle, tmp_path):
    pd.read_csv(CSV).head(2).drop(columns=["Malignancy_value"]).to_csv(tmp_path / "new.csv", index=False)
    _run(trained_bundle, ["train.yaml", "infer.yaml"], tiny_encoder=False, infer_source=str(tmp_path / "new.csv"),
         infer_image_dir=str(IMAGES), infer_dir=str(tmp_path / "out"))
    pred = pd.read_csv(tmp_path / "out" / "inference_predictions.csv")
    assert pred.id.tolist() == ["LIDC-IDRI-0001_R_1", "LIDC-IDRI-0003_R_2"] and pred.label.isna().all()
    assert pred.probability_malignant.between(0, 1).all() and set(pred.prediction) <= {0, 1}
    att = nib.load(str(tmp_path / "out" / "LIDC-IDRI-0001_R_1_attention.nii.gz"))
    img = nib.load(str(tmp_path / "out" / "LIDC-IDRI-0001_R_1_input.nii.gz"))
    assert att.shape == img.shape == nc.NODULE_ROI and np.allclose(att.affine, img.affine)
    assert float(att.get_fdata().sum()) == pytest.approx(1.0, abs=1e-4)
    assert (tmp_path / "out" / "LIDC-IDRI-0001_R_1_attention.png").is_file()


@pytest.mark.slow
def test_verify_net_in_out_and_traced_export_equals_eager(trained_bundle):
    from monai.bundle import ckpt_export, verify_net_in_out

    configs = [str(trained_bundle / "configs" / c) for c in ("train.yaml", "infer.yaml")]
    overrides = {"embed_dim": 12, "depths": [2, 2, 2, 2], "num_heads": [3, 3, 3, 3], "sa_heads": 4,
                 "bundle_root": str(trained_bundle)}
    meta = str(trained_bundle / "configs" / "metadata.json")
    verify_net_in_out("network_def", meta_file=meta, config_file=configs, device="cpu", **overrides)
    ts = trained_bundle / "models" / "model.ts"
    ckpt_export("network_def", filepath=str(ts), ckpt_file=str(trained_bundle / "models" / "model.pt"),
                meta_file=meta, config_file=configs, use_trace=True, input_shape=[1, 1, 32, 32, 32], **overrides)
    exported = torch.jit.load(str(ts))
    net = nc.NoduleClassifier(_encoder(), mode="finetune")
    net.load_state_dict(torch.load(trained_bundle / "models" / "model.pt", weights_only=True))
    net.eval()
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(exported(x), net(x))


@pytest.mark.slow
def test_linear_probe_run_keeps_the_pretrained_encoder(tmp_path):
    """train.yaml in linear_probe mode (in this process: same parser and expressions as ``monai.bundle run``)."""
    from monai.bundle import ConfigParser

    pretrained = _encoder(seed=3)
    torch.save(pretrained.state_dict(), tmp_path / "model.pt")
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.yaml"))
    parser.update({"bundle_root": str(tmp_path), "dataset_dir": str(SAMPLE), "pretrained_path": str(tmp_path / "model.pt"),
                   "mode": "linear_probe", "max_epochs": 1, "few_shot_fraction": 0.5, "num_workers": 0, "batch_size": 4,
                   "device": "$torch.device('cpu')", **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}})
    (tmp_path / "models").mkdir()
    parser.get_parsed_content("initialize")
    head_before = parser.get_parsed_content("network").head.fc.weight.detach().clone()
    parser.get_parsed_content("run")
    parser.get_parsed_content("finalize")
    trained = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(trained[f"encoder.{k}"], v) for k, v in pretrained.state_dict().items())
    assert not torch.equal(trained["head.fc.weight"], head_before)


@pytest.mark.slow
def test_bundle_linear_probe_agrees_with_scikit_learn_and_runs_as_a_whole_model(tmp_path):
    """mode: linear_probe on the shipped crops: the head is scikit-learn's balanced logistic regression on the
    standardised frozen features (test AUC within 0.02, probabilities equal), and evaluation and inference,
    which run the whole saved model on the images, give the same probabilities."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pretrained = _encoder(seed=3)
    torch.save(pretrained.state_dict(), tmp_path / "model.pt")
    bundle = _copy_bundle(tmp_path / "b")
    _run(bundle, ["train.yaml"], pretrained_path=str(tmp_path / "model.pt"), mode="linear_probe", probe_Cs=[0.1, 1.0])
    _run(bundle, ["train.yaml", "evaluate.yaml"], mode="linear_probe", n_boot=10)
    _run(bundle, ["train.yaml", "infer.yaml"], mode="linear_probe", infer_source=str(IMAGES), save_attention=False)
    info = json.loads((bundle / "models" / "threshold.json").read_text())
    bundle_auc = json.loads((bundle / "eval" / "test_metrics.json").read_text())["auc"]["value"]
    tested = pd.read_csv(bundle / "eval" / "test_predictions.csv", dtype={"id": str})

    # the same split, preprocessing and encoder, then scikit-learn on the training features
    items = nc.read_nodule_table(SAMPLE / "nodules.csv", image_dir=IMAGES)
    splits = nc.cv_split(items, n_folds=3, fold=0, val_fraction=0.2, few_shot_fraction=1.0, seed=0)
    pre = Compose(nc.nodule_preprocessing(track_meta=False))
    pretrained.eval()

    def features(part):
        with torch.no_grad():
            x = torch.stack([torch.as_tensor(pre(dict(it))["image"]) for it in splits[part]]).float()
            return pretrained(x)["cls"].double().numpy(), np.array([it["label"] for it in splits[part]])

    (x_train, y_train), (x_val, y_val), (x_test, y_test) = features("train"), features("val"), features("test")
    chosen = {}
    for C in (0.1, 1.0):
        sk = make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced", tol=1e-10, max_iter=10000))
        sk.fit(x_train, y_train)
        chosen[C] = (roc_auc_score(y_val, sk.predict_proba(x_val)[:, 1]), sk)
    best_C = max(chosen, key=lambda c: (chosen[c][0], -c))  # ties: the first (stronger) C, as the bundle
    sk = chosen[best_C][1]
    assert info["val_auc"] == pytest.approx(chosen[best_C][0], abs=1e-6)
    sk_test = sk.predict_proba(x_test)[:, 1]
    assert bundle_auc == pytest.approx(roc_auc_score(y_test, sk_test), abs=0.02)
    ids = [str(it["id"]) for it in splits["test"]]
    np.testing.assert_allclose(tested.set_index("id").loc[ids, "probability_malignant"], sk_test, atol=0.01)  # float32 model
    inferred = pd.read_csv(bundle / "eval" / "inference" / "inference_predictions.csv", dtype={"id": str})
    assert len(inferred) == 24
    merged = inferred.merge(tested, on="id", suffixes=("", "_test"))
    np.testing.assert_allclose(merged.probability_malignant, merged.probability_malignant_test, atol=1e-6)
    weights = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(weights[f"encoder.{k}"], v) for k, v in pretrained.state_dict().items())


@pytest.mark.slow
def test_multi_gpu_config_runs_under_a_process_group(tmp_path, monkeypatch):
    """multi_gpu_train.yaml with a one-process gloo group (what torchrun sets up per process): DDP wrapper,
    DistributedSampler, rank-0 publishing and the group's teardown."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    bundle = _copy_bundle(tmp_path)
    _run(bundle, ["train.yaml", "multi_gpu_train.yaml"], pretrained_path="null", max_epochs=1)
    assert not torch.distributed.is_initialized()
    assert (bundle / "models" / "model.pt").is_file() and (bundle / "models" / "threshold.json").is_file()
    assert "module.encoder.patch_embed.proj.weight" not in torch.load(bundle / "models" / "model.pt", weights_only=True)


def test_best_saver_publishes_only_when_finished(tmp_path):
    from types import SimpleNamespace

    from dagman_components.handlers import BestMetricSaver

    net = nc.NoduleClassifier(_encoder())
    collector = nc.ScoreCollector()
    collector.scores, collector.labels = [0.2, 0.8, 0.6, 0.1], [0, 1, 1, 0]
    model, threshold = tmp_path / "model.pt", tmp_path / "threshold.json"
    model.write_text("weights of an earlier run")
    saver = BestMetricSaver(model, net, key_metric_name="val_auc", publish_at_end=True,
                            companions=[nc.ValidationThreshold(collector, threshold)])
    saver(SimpleNamespace(state=SimpleNamespace(metrics={"val_auc": 1.0}, epoch=3)))
    assert model.read_text() == "weights of an earlier run" and not threshold.exists()  # a failed run stops here
    saver.publish()
    info = nc.load_threshold(threshold, model)
    assert info["threshold"] == 0.6 and info["epoch"] == 3 and info["val_sensitivity"] == 1.0
    assert info["val_auc"] == 1.0 and not (tmp_path / ".staging").exists()
    assert set(torch.load(model, weights_only=True)) == set(net.state_dict())  # a flat state dict
    torch.save({"other": torch.zeros(1)}, model)
    with pytest.raises(ValueError, match="another model"):
        nc.load_threshold(threshold, model)


def test_bundle_metadata_is_valid():
    import jsonschema

    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    schema = json.loads((REPO / "schemas" / "meta_schema_20240725.json").read_text())
    jsonschema.validate(meta, schema)
    assert meta["version"] in meta["changelog"]
    assert set(meta["network_data_format"]["inputs"]) == {"image"}
    assert set(meta["network_data_format"]["outputs"]) == {"pred"}


def test_report_writer_threshold_optional_for_inference_and_required_otherwise(tmp_path):
    """Inference on weights shared without threshold.json writes probabilities with an empty prediction column;
    evaluation without the file stops, naming it."""
    from types import SimpleNamespace

    collector = SimpleNamespace(ids=["a", "b"], scores=[0.2, 0.9], labels=[], has_labels=False)
    missing = tmp_path / "threshold.json"
    nc.ClassificationReportWriter(collector, tmp_path, threshold_path=missing, name="inference",
                                  threshold_optional=True)()
    rows = (tmp_path / "inference_predictions.csv").read_text().splitlines()
    assert rows == ["id,probability_malignant,prediction,label", "a,0.200000,,", "b,0.900000,,"]
    with pytest.raises(FileNotFoundError, match="threshold.json"):
        nc.ClassificationReportWriter(collector, tmp_path, threshold_path=missing, name="test")()
    missing.write_text(json.dumps({"threshold": 0.5}))
    nc.ClassificationReportWriter(collector, tmp_path, threshold_path=missing, name="inference",
                                  threshold_optional=True)()
    assert (tmp_path / "inference_predictions.csv").read_text().splitlines()[1:] == ["a,0.200000,0,", "b,0.900000,1,"]
