# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Tests of dagman_components.data: datalists, volume checks and the CT preprocessing, on real CT."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from dagman_components.data import (
    DEFAULT_SPACING,
    HU_WINDOW,
    DataSourceError,
    WarnIfNotHounsfieldd,
    build_datalist,
    check_roi_size,
    ct_load_and_normalise,
    pretraining_transforms,
    validate_volumes,
)

DATA = Path(__file__).resolve().parents[1] / "data"
TOTALSEG = DATA / "totalseg_example"
CT = TOTALSEG / "example_ct.nii.gz"
CT_SM = TOTALSEG / "example_ct_sm.nii.gz"
SEG_SM = TOTALSEG / "example_seg.nii.gz"
DICOM_DIR = TOTALSEG / "example_ct_dicom"
NODULES = sorted((DATA / "lidc_nodules_sample" / "image").glob("*.nii.gz"))
TRANSFORMS_LOGGER = "dagman_components.data.transforms"


def _copy_series(target: Path, suffix: str = "") -> Path:
    """Copy the 20-slice DICOM series into ``target`` (optionally renaming files with ``suffix``)."""
    target.mkdir(parents=True)
    for src in sorted(DICOM_DIR.iterdir()):
        shutil.copyfile(src, target / (src.name + suffix))
    return target


def _save_nifti(path: Path, array: np.ndarray, spacing: float = 1.0) -> Path:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


# ------------------------------------------------------------------------------------------------ datalist


def test_folder_datalist_one_item_per_volume_and_per_series(tmp_path):
    (tmp_path / "a").mkdir()
    shutil.copyfile(CT_SM, tmp_path / "a" / "ct_sm.nii.gz")
    (tmp_path / "b" / "deep").mkdir(parents=True)
    shutil.copyfile(NODULES[0], tmp_path / "b" / "deep" / "nodule.nii.gz")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "vol.MHA").write_bytes(b"")  # upper-case ending still counts; not read here
    (tmp_path / "c" / "vol.nrrd").write_bytes(b"")
    _copy_series(tmp_path / "series")  # files without extension, 'DICM' preamble: one item
    _copy_series(tmp_path / "series_dcm", suffix=".dcm")  # .dcm files: one item
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.nii.gz").write_bytes(b"")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.nii.gz").write_bytes(b"")

    items = build_datalist(tmp_path)

    expected = ["a/ct_sm.nii.gz", "b/deep/nodule.nii.gz", "c/vol.MHA", "c/vol.nrrd", "series", "series_dcm"]
    assert items == [{"image": str(tmp_path / e)} for e in expected]
    assert build_datalist(tmp_path) == items  # deterministic
    assert build_datalist(str(tmp_path), image_key="ct") == [{"ct": str(tmp_path / e)} for e in expected]


def test_folder_datalist_of_repository_totalseg_example():
    items = build_datalist(TOTALSEG)
    names = [os.path.basename(i["image"]) for i in items]
    # 4 NIfTI files and the DICOM series folder (20 slices -> one item)
    assert names == [
        "example_ct.nii.gz",
        "example_ct_dicom",
        "example_ct_sm.nii.gz",
        "example_seg.nii.gz",
        "example_seg_dicom.nii.gz",
    ]


def test_single_volume_file_is_one_item():
    assert build_datalist(CT_SM) == [{"image": str(CT_SM)}]


