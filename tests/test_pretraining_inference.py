"""The pretraining bundle's inference config: DAGMaN features and S_ATT maps of a CT folder."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, TINY_ENCODER

from dagman_components.features.extraction import CASES_FILE, FEATURES_FILE, case_names
from dagman_components.networks import EncoderEmbedding, SwinDAGMaN
from dagman_components.weights.state_dict import export_encoder

BUNDLE = REPO / "bundles" / "dagman_ct_pretraining"
CARD = {"network": {"class": "dagman_components.networks.SwinDAGMaN", "in_channels": 1, "window_size": 4,
                    "patch_size": 2, "sa_stage": 3, **TINY_ENCODER},
        "preprocessing": {"orientation": "RAS", "spacing_mm": [4.0, 4.0, 4.0], "hu_window": [-175.0, 250.0]}}


def tiny_bundle(root: Path, weights: bool = True) -> Path:
    """A copy of the bundle's configs with tiny encoder weights (and card) in models/."""
    bundle = root / "dagman_ct_pretraining"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    shutil.copy(BUNDLE / "LICENSE", bundle / "LICENSE")
    if weights:
        torch.manual_seed(0)
        export_encoder(SwinDAGMaN(**TINY_ENCODER), bundle / "models" / "model.pt", CARD)
    return bundle


def synthetic_ct(folder: Path) -> list[Path]:
    """Two small CT-like volumes in HU, one with an LPS-like affine and anisotropic voxels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (shape, affine) in enumerate([((40, 36, 20), np.diag([3.0, 3.0, 5.0, 1.0])),
                                         ((30, 34, 26), np.diag([-3.5, -3.5, 4.0, 1.0]))]):
        volume = rng.uniform(-1000, 400, size=shape).astype(np.float32)
        affine = affine.copy()
        affine[:3, 3] = [10.0 * i, -20.0, 5.0]
        path = folder / f"case{i}.nii.gz"
        nib.save(nib.Nifti1Image(volume, affine), path)
        paths.append(path)
    return paths


def run_inference(bundle: Path, data: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.yaml"),
           "--bundle_root", str(bundle), "--dataset_dir", str(data), "--output_dir", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(bundle.parent))


def test_case_names_are_unique_and_safe():
    assert case_names(["x/a b.nii.gz", "y/a b.nii.gz", "z/series/"]) == ["a_b", "a_b_2", "series"]


def test_inference_writes_features_and_attention_on_the_input_grid(tmp_path):
    bundle = tiny_bundle(tmp_path)
    images = synthetic_ct(tmp_path / "ct")
    out = tmp_path / "features"
    result = run_inference(bundle, tmp_path / "ct", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DAGMaN features" in result.stderr  # the progress bar
    features = np.load(out / FEATURES_FILE)
    assert list(features["case"]) == ["case0", "case1"]
    assert features["cls"].shape == (2, 96) and features["global"].shape == (2, 192)  # embed 12: *8 and *16
    assert np.isfinite(features["cls"]).all() and not np.allclose(features["cls"][0], features["cls"][1])
    with open(out / CASES_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["case0", "case1"]
    encoder = SwinDAGMaN(**TINY_ENCODER)
    encoder.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    for image, row, cls in zip(images, rows, features["cls"]):
        source, att = nib.load(image), nib.load(row["attention"])
        assert att.shape == source.shape  # inverted to the input's own grid
        np.testing.assert_allclose(att.affine, source.affine, atol=1e-4)
        values = np.asarray(att.dataobj)
        assert values.min() >= 0 and values.max() <= 1 and values.max() > 0
        grid = [int(g) for g in row["sa_grid"].split("x")]
        assert 1 < len(np.unique(values)) <= np.prod(grid) + 1  # one value per SA cell (+ 0 outside)
    # the [CLS] of case 0 equals the encoder's on the same preprocessing (pretrained weights were loaded)
    from dagman_components.features.extraction import extraction_preprocessing

    item = extraction_preprocessing(CARD["preprocessing"]["spacing_mm"])({"image": str(images[0])})
    assert "x".join(map(str, item["image"].shape[1:])) == rows[0]["encoded_shape"]  # the card's 4 mm spacing
    with torch.no_grad():
        expected = encoder.eval()(item["image"].as_tensor()[None])["cls"][0].numpy()
    np.testing.assert_allclose(features["cls"][0], expected, rtol=1e-4, atol=1e-5)


def test_inference_without_weights_names_the_command(tmp_path):
    bundle = tiny_bundle(tmp_path, weights=False)
    synthetic_ct(tmp_path / "ct")
    result = run_inference(bundle, tmp_path / "ct", tmp_path / "features")
    assert result.returncode == 1
    assert "model.pt" in result.stderr and "configs/train.yaml" in result.stderr and "make demo" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "features").exists()


def test_encoder_embedding_loads_the_flat_weights_strictly(tmp_path):
    bundle = tiny_bundle(tmp_path)
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    net = EncoderEmbedding(SwinDAGMaN(**TINY_ENCODER), token="global")
    assert list(net.state_dict()) == list(state)
    net.load_state_dict(state)  # strict
    with pytest.raises(RuntimeError, match="Missing key"):
        net.load_state_dict({k: v for k, v in state.items() if k != "mask_token"})
    out = net.eval()(torch.rand(2, 1, 32, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 192)
