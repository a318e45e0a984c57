# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Tests of dagman_components.clustering, scripts/make_organ_crops.py and the organ clustering bundle."""

from __future__ import annotations

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
from conftest import DATA, REPO, TINY_ENCODER

from dagman_components.clustering import (
    ORGANMNIST3D_LABELS,
    OrganDataError,
    OrganFeatureExtractor,
    cluster_distances,
    cut_organ_crops,
    extract_crop,
    find_structures,
    kmeans_agreement,
    knn_cv_accuracy,
    load_organ_npz,
    normalise_features,
    save_organ_npz,
    silhouette,
)
from dagman_components.weights.encoder_io import EncoderSettingError, build_encoder, prepare_encoder
from dagman_components.weights.state_dict import export_encoder

BUNDLE = REPO / "bundles" / "dagman_organ_ct_clustering"
SAMPLE = BUNDLE / "sample_data" / "organ_crops_totalseg_28.npz"
SCRIPT = REPO / "scripts" / "make_organ_crops.py"
TOTALSEG = DATA / "totalseg_example"

# ------------------------------------------------------------------------------------------------ metrics

# three classes in 2D, worked by hand:
#   class 0: (0,0), (2,0)          centroid (1,0)   distances 1, 1     -> intra 1
#   class 1: (10,0), (10,4)        centroid (10,2)  distances 2, 2     -> intra 2
#   class 2: (0,10), (0,12), (0,14) centroid (0,12) distances 2, 0, 2  -> intra 4/3
#   centroid pairs: |(1,0)-(10,2)| = sqrt(85), |(1,0)-(0,12)| = sqrt(145), |(10,2)-(0,12)| = sqrt(200)
HAND_X = np.array([[0, 0], [2, 0], [10, 0], [10, 4], [0, 10], [0, 12], [0, 14]], dtype=float)
HAND_Y = np.array([0, 0, 1, 1, 2, 2, 2])


def test_cluster_distances_match_hand_computation():
    d = cluster_distances(HAND_X, HAND_Y)
    np.testing.assert_allclose(d.intra, [1.0, 2.0, 4.0 / 3.0])
    assert d.intra_mean == pytest.approx(13.0 / 9.0)
    assert d.intra_std == pytest.approx(np.sqrt(((1 - 13 / 9) ** 2 + (2 - 13 / 9) ** 2 + (4 / 3 - 13 / 9) ** 2) / 3))
    pairs = [np.sqrt(85.0), np.sqrt(145.0), np.sqrt(200.0)]
    np.testing.assert_allclose(sorted(d.inter_pairs), sorted(pairs))
    assert d.inter_mean == pytest.approx(np.mean(pairs))
    assert d.inter_std == pytest.approx(np.std(pairs))
    assert d.inter[0, 1] == d.inter[1, 0] == pytest.approx(np.sqrt(85.0)) and np.all(np.diag(d.inter) == 0)
    assert d.separation == pytest.approx(np.mean(pairs) / (13.0 / 9.0))


def test_cluster_distances_ignore_label_values_and_order():
    # the same points with labels renamed and rows shuffled give the same numbers
    perm = np.random.default_rng(0).permutation(len(HAND_Y))
    d = cluster_distances(HAND_X[perm], np.array([7, 3, 11])[HAND_Y][perm])
    assert d.intra_mean == pytest.approx(13.0 / 9.0)
    assert d.classes.tolist() == [3, 7, 11]


def test_unit_spread_makes_metrics_shift_and_scale_free():
    x = np.random.default_rng(1).normal(size=(12, 5))
    y = np.repeat([0, 1, 2], 4)
    a = cluster_distances(normalise_features(x), y)
    b = cluster_distances(normalise_features(1000.0 * x + 7.0), y)
    assert a.intra_mean == pytest.approx(b.intra_mean) and a.inter_mean == pytest.approx(b.inter_mean)
    u = normalise_features(x)
    np.testing.assert_allclose(u.mean(axis=0), 0.0, atol=1e-12)
    assert (u**2).sum(axis=1).mean() == pytest.approx(1.0)
    # the same numbers as raw distances divided by the RMS spread
    raw = cluster_distances(x, y)
    spread = np.sqrt(((x - x.mean(axis=0)) ** 2).sum(axis=1).mean())
    assert a.intra_mean == pytest.approx(raw.intra_mean / spread) and a.inter_mean == pytest.approx(raw.inter_mean / spread)
    np.testing.assert_allclose(np.linalg.norm(normalise_features(x, "l2"), axis=1), 1.0)
    np.testing.assert_array_equal(normalise_features(x, "none"), x)
    with pytest.raises(ValueError, match="l2"):
        normalise_features(x, "l1")