def test_json_decathlon_datalist_resolves_relative_paths(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copyfile(CT_SM, images / "ct.nii.gz")
    shutil.copyfile(SEG_SM, images / "seg.nii.gz")
    shutil.copyfile(NODULES[0], images / "nodule.nii.gz")
    lists = tmp_path / "lists"
    lists.mkdir()
    datalist = {
        "name": "test",
        "training": [{"image": "../images/ct.nii.gz", "label": "../images/seg.nii.gz"}],
        "validation": [{"image": "../images/nodule.nii.gz"}],
    }
    (lists / "dl.json").write_text(json.dumps(datalist))

    training = build_datalist(lists / "dl.json")
    assert training == [{"image": str(images / "ct.nii.gz"), "label": str(images / "seg.nii.gz")}]
    assert build_datalist(lists / "dl.json", json_key="validation") == [{"image": str(images / "nodule.nii.gz")}]

    # base_dir overrides the JSON's folder
    datalist["training"] = [{"ct": "images/ct.nii.gz"}]
    (lists / "other.json").write_text(json.dumps(datalist))
    items = build_datalist(lists / "other.json", image_key="ct", base_dir=str(tmp_path))
    assert items == [{"ct": str(images / "ct.nii.gz")}]


@pytest.mark.parametrize(
    "content",
    [
        ["images/ct.nii.gz", "images/nodule.nii.gz"],  # plain list of paths
        [{"image": "images/ct.nii.gz"}, {"image": "images/nodule.nii.gz"}],  # plain list of dicts
    ],
)
def test_json_plain_list_datalist(tmp_path, content):
    (tmp_path / "images").mkdir()
    shutil.copyfile(CT_SM, tmp_path / "images" / "ct.nii.gz")
    shutil.copyfile(NODULES[1], tmp_path / "images" / "nodule.nii.gz")
    (tmp_path / "list.json").write_text(json.dumps(content))
    assert build_datalist(tmp_path / "list.json") == [
        {"image": str(tmp_path / "images" / "ct.nii.gz")},
        {"image": str(tmp_path / "images" / "nodule.nii.gz")},
    ]


def test_missing_dataset_dir_names_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataSourceError, match="does not exist") as err:
        build_datalist(missing)
    assert str(missing) in str(err.value) and "dataset_dir" in str(err.value)


