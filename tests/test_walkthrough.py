"""Walkthrough: what a new user does, in an empty working directory, with only the READMEs' commands.

The repository's ``bundles/`` and ``data/`` are copied into ``tmp_path`` (the layout the READMEs'
relative paths assume: the downstream bundles find the demo's weights in the pretraining bundle
beside them); every command runs there with ``sys.executable`` and no network flag, and nothing is
written into the repository. The steps, in order, each asserting the outputs its README promises:

1. ``make demo``'s command (top-level ``Makefile``, target ``demo``) as written: ``models/model.pt``,
   ``models/model_card.json``, ``models/checkpoint.pt``, ``runs/loss_curves.png``, ``runs/probe_auc.png``.
2. Nodule classification (``bundles/dagman_lung_nodule_ct_classification/docs/README.md``): training on
   ``data/lidc_nodules_sample`` with ``--batch_size 4``, then inference on a folder of two of its crops.
   Size override: ``--max_epochs 2`` (the default 30 epochs is a real run, not a test).
3. Tumour segmentation (``bundles/dagman_lung_tumor_ct_segmentation/docs/README.md``): the CPU demo
   (``train.yaml`` + ``demo.yaml``), then ``inference.yaml`` on one volume. Size overrides:
   ``--max_epochs 1 --val_interval 1`` (the demo's 2 epochs with one validation at the end take
   several minutes on 2 cores; one epoch with its validation still writes ``models/model.pt``).
4. Organ clustering (``bundles/dagman_organ_ct_clustering/docs/README.md``): ``inference.yaml`` as written.
5. ``scripts/package_bundle.py`` on the pretraining bundle; the zip is unzipped into an empty folder and
   ``dagman_components.weights.encoder_io.prepare_encoder`` builds and loads the unzipped ``models/model.pt``.
6. The unzipped bundle runs where it is, with no repository beside it: its ``inference.yaml`` on its own
   sample CT (features and S_ATT maps), then the demo's command (``--max_epochs 1``) on its own
   ``sample_data/``.
7. The three downstream bundles, packaged with the weights trained above and each unzipped alone into an
   empty folder: each runs its inference config from there (classification and segmentation on one of
   the shipped crops, clustering on its shipped organ crops), with no pretraining bundle beside it: the
   model card written with the trained weights gives the network's settings, and the classifier's
   validation threshold travels with them.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dagman_components.weights.encoder_io import prepare_encoder

REPO = Path(__file__).resolve().parents[1]
PRE = "bundles/dagman_ct_pretraining"
CLS = "bundles/dagman_lung_nodule_ct_classification"
SEG = "bundles/dagman_lung_tumor_ct_segmentation"
CLU = "bundles/dagman_organ_ct_clustering"
STEP_TIMEOUT_S = 900


def _run(cwd: Path, *args: str) -> str:
    """Run ``python <args>`` in ``cwd`` as the user would (this checkout importable); its output, or fail with its tail."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"exit {done.returncode}: python {' '.join(args)}\n{output[-4000:]}"
    return output


def _bundle_run(cwd: Path, bundle: str, configs: list[str], *overrides: str) -> str:
    """``python -m monai.bundle run`` as the READMEs write it (``--bundle_root $B --logging_file $B/configs/logging.conf``)."""
    config_file = configs[0] if len(configs) == 1 else "[" + ",".join(f"'{c}'" for c in configs) + "]"
    return _run(
        cwd, "-m", "monai.bundle", "run", "--config_file", config_file, "--bundle_root", bundle,
        "--logging_file", f"{bundle}/configs/logging.conf", *overrides,
    )  # fmt: skip


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _run_outputs(folder: str, names: list[str]) -> list[str]:
    """``shutil.copytree`` ignore rule: caches, and what bundle runs write (``runs/``, ``eval/``, and in
    ``models/`` everything but ``.gitkeep``), so the copy is the repository as cloned."""
    here = Path(folder)
    skip = [n for n in names if n == "__pycache__"]
    if here.parent.name == "bundles":  # a bundle's root
        skip += [n for n in names if n in ("runs", "eval")]
    if here.name == "models" and here.parent.parent.name == "bundles":
        skip += [n for n in names if n != ".gitkeep"]
    return skip