def test_distances_refuse_one_class_and_mismatched_shapes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        cluster_distances(HAND_X, np.zeros(7))
    with pytest.raises(ValueError, match="N = 6"):
        cluster_distances(HAND_X, np.zeros(6))


def test_sklearn_scores_equal_direct_sklearn_calls():
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(4), 6)
    x = rng.normal(size=(24, 8)) + 1.5 * y[:, None]
    knn = knn_cv_accuracy(x, y, k=3, folds=4, seed=5)
    cv = StratifiedKFold(n_splits=4, shuffle=True, random_state=5)
    expected = cross_val_score(KNeighborsClassifier(n_neighbors=3), x, y, cv=cv, scoring="accuracy")
    assert knn["k"] == 3 and knn["folds"] == 4
    np.testing.assert_allclose(knn["fold_accuracy"], expected)
    assert knn["accuracy_mean"] == pytest.approx(expected.mean())
    assert knn["predictions"].shape == (24,)
    assert silhouette(x, y) == pytest.approx(silhouette_score(x, y))
    km = kmeans_agreement(x, y, seed=3)
    clusters = KMeans(n_clusters=4, n_init=10, random_state=3).fit_predict(x)
    assert km["nmi"] == pytest.approx(normalized_mutual_info_score(y, clusters))
    assert km["ari"] == pytest.approx(adjusted_rand_score(y, clusters))