def test_empty_dataset_dir_names_path_and_extensions(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(DataSourceError, match="no readable volume") as err:
        build_datalist(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    for ending in (".nii.gz", ".nrrd", ".mha", ".mhd", ".dcm"):
        assert ending in message


def test_json_missing_files_are_all_listed_in_one_error(tmp_path):
    shutil.copyfile(CT_SM, tmp_path / "ct.nii.gz")
    content = {"training": [{"image": "ct.nii.gz"}, {"image": "gone_1.nii.gz"}, {"image": "gone_2.nii.gz"}]}
    (tmp_path / "dl.json").write_text(json.dumps(content))
    with pytest.raises(DataSourceError, match="2 missing") as err:
        build_datalist(tmp_path / "dl.json")
    message = str(err.value)
    assert str(tmp_path / "gone_1.nii.gz") in message and str(tmp_path / "gone_2.nii.gz") in message
    assert str(tmp_path / "ct.nii.gz") not in message.replace(str(tmp_path / "dl.json"), "")


def test_json_missing_key_and_malformed_json(tmp_path):
    (tmp_path / "dl.json").write_text(json.dumps({"validation": []}))
    with pytest.raises(DataSourceError, match="no key 'training'") as err:
        build_datalist(tmp_path / "dl.json")
    assert str(tmp_path / "dl.json") in str(err.value) and "'validation'" in str(err.value)

    (tmp_path / "bad.json").write_text('{"training": [')
    with pytest.raises(DataSourceError, match="not valid JSON") as err:
        build_datalist(tmp_path / "bad.json")
    assert str(tmp_path / "bad.json") in str(err.value)


def test_many_missing_files_message_is_capped(tmp_path):
    (tmp_path / "dl.json").write_text(json.dumps([f"gone_{i:02d}.nii.gz" for i in range(25)]))
    with pytest.raises(DataSourceError) as err:
        build_datalist(tmp_path / "dl.json")
    message = str(err.value)
    assert "gone_19.nii.gz" in message and "gone_20.nii.gz" not in message
    assert "and 5 more" in message


# ------------------------------------------------------------------------------------------------ validate


def test_validate_accepts_real_ct_nodules_and_trailing_singleton(tmp_path):
    singleton = _save_nifti(tmp_path / "singleton.nii.gz", np.zeros((8, 9, 10, 1), np.int16))
    items = [{"image": str(CT)}, {"image": str(CT_SM)}, {"image": str(singleton)}]
    items += [{"image": str(p)} for p in NODULES]
    validate_volumes(items)  # no error


def test_validate_names_corrupt_and_truncated_files(tmp_path):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    text = tmp_path / "text.nii.gz"
    text.write_text("this is not a NIfTI file\n")
    truncated = tmp_path / "truncated.nii.gz"
    payload = CT_SM.read_bytes()
    truncated.write_bytes(payload[: len(payload) // 2])  # header intact, voxel data cut
    raw = _save_nifti(tmp_path / "raw.nii", np.zeros((16, 16, 16), np.int16))
    raw_cut = tmp_path / "raw_cut.nii"
    raw_cut.write_bytes(raw.read_bytes()[:2000])
    good = tmp_path / "good.nii.gz"
    shutil.copyfile(NODULES[0], good)
    items = [{"image": str(p)} for p in (garbage, good, text, truncated, raw, raw_cut)]

    with pytest.raises(DataSourceError, match="4 image") as err:
        validate_volumes(items)
    message = str(err.value)
    for bad in (garbage, text, truncated, raw_cut):
        assert str(bad) in message
    assert str(good) not in message and f"{raw} " not in message
    assert "truncated" in message

    validate_volumes([{"image": str(truncated)}], check_payload=False)  # header-only check passes


def test_validate_names_2d_4d_and_thin_volumes(tmp_path):
    flat = _save_nifti(tmp_path / "flat_2d.nii.gz", np.zeros((32, 32), np.int16))
    series = _save_nifti(tmp_path / "two_timepoints.nii.gz", np.zeros((16, 16, 16, 2), np.int16))
    thin = _save_nifti(tmp_path / "one_slice.nii.gz", np.zeros((32, 32, 1), np.int16))
    good = _save_nifti(tmp_path / "good.nii.gz", np.zeros((16, 16, 16), np.int16))
    items = [{"image": str(p)} for p in (flat, good, series, thin)]
    with pytest.raises(DataSourceError, match="3 image") as err:
        validate_volumes(items)
    lines = str(err.value).splitlines()
    assert any(str(flat) in line and "2D" in line for line in lines)
    assert any(str(series) in line and "4D" in line for line in lines)
    assert any(str(thin) in line and "below 2" in line for line in lines)
    assert not any(str(good) in line for line in lines)


def test_validate_itk_formats_and_dicom_series(tmp_path):
    itk = pytest.importorskip("itk")
    itk.imwrite(itk.image_from_array(np.zeros((6, 7, 8), np.int16)), str(tmp_path / "ok.mha"))
    itk.imwrite(itk.image_from_array(np.zeros((7, 8), np.int16)), str(tmp_path / "flat.nrrd"))
    series = _copy_series(tmp_path / "series")
    items = build_datalist(tmp_path)
    assert [os.path.basename(i["image"]) for i in items] == ["flat.nrrd", "ok.mha", "series"]
    with pytest.raises(DataSourceError, match="1 image") as err:
        validate_volumes(items)
    assert str(tmp_path / "flat.nrrd") in str(err.value) and "2D" in str(err.value)
    assert str(series) not in str(err.value)


# ------------------------------------------------------------------------------------------------ transforms


def test_ct_load_and_normalise_image_and_label_share_geometry():
    out = Compose(ct_load_and_normalise(label_keys="label"))({"image": str(CT_SM), "label": str(SEG_SM)})
    image, label = out["image"], out["label"]
    assert image.shape == label.shape and image.shape[0] == 1
    # 122 x 101 x 30 voxels at 3 mm -> about 183 x 151.5 x 45 at 2 mm
    assert [abs(s - e) <= 1 for s, e in zip(image.shape[1:], (183, 151.5, 45))] == [True] * 3
    assert torch.allclose(image.pixdim.float(), torch.tensor(DEFAULT_SPACING))
    assert image.dtype == torch.float32 and float(image.min()) == 0.0 and float(image.max()) == 1.0
    original_labels = set(np.unique(np.asanyarray(nib.load(str(SEG_SM)).dataobj)).tolist())
    resampled_labels = set(torch.unique(label).tolist())
    assert resampled_labels <= original_labels and len(resampled_labels) > 30  # nearest: no new values


def test_ct_load_and_normalise_reads_dicom_series_in_hu(caplog):
    caplog.set_level(logging.WARNING, logger=TRANSFORMS_LOGGER)
    out = Compose(ct_load_and_normalise(reader="ITKReader"))({"image": str(DICOM_DIR)})
    # 512 x 512 x 20 at 0.98 x 0.98 x 2 mm -> 250 x 250 x 20 at 2 mm
    shape = tuple(out["image"].shape)
    assert shape[0] == 1 and shape[3] == 20 and all(abs(s - 250) <= 1 for s in shape[1:3])
    assert float(out["image"].min()) == 0.0 and float(out["image"].max()) == 1.0
    assert not [r for r in caplog.records if r.name == TRANSFORMS_LOGGER]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keys": "image", "label_keys": "image"},  # a key cannot be both
        {"hu_window": (250.0, -175.0)},  # low must be below high
        {"spacing": (2.0, 2.0)},  # three values needed
    ],
)
def test_ct_load_and_normalise_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ct_load_and_normalise(**kwargs)


def test_pretraining_views_shape_range_and_seeding():
    data = {"image": str(CT_SM)}  # 30 slices at 3 mm: 44-45 slices at 2 mm, fewer than 64

    def run(seed: int, jitter: float = 0.0) -> dict:
        return pretraining_transforms(64, intensity_jitter=jitter).set_random_state(seed)(dict(data))

    first = run(0)
    assert set(first) == {"image", "image_2"}
    for key in ("image", "image_2"):
        view = first[key]
        assert tuple(view.shape) == (1, 64, 64, 64) and view.dtype == torch.float32
        assert not isinstance(view, MetaTensor)
        assert float(view.min()) >= 0.0 and float(view.max()) <= 1.0
    assert not torch.equal(first["image"], first["image_2"])  # views drawn independently

    again = run(0)
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["image_2"], again["image_2"])
    other = run(1)
    assert not torch.equal(first["image"], other["image"])

    jittered = run(0, jitter=0.1)
    assert tuple(jittered["image"].shape) == tuple(jittered["image_2"].shape) == (1, 64, 64, 64)


def test_pretraining_custom_keys_without_foreground_crop():
    aug = pretraining_transforms((32, 64, 96), keys="ct", view_keys=("u", "v"), crop_foreground=False)
    out = aug.set_random_state(3)({"ct": str(NODULES[0])})  # a 53 x 64 x 11 nodule crop
    assert set(out) == {"u", "v"}
    assert tuple(out["u"].shape) == tuple(out["v"].shape) == (1, 32, 64, 96)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"roi_size": 100},  # not divisible by 32
        {"roi_size": 64, "view_keys": ("image",)},  # one view
        {"roi_size": 64, "view_keys": ("a", "a")},  # repeated view key
        {"roi_size": 64, "keys": ("image", "other")},  # two source keys
        {"roi_size": 64, "flip_prob": 1.5},
    ],
)
def test_pretraining_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        pretraining_transforms(**kwargs)