@pytest.mark.slow
def test_readme_walkthrough(tmp_path):
    work = tmp_path / "clone"
    for part in ("bundles", "data"):  # what a fresh clone holds: outputs of earlier runs here (make demo) stay out
        shutil.copytree(REPO / part, work / part, ignore=_run_outputs)
    for bundle in (PRE, CLS, SEG, CLU):
        assert not (work / bundle / "models" / "model.pt").exists(), f"{bundle}: outputs were copied"

    # 1. make demo (Makefile, target demo), as written
    pre_configs = [f"{PRE}/configs/train.yaml", f"{PRE}/configs/demo.yaml", f"{PRE}/configs/probe.yaml"]
    _bundle_run(work, PRE, pre_configs)
    pre = work / PRE
    for rel in ("models/model.pt", "models/model_card.json", "models/checkpoint.pt"):
        assert (pre / rel).is_file(), rel
    assert _is_png(pre / "runs" / "loss_curves.png") and _is_png(pre / "runs" / "probe_auc.png")
    card = json.loads((pre / "models" / "model_card.json").read_text())
    assert card["sha256"] == prepare_encoder(pre / "models" / "model.pt").weights_sha256

    # 2. classification: train on the shipped crops (batch 4, as the README says), then inference
    _bundle_run(work, CLS, [f"{CLS}/configs/train.yaml"],
                "--dataset_dir", "data/lidc_nodules_sample", "--batch_size", "4", "--max_epochs", "2")  # fmt: skip
    cls = work / CLS
    assert (cls / "models" / "model.pt").is_file() and (cls / "models" / "threshold.json").is_file()
    assert _is_png(cls / "eval" / "training_curves.png")
    crops = sorted((work / "data" / "lidc_nodules_sample" / "image").glob("*.nii.gz"))[:2]
    new_nodules = work / "new_nodules"
    new_nodules.mkdir()
    for crop in crops:
        shutil.copy(crop, new_nodules / crop.name)
    _bundle_run(work, CLS, [f"{CLS}/configs/inference.json"],
                "--infer_source", "new_nodules")  # fmt: skip
    infer_dir = cls / "eval" / "inference"
    with (infer_dir / "inference_predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(crops)
    for row in rows:
        assert 0.0 <= float(row["probability_malignant"]) <= 1.0
        assert row["prediction"] in ("0", "1")
        attention = nib.load(infer_dir / f"{row['id']}_attention.nii.gz")
        shown = nib.load(infer_dir / f"{row['id']}_input.nii.gz")
        assert attention.shape == shown.shape
        assert np.allclose(attention.affine, shown.affine)
        assert np.asarray(attention.dataobj, dtype=np.float64).sum() == pytest.approx(1.0, abs=1e-3)
        assert _is_png(infer_dir / f"{row['id']}_attention.png")

    # 3. segmentation: the CPU demo, then inference on one volume into a folder of the user's choice
    _bundle_run(work, SEG, [f"{SEG}/configs/train.yaml", f"{SEG}/configs/demo.yaml"],
                "--max_epochs", "1", "--val_interval", "1")  # fmt: skip
    assert (work / SEG / "models" / "model.pt").is_file()
    case = sorted((work / "data" / "lidc_nodules_sample" / "image").glob("*.nii.gz"))[0]
    _bundle_run(work, SEG, [f"{SEG}/configs/inference.yaml"],
                "--dataset_dir", str(case.relative_to(work)), "--output_dir", "masks")  # fmt: skip
    masks = sorted((work / "masks").rglob("*_seg.nii.gz"))
    assert [m.name for m in masks] == [case.name.replace(".nii.gz", "_seg.nii.gz")]
    mask, image = nib.load(masks[0]), nib.load(case)
    assert mask.shape == image.shape
    assert np.allclose(mask.affine, image.affine, atol=1e-4)
    assert mask.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}

    # 4. clustering with the demo's weights (the pretraining bundle beside it), as written
    _bundle_run(work, CLU, [f"{CLU}/configs/inference.yaml"])
    out = work / CLU / "eval" / "pretrained_global"  # eval/<init>_<token>: 'pretrained' = the demo's weights
    metrics = json.loads((out / "clustering_metrics.json").read_text())
    assert metrics
    assert _is_png(out / "umap.png")
    with (out / "embeddings.csv").open(newline="") as f:
        assert len(list(csv.DictReader(f))) == 42  # the 42 shipped crops
    with np.load(out / "features.npz") as features:
        assert all(np.isfinite(features[k]).all() for k in features.files if features[k].dtype.kind == "f")

    # 5. package the pretraining bundle, unzip into an empty folder, load the unzipped weights
    printed = _run(work, str(REPO / "scripts" / "package_bundle.py"), PRE, "--out", "dist")
    zips = sorted((work / "dist").glob("*.zip"))
    assert len(zips) == 1 and zips[0].name in printed
    unzipped = tmp_path / "unzipped"
    unzipped.mkdir()
    with zipfile.ZipFile(zips[0]) as zf:
        zf.extractall(unzipped)
    weights = unzipped / "dagman_ct_pretraining" / "models" / "model.pt"
    assert (weights.with_name("model_card.json")).is_file()
    assert not (weights.with_name("checkpoint.pt")).exists()  # training state is not released
    encoder = prepare_encoder(weights)
    assert encoder.init == "pretrained" and encoder.weights_sha256 == card["sha256"]
    shipped = torch.load(pre / "models" / "model.pt", map_location="cpu", weights_only=True)
    loaded = encoder.state_dict()
    common = set(shipped) & set(loaded)
    assert common, "no tensor of model.pt was loaded into the encoder"
    assert all(torch.equal(shipped[k], loaded[k]) for k in common)

    # 6. the unzipped bundle runs by itself: inference on its own sample CT, then the demo on its sample data
    alone = unzipped / "dagman_ct_pretraining"
    ct = alone / "sample_data" / "totalseg_example" / "example_ct_sm.nii.gz"
    _bundle_run(unzipped, "dagman_ct_pretraining", ["dagman_ct_pretraining/configs/inference.yaml"],
                "--dataset_dir", str(ct.relative_to(unzipped)), "--output_dir", "features")  # fmt: skip
    with np.load(unzipped / "features" / "features.npz") as features:
        assert features["cls"].shape[0] == 1 and np.isfinite(features["cls"]).all()
    assert len(list((unzipped / "features" / "attention").glob("*_s_att.nii.gz"))) == 1
    demo = [f"dagman_ct_pretraining/configs/{c}" for c in ("train.yaml", "demo.yaml", "probe.yaml")]
    _bundle_run(unzipped, "dagman_ct_pretraining", demo, "--max_epochs", "1")
    assert (alone / "models" / "model.pt").is_file() and _is_png(alone / "runs" / "probe_auc.png")

    # 7. each downstream bundle, packaged with its trained weights and unzipped alone, runs its inference config
    for rel in ("model.pt", "model_card.json"):  # clustering trains nothing: it ships the encoder it uses
        shutil.copy(pre / "models" / rel, work / CLU / "models" / rel)
    crop = sorted((work / "data" / "lidc_nodules_sample" / "image").glob("*.nii.gz"))[0]
    runs = {  # bundle -> (inference overrides, an output it must write, relative to its unzipped folder)
        CLS: (("--infer_source", crop.name), "{b}/eval/inference/inference_predictions.csv"),
        SEG: (("--dataset_dir", crop.name, "--output_dir", "masks"), "masks/**/*_seg.nii.gz"),
        CLU: ((), "{b}/eval/pretrained_global/umap.png"),
    }
    for bundle, (overrides, output) in runs.items():
        name = Path(bundle).name
        # the segmenter's weights (65 MB) are over the zoo's 25 MB per file: shipped in the zip here
        _run(work, str(REPO / "scripts" / "package_bundle.py"), bundle, "--out", f"dist_{name}", "--max-file-mb", "100")
        (zip_path,) = sorted((work / f"dist_{name}").glob("*.zip"))
        alone = tmp_path / f"alone_{name}"
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(alone)
        shutil.copy(crop, alone / crop.name)
        assert not (tmp_path / "dagman_ct_pretraining").exists() and not (alone / "dagman_ct_pretraining").exists()
        _bundle_run(alone, name, [f"{name}/configs/inference.json"], *overrides)
        assert len(list(alone.glob(output.format(b=name)))) == 1, f"{name}: no {output} from the unzipped bundle"
    # the classifier's validation threshold travelled with its weights: the unzipped run predicts with it
    with (tmp_path / f"alone_{Path(CLS).name}" / Path(CLS).name / "eval" / "inference" / "inference_predictions.csv"
          ).open(newline="") as f:
        assert [row["prediction"] in ("0", "1") for row in csv.DictReader(f)] == [True]