def test_well_separated_blobs_score_perfectly_and_small_classes_cap_folds():
    y = np.repeat([0, 1, 2], 3)
    x = np.concatenate([np.random.default_rng(3).normal(scale=0.01, size=(3, 4)) + 10 * c for c in range(3)])
    knn = knn_cv_accuracy(x, y, k=1, folds=5)
    assert knn["folds"] == 3 and knn["k"] == 1  # 3 cases per class -> 3 folds
    assert knn["accuracy_mean"] == 1.0
    assert knn_cv_accuracy(x, y, k=50, folds=2)["k"] == 4  # capped at the smallest training fold (9 // 2)
    km = kmeans_agreement(x, y)
    assert km["nmi"] == pytest.approx(1.0) and km["ari"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\[2\] have a single case"):
        knn_cv_accuracy(x[:7], y[:7])


# ------------------------------------------------------------------------------------------------ crops


def _synthetic_volume() -> tuple[np.ndarray, np.ndarray]:
    """A 40^3 image whose value encodes the voxel position, and a label map with known boxes."""
    i, j, k = np.meshgrid(*(np.arange(40),) * 3, indexing="ij")
    image = (i * 10000 + j * 100 + k).astype(np.float32)
    label = np.zeros((40, 40, 40), np.int64)
    label[4:10, 6:12, 8:14] = 1  # a 6^3 box, centre (7, 9, 11)
    label[20:24, 20:24, 20:24] = 2  # two boxes with one name: merged, box [20, 30) x [20, 24) x [20, 24)
    label[26:30, 20:24, 20:24] = 3
    label[0:2, 0:2, 0:2] = 4  # in the corner: crops leave the volume
    return image, label


def test_find_structures_merges_ids_with_one_name_and_centres_on_the_structure():
    _, label = _synthetic_volume()
    s = {st.name: st for st in find_structures(label, {1: "box", 2: "lung", 3: "lung", 4: "corner"})}
    assert list(s) == ["box", "lung", "corner"]
    assert (s["box"].start, s["box"].stop, s["box"].centre, s["box"].voxels) == ((4, 6, 8), (10, 12, 14), (7, 9, 11), 216)
    assert s["lung"].ids == (2, 3) and s["lung"].voxels == 128
    assert (s["lung"].start, s["lung"].stop) == ((20, 20, 20), (30, 24, 24))
    # box centre (25, 22, 22) lies in the gap: the nearest lung voxel is (26, 22, 22)
    assert s["lung"].centre == (26, 22, 22)


def test_crop_of_the_box_size_is_exactly_the_box():
    image, label = _synthetic_volume()
    crops = cut_organ_crops(image, label, {1: "box", 2: "lung", 3: "lung", 4: "corner"}, sizes=(6,), output_size=6)
    assert [c.name for c in crops] == ["box", "lung", "corner"]
    box = crops[0]
    assert box.start == (4, 6, 8) and box.offset == (0, 0, 0)
    np.testing.assert_array_equal(box.image, image[4:10, 6:12, 8:14])
    assert np.all(label[4:10, 6:12, 8:14] == 1)


def test_crops_leaving_the_volume_are_padded():
    image, label = _synthetic_volume()
    corner = cut_organ_crops(image, label, {4: "corner"}, sizes=(8,), output_size=8, ignore_unnamed=True, pad_value=-1)[0]
    assert corner.start == (-3, -3, -3)  # centre (1, 1, 1) - 8 // 2
    assert np.all(corner.image[:3] == -1) and np.all(corner.image[:, :3] == -1) and np.all(corner.image[:, :, :3] == -1)
    np.testing.assert_array_equal(corner.image[3:, 3:, 3:], image[:5, :5, :5])
    assert np.all(extract_crop(image, (50, 0, 0), 4, pad_value=7) == 7)  # wholly outside


def test_jitter_sizes_and_resizing():
    image, label = _synthetic_volume()
    crops = cut_organ_crops(image, label, {1: "box"}, sizes=(6, 12), output_size=6, jitters_per_size=3,
                            max_jitter=2, seed=4, ignore_unnamed=True)  # fmt: skip
    assert len(crops) == 2 * (1 + 3)
    assert [c.size for c in crops] == [6] * 4 + [12] * 4
    assert [c.jitter_index for c in crops] == [0, 1, 2, 3] * 2
    assert all(c.image.shape == (6, 6, 6) for c in crops)
    for c in crops:
        assert all(abs(o) <= 2 for o in c.offset)
        assert c.start == tuple(ct + o - c.size // 2 for ct, o in zip((7, 9, 11), c.offset))
    assert any(c.offset != (0, 0, 0) for c in crops if c.jitter_index)
    # the centred 12^3 crop (start (1, 3, 5), inside the volume) shrunk to 6^3 by area averaging: each output
    # voxel is the mean of a 2^3 block, i.e. the (linear) image at the block centre
    a, b, c = np.meshgrid(*(np.arange(6),) * 3, indexing="ij")
    expected = (1.5 + 2 * a) * 10000 + (3.5 + 2 * b) * 100 + (5.5 + 2 * c)
    np.testing.assert_allclose(crops[4].image, expected, rtol=1e-6)
    again = cut_organ_crops(image, label, {1: "box"}, sizes=(6, 12), output_size=6, jitters_per_size=3,
                            max_jitter=2, seed=4, ignore_unnamed=True)  # fmt: skip
    assert [c.offset for c in again] == [c.offset for c in crops]  # seeded


def test_label_ids_missing_from_the_table_are_an_error_unless_ignored():
    image, label = _synthetic_volume()
    with pytest.raises(OrganDataError, match=r"label id\(s\) \[3, 4\] of seg.nii.gz are missing"):
        cut_organ_crops(image, label, {1: "box", 2: "lung"}, where="seg.nii.gz")
    assert len(cut_organ_crops(image, label, {1: "box", 2: "lung"}, ignore_unnamed=True)) == 2
    # a null name ignores an id on purpose
    assert [c.name for c in cut_organ_crops(image, label, {1: "box", 2: None, 3: None, 4: None})] == ["box"]
    with pytest.raises(OrganDataError, match="same voxel grid"):
        cut_organ_crops(image[:-1], label, {1: "box"}, ignore_unnamed=True)
    with pytest.raises(OrganDataError, match="no named structure"):
        cut_organ_crops(image, label, {1: "box"}, ignore_unnamed=True, min_voxels=1000)


# ------------------------------------------------------------------------------------------------ npz


def _medmnist_like(path: Path, labels: dict[str, list[int]], size: int = 8, extra: dict | None = None) -> Path:
    """An npz with exactly MedMNIST's six arrays (uint8 images, (N, 1) uint8 labels)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        lab = np.asarray(labels.get(split, []), np.uint8).reshape(-1, 1)
        arrays[f"{split}_images"] = rng.integers(0, 256, (lab.shape[0], size, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = lab
    arrays.update(extra or {})
    np.savez_compressed(path, **arrays)
    return path


def test_medmnist_layout_reads_with_organmnist3d_names(tmp_path):
    path = _medmnist_like(tmp_path / "organmnist3d.npz", {"train": [0, 9, 9], "val": [10], "test": [0, 10]})
    ds = load_organ_npz(path)
    assert len(ds) == 6 and ds.images.shape == (6, 8, 8, 8) and ds.images.dtype == np.uint8
    assert ds.labels.tolist() == [0, 9, 9, 10, 0, 10]
    assert ds.splits.tolist() == ["train"] * 3 + ["val"] + ["test"] * 2
    assert ds.case_ids.tolist()[:2] == ["train/0", "train/1"]
    assert ds.names == {0: "liver", 9: "spleen", 10: "pancreas"}
    assert ds.class_counts() == {"liver": 2, "spleen": 2, "pancreas": 2}
    np.testing.assert_allclose(ds.float_images(), ds.images / 255.0)
    assert load_organ_npz(path, splits=["test"]).labels.tolist() == [0, 10]


def test_save_and_load_round_trip_with_names_and_case_ids(tmp_path):
    imgs = {"train": np.full((2, 4, 4, 4), 10, np.uint8), "test": np.full((1, 4, 4, 4), 200, np.uint8)}
    save_organ_npz(tmp_path / "c.npz", imgs, {"train": np.array([0, 1]), "test": np.array([1])},
                   label_names={0: "aorta", 1: "rib"}, case_ids={"train": ["a", "b"], "test": ["c"]})  # fmt: skip
    with np.load(tmp_path / "c.npz") as z:  # MedMNIST's arrays are all there, val empty
        assert z["val_images"].shape == (0, 4, 4, 4) and z["train_labels"].shape == (2, 1)
    ds = load_organ_npz(tmp_path / "c.npz")
    assert ds.names == {0: "aorta", 1: "rib"} and ds.case_ids.tolist() == ["a", "b", "c"]
    assert ds.images[:, 0, 0, 0].tolist() == [10, 10, 200]


@pytest.mark.parametrize(
    "labels, extra, kwargs, message",
    [
        # an npz without the expected arrays
        ({"train": [0, 1]}, {}, {"drop": "test_labels"}, r"no \['test_labels'\] array"),
        # a label id missing from the name table
        ({"test": [0, 1, 2]}, {}, {"label_names": {"0": "liver", "1": "spleen"}}, r"label id\(s\) \[2\].*no name"),
        # a label id beyond OrganMNIST3D's 0..10 and no table
        ({"test": [0, 11]}, {}, {}, r"\[11\].*OrganMNIST3D"),
        # fewer than two classes
        ({"train": [3, 3], "test": [3]}, {}, {}, r"1 class\(es\) \['femur-right'\].*at least 2"),
        # an unknown split
        ({"test": [0, 1]}, {}, {"splits": ["training"]}, "splits must be"),
        # float images outside [0, 1]
        ({"test": [0, 1]}, {"test_images": np.full((2, 8, 8, 8), 300.0)}, {}, r"float with values in \[300"),
        # labels not one per image
        ({"test": [0, 1]}, {"test_labels": np.zeros((3, 1), np.uint8)}, {}, "one label per image"),
    ],
)
def test_bad_npz_is_named(tmp_path, labels, extra, kwargs, message):
    path = _medmnist_like(tmp_path / "bad.npz", labels, extra=extra)
    drop = kwargs.pop("drop", None)
    if drop:
        with np.load(path) as z:
            np.savez(path, **{k: z[k] for k in z.files if k != drop})
    with pytest.raises(OrganDataError, match=message) as err:
        load_organ_npz(path, **kwargs)
    if "splits" not in kwargs and "label_names" not in kwargs:
        assert "bad.npz" in str(err.value)


def test_missing_or_non_npz_file(tmp_path):
    with pytest.raises(OrganDataError, match="does not exist.*MedMNIST"):
        load_organ_npz(tmp_path / "nope.npz")
    (tmp_path / "x.npz").write_text("not a zip")
    with pytest.raises(OrganDataError, match="cannot read"):
        load_organ_npz(tmp_path / "x.npz")
    with pytest.raises(OrganDataError, match="not an integer"):
        load_organ_npz(_medmnist_like(tmp_path / "ok.npz", {"test": [0, 1]}), label_names={"liver": 0})


def test_hounsfield_crops_take_the_encoders_window(tmp_path):
    hu = np.array([-1100, -1024, -600, -175, 0, 250, 300, 1000], np.int16).reshape(1, 2, 2, 2)
    path = tmp_path / "hu.npz"
    save_organ_npz(path, {"test": np.concatenate([hu, hu])}, {"test": np.array([0, 1])})
    ds = load_organ_npz(path)
    assert ds.in_hounsfield
    soft = ds.float_images("soft_tissue")[0].ravel()
    lung = ds.float_images("lung")[0].ravel()
    np.testing.assert_allclose(soft, [0, 0, 0, 0, 175 / 425, 1, 1, 1], atol=1e-6)
    np.testing.assert_allclose(lung, [0, 0, 424 / 1324, 849 / 1324, 1024 / 1324, 1274 / 1324, 1, 1], atol=1e-6)
    with pytest.raises(ValueError, match="int16.*or uint8"):
        save_organ_npz(tmp_path / "f.npz", {"test": hu.astype(np.float32)}, {"test": np.array([0])})


def test_shipped_sample_is_organmnist3d_layout():
    ds = load_organ_npz(SAMPLE)
    assert ds.images.shape == (42, 28, 28, 28) and ds.images.dtype == np.int16 and ds.in_hounsfield
    assert ds.images.min() >= -1024 and ds.images.max() > 100  # HU: air to enhanced organs
    organs = ("liver", "kidney-right", "kidney-left", "lung-right", "lung-left", "spleen", "pancreas")
    assert ds.class_counts() == {n: 6 for n in organs}
    assert all(ORGANMNIST3D_LABELS[i] == n for i, n in ds.names.items())
    assert SAMPLE.stat().st_size < 1_000_000


# ------------------------------------------------------------------------------------------------ features


def test_random_encoder_is_seeded_frozen_and_features_have_the_token_width():
    a = prepare_encoder(None, seed=1, **TINY_ENCODER)
    b = prepare_encoder(None, seed=1, **TINY_ENCODER)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    crops = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 28), dtype=np.uint8)  # resized to 32^3
    g = OrganFeatureExtractor("global", roi_size=32, batch_size=2, progress=False)(a, crops)
    c = OrganFeatureExtractor("cls", roi_size=32, progress=False)(a, crops)
    v = OrganFeatureExtractor("voxels", roi_size=32, progress=False)(None, crops)
    assert g.shape == (3, 12 * 16) and c.shape == (3, 12 * 8) and v.shape == (3, 512)
    # batching does not change the features; a single crop matches the encoder's own output
    np.testing.assert_allclose(g, OrganFeatureExtractor("global", 32, batch_size=3, progress=False)(a, crops), atol=1e-5)
    x = torch.nn.functional.interpolate(torch.from_numpy(crops[:1]).float()[:, None] / 255, size=(32,) * 3, mode="trilinear")
    with torch.no_grad():
        np.testing.assert_allclose(g[0], a(x)["global"][0].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="global"):
        OrganFeatureExtractor("mean")


def test_pretrained_encoder_loads_model_pt_with_its_card(tmp_path):
    torch.manual_seed(7)
    source = build_encoder(None, **TINY_ENCODER)
    export_encoder(source, tmp_path / "model.pt", {"network": TINY_ENCODER})
    enc = prepare_encoder(tmp_path / "model.pt")
    assert all(torch.equal(p, q) for p, q in zip(enc.state_dict().values(), source.state_dict().values()))
    assert enc.load_report.loaded_fraction == 1.0 and len(enc.weights_sha256) == 64
    # random init takes the architecture from the same card (like-for-like comparison), not the weights
    rnd = prepare_encoder(None, card=tmp_path / "model.pt")
    assert rnd.embed_dim == 12 and rnd.sa.blocks[0].attn.num_heads == 4
    assert not torch.equal(rnd.state_dict()["sa.cls_token"], source.state_dict()["sa.cls_token"])


def test_missing_weights_are_an_error_unless_random(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.pt' \(config key 'model_path'\) do not exist.*make demo.*--model_path null"):
        prepare_encoder(tmp_path / "model.pt")
    enc = prepare_encoder(None, card=tmp_path / "model.pt", **TINY_ENCODER)  # no card, no weights: fine
    assert enc.load_report is None and enc.init == "random" and enc.embed_dim == 12
    with pytest.raises(EncoderSettingError, match="config key 'model_path' is 'random'.*null"):
        prepare_encoder("random")


# ------------------------------------------------------------------------------------------------ crop script


def _crop_script():
    """scripts/make_organ_crops.py as a module (run in-process: no second interpreter start-up)."""
    spec = importlib.util.spec_from_file_location("make_organ_crops", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO.parent), env=env)


def test_script_reproduces_the_shipped_sample_and_writes_nifti(tmp_path):
    # the command documented in sample_data/README.md
    out = tmp_path / "crops.npz"
    args = ["--image", str(TOTALSEG / "example_ct_sm.nii.gz"), "--label", str(TOTALSEG / "example_seg.nii.gz"),
            "--names", str(BUNDLE / "sample_data" / "totalseg_to_organmnist3d.json"), "--ignore-unnamed",
            "--sizes", "24", "32", "40", "--jitters-per-size", "1", "--max-jitter", "3", "--output-size", "28",
            "--out-npz", str(out), "--out-nifti", str(tmp_path / "nifti")]  # fmt: skip
    assert _crop_script().main(args) == 0
    with np.load(out) as new, np.load(SAMPLE) as shipped:
        assert sorted(new.files) == sorted(shipped.files)
        for key in new.files:
            np.testing.assert_array_equal(new[key], shipped[key], err_msg=key)
    import pandas as pd

    table = pd.read_csv(tmp_path / "nifti" / "crops.csv")
    assert len(table) == 42 and table["organ"].value_counts().to_dict() == {n: 6 for n in table["organ"].unique()}
    assert set(table.loc[table["organ"] == "lung-right", "label_ids"]) == {"13 14"}  # lobes merged
    first = nib.load(tmp_path / "nifti" / table["file"][0])
    assert first.shape == (28, 28, 28)
    np.testing.assert_allclose(np.asarray(first.dataobj), load_organ_npz(SAMPLE).images[0], atol=0.51)
    np.testing.assert_allclose(np.abs(np.diag(first.affine)[:3]), 2.0 * 24 / 28, rtol=1e-5)  # 24 voxels of 2 mm in 28


def test_script_names_unnamed_ids(tmp_path, caplog):
    label = np.zeros((16, 16, 16), np.int16)
    label[2:6, 2:6, 2:6], label[8:12, 8:12, 8:12] = 1, 69
    ct = np.full((16, 16, 16), -500, np.int16)
    nib.save(nib.Nifti1Image(ct, np.eye(4)), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "seg.nii.gz")
    (tmp_path / "names.json").write_text(json.dumps({"1": "spleen"}))
    args = ["--image", str(tmp_path / "ct.nii.gz"), "--label", str(tmp_path / "seg.nii.gz"), "--names",
            str(tmp_path / "names.json"), "--out-npz", str(tmp_path / "o.npz"), "--sizes", "8", "--output-size", "8"]  # fmt: skip
    with caplog.at_level(logging.ERROR, logger="make_organ_crops"):
        assert _crop_script().main(args) == 1
    assert "[69]" in caplog.text and "seg.nii.gz" in caplog.text and "--ignore-unnamed" in caplog.text
    assert not (tmp_path / "o.npz").exists()


# ------------------------------------------------------------------------------------------------ bundle


def _bundle_copy(root: Path, with_weights: bool) -> Path:
    dst = root / "bundle"
    shutil.copytree(BUNDLE / "configs", dst / "configs")
    shutil.copytree(BUNDLE / "sample_data", dst / "sample_data")
    if with_weights:
        torch.manual_seed(3)
        weights = root / "dagman_ct_pretraining" / "models" / "model.pt"  # where the bundle looks by default
        export_encoder(build_encoder(None, **TINY_ENCODER), weights, {"network": TINY_ENCODER})
    return dst


def _bundle_cmd(bundle: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.yaml"),
            "--bundle_root", str(bundle), "--logging_file", str(bundle / "configs" / "logging.conf"), *extra]  # fmt: skip


@pytest.mark.slow
def test_bundle_run_on_shipped_crops_writes_metrics_csv_and_png(tmp_path):
    from PIL import Image

    bundle = _bundle_copy(tmp_path, with_weights=True)
    result = _run(_bundle_cmd(bundle, "--token", "cls", "--umap_neighbors", "10"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = bundle / "eval" / "pretrained_cls"
    metrics = json.loads((out / "clustering_metrics.json").read_text())
    assert metrics["data"]["cases"] == 42 and metrics["data"]["classes"] == 7
    assert metrics["encoder"]["init"] == "pretrained" and metrics["encoder"]["feature_dim"] == 12 * 8
    assert metrics["encoder"]["weights_sha256"] == json.loads((tmp_path / "dagman_ct_pretraining" / "models" / "model_card.json").read_text())["sha256"]
    fs = metrics["feature_space"]
    assert fs["knn"]["folds"] == 5 and fs["knn"]["k"] == 5 and 0.0 <= fs["knn"]["accuracy_mean"] <= 1.0
    assert metrics["umap_space"]["umap"] == {"n_neighbors": 10, "min_dist": 0.1, "metric": "euclidean", "seed": 0}
    # the JSON's numbers are those of the saved features, by the README's definitions
    with np.load(out / "features.npz") as z:
        feats, labels = z["features"], z["labels"]
    assert feats.shape == (42, 96)
    d = cluster_distances(normalise_features(feats), labels)
    assert metrics["feature_norm"] == "unit_spread"
    assert fs["intra_cluster"]["mean"] == pytest.approx(d.intra_mean, rel=1e-6)
    assert fs["inter_cluster"]["mean"] == pytest.approx(d.inter_mean, rel=1e-6) and fs["inter_cluster"]["pairs"] == 21
    import pandas as pd

    table = pd.read_csv(out / "embeddings.csv")
    assert len(table) == 42 and {"case_id", "organ", "umap_1", "umap_2", "knn_prediction"} <= set(table.columns)
    e = cluster_distances(table[["umap_1", "umap_2"]].to_numpy(), table["label"].to_numpy())
    assert metrics["umap_space"]["intra_cluster"]["mean"] == pytest.approx(e.intra_mean, rel=1e-4)
    with Image.open(out / "umap.png") as png:
        assert png.format == "PNG" and png.size[0] >= 600 and png.size[1] >= 400
        png.verify()


@pytest.mark.slow
def test_bundle_without_weights_fails_clearly_and_keeps_old_outputs(tmp_path):
    bundle = _bundle_copy(tmp_path, with_weights=False)
    old = bundle / "eval" / "pretrained_global" / "clustering_metrics.json"
    old.parent.mkdir(parents=True)
    old.write_text("{}")
    result = _run(_bundle_cmd(bundle))
    assert result.returncode != 0
    assert "do not exist yet" in result.stderr and "--model_path null" in result.stderr
    assert old.read_text() == "{}"