def test_hu_warning_fires_once_for_scaled_volume_and_not_for_ct(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=TRANSFORMS_LOGGER)
    ct = nib.load(str(CT_SM))
    hu = np.asanyarray(ct.dataobj).astype(np.float32)
    scaled = np.clip((hu - HU_WINDOW[0]) / (HU_WINDOW[1] - HU_WINDOW[0]), 0.0, 1.0)
    scaled_path = tmp_path / "already_scaled.nii.gz"
    nib.save(nib.Nifti1Image(scaled, ct.affine), str(scaled_path))

    pre = Compose(ct_load_and_normalise())
    pre({"image": str(scaled_path)})
    pre({"image": str(scaled_path)})  # same file again: no second warning
    warnings = [r for r in caplog.records if r.name == TRANSFORMS_LOGGER]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert str(scaled_path) in warnings[0].getMessage() and "Hounsfield" in warnings[0].getMessage()

    caplog.clear()
    pre({"image": str(CT_SM)})
    for nodule in NODULES[:4]:
        pre({"image": str(nodule)})
    assert not [r for r in caplog.records if r.name == TRANSFORMS_LOGGER]


@pytest.mark.parametrize(
    "values, flagged",
    [
        (np.linspace(0.0, 1.0, 4096), True),  # [0, 1] scaled
        (np.linspace(0.0, 4095.0, 4096), True),  # raw stored values / MR magnitude
        (np.linspace(-3.0, 3.0, 4096), True),  # z-scored
        (np.linspace(-1024.0, 1500.0, 4096), False),  # HU with air
        (np.concatenate([np.full(100, -100.0), np.full(3996, 60.0)]), False),  # soft tissue crop with fat
    ],
)
def test_hu_rule_and_data_untouched(values, flagged, caplog):
    caplog.set_level(logging.WARNING, logger=TRANSFORMS_LOGGER)
    img = MetaTensor(torch.tensor(values, dtype=torch.float32).reshape(1, 16, 16, 16))
    img.meta["filename_or_obj"] = "/scans/volume.nii.gz"
    before = img.clone()
    out = WarnIfNotHounsfieldd("image")({"image": img})
    assert out["image"] is img and torch.equal(img, before)
    messages = [r.getMessage() for r in caplog.records if r.name == TRANSFORMS_LOGGER]
    assert len(messages) == int(flagged)
    assert all("/scans/volume.nii.gz" in m for m in messages)


@pytest.mark.parametrize(
    "roi, expected",
    [(96, (96, 96, 96)), ((64, 96, 128), (64, 96, 128)), ([32.0, 32, 32], (32, 32, 32)), (np.int64(64), (64,) * 3)],
)
def test_check_roi_size_accepts(roi, expected):
    assert check_roi_size(roi) == expected


@pytest.mark.parametrize("roi", [100, (64, 64), (64, 64, 0), (-32, 64, 64), (64, 64, 48), (64.5, 64, 64), True, "96"])
def test_check_roi_size_rejects_naming_key(roi):
    with pytest.raises(ValueError, match="pretrain#roi_size"):
        check_roi_size(roi, key="pretrain#roi_size")


# -- views that differ (dagman_components.data.views)


def _ramp(shape=(1, 40, 40, 40)) -> torch.Tensor:
    """A volume whose every voxel holds its own flat index: a view's content tells where it came from."""
    return torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)


def test_region_crops_both_views_lie_inside_one_region_of_the_configured_size():
    from dagman_components.data import PretrainingViewsd

    views = PretrainingViewsd("image", ("image", "image_2"), (32, 32, 32), mode="region_crops",
                              region_factor=1.5).set_random_state(0)
    for _ in range(20):
        out = views({"image": _ramp((1, 80, 80, 80))})
        (s1, z1), (s2, z2) = views.boxes
        assert z1 == z2 == (32, 32, 32)
        # the region is 48^3: both boxes fit in one 48^3 box
        lo = [min(a, b) for a, b in zip(s1, s2)]
        hi = [max(a + 32, b + 32) for a, b in zip(s1, s2)]
        assert all(high - low <= 48 for low, high in zip(lo, hi))
        assert torch.equal(out["image"], _ramp((1, 80, 80, 80))[:, s1[0]:s1[0] + 32, s1[1]:s1[1] + 32, s1[2]:s1[2] + 32])
    assert views.mode_used == "region_crops"


def test_resized_crops_follow_the_scale_range_and_are_resized_to_the_roi():
    from dagman_components.data import PretrainingViewsd

    views = PretrainingViewsd("image", ("a", "b"), (32, 32, 32), mode="resized_crop", scale=(0.3, 0.6)).set_random_state(1)
    fractions, offsets = [], set()
    for _ in range(50):
        out = views({"image": _ramp()})
        assert out["a"].shape == out["b"].shape == (1, 32, 32, 32)
        for start, size in views.boxes:
            fractions.append(np.prod(size) / 40**3)
            offsets.add(start)
            assert all(0 <= a and a + b <= 40 for a, b in zip(start, size))
    # rounding each side moves the fraction a little outside the drawn range
    assert 0.25 < min(fractions) < 0.4 and 0.5 < max(fractions) < 0.68 and len(offsets) > 40
    auto = PretrainingViewsd("image", ("a", "b"), (32, 32, 32), mode="auto").set_random_state(0)
    auto({"image": _ramp()})
    assert auto.mode_used == "resized_crop"  # 40 < 2 x 32
    auto({"image": _ramp((1, 64, 70, 80))})
    assert auto.mode_used == "region_crops"
    with pytest.raises(ValueError, match="view_scale"):
        PretrainingViewsd("image", ("a", "b"), (32, 32, 32), scale=(0.0, 1.0))


def test_pretraining_transforms_take_the_view_mode():
    aug = pretraining_transforms(32, view_mode="resized_crop", view_scale=(0.2, 0.2), crop_foreground=False,
                                 intensity_jitter=0.0, flip_prob=0.0).set_random_state(0)
    views = next(t for t in aug.transforms if type(t).__name__ == "PretrainingViewsd")
    images = Path(__file__).resolve().parents[1] / "data" / "lidc_nodules_sample" / "image"
    out = aug({"image": str(sorted(images.iterdir())[0])})
    assert out["image"].shape == out["image_2"].shape == (1, 32, 32, 32)
    assert views.mode_used == "resized_crop" and not torch.equal(out["image"], out["image_2"])
