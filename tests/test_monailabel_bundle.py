# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""The segmentation bundle as a model of MONAI Label's ``monaibundle`` app, run in process.

Needs ``monailabel`` (0.8.5), which imports torchvision: it runs in the separate environment made by
``.ci/monailabel_env.sh`` and is skipped wherever ``monailabel`` cannot be imported.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

try:
    from monailabel.tasks.infer.bundle import BundleInferTask
    from monailabel.tasks.train.bundle import BundleTrainTask
except Exception as err:  # not installed, or installed without a loadable torchvision
    pytest.skip(f"monailabel is not importable here ({type(err).__name__}: {err}); "
                f"run .ci/monailabel_env.sh and use its environment", allow_module_level=True)

from monai.networks.nets import SwinUNETR

from dagman_components.networks import SwinDAGMaN
from dagman_components.segmentation import build_segmentation_datalist
from dagman_components.weights.state_dict import export_encoder

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "dagman_lung_tumor_ct_segmentation"
SAMPLE = REPO / "data" / "lidc_nodules_sample"
NAME = BUNDLE.name


def _settings() -> dict:
    """Small encoder settings; the bundle's configs (unchanged: MONAI Label reads the files as they are) take
    them from the pretraining encoder's model card beside the bundle."""
    return {"embed_dim": 12, "depths": [2, 2, 2, 2], "num_heads": [3, 3, 3, 3], "window_size": 4, "patch_size": 2}


@pytest.fixture(scope="module")
def app_models(tmp_path_factory) -> Path:
    """An app's model folder: this bundle (configs unchanged) with a models/model.pt, and the pretraining
    bundle's encoder beside it (where train.yaml's pretrained_encoder points)."""
    root = tmp_path_factory.mktemp("model")
    bundle = root / NAME
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    s = _settings()
    torch.manual_seed(0)
    net = SwinUNETR(1, 2, feature_size=s["embed_dim"], depths=s["depths"], num_heads=s["num_heads"],
                    window_size=s["window_size"], patch_size=s["patch_size"])
    (bundle / "models").mkdir()
    torch.save(net.state_dict(), bundle / "models" / "model.pt")  # flat, as the bundle's training writes it
    encoder = SwinDAGMaN(in_channels=1, **s)
    export_encoder(encoder, root / "dagman_ct_pretraining" / "models" / "model.pt", {"network": {"in_channels": 1, **s}})
    return root


def test_monailabel_bundle_inference_keeps_input_geometry(app_models, tmp_path):
    task = BundleInferTask(str(app_models / NAME), conf={"preload": "false"})
    assert task.is_valid()
    assert task.labels == {"tumour": 1}  # from metadata.json's channel_def, background dropped
    image_path = sorted((SAMPLE / "image").glob("*.nii.gz"))[0]
    label_file, result = task({"image": str(image_path), "device": "cpu"})
    image, mask = nib.load(str(image_path)), nib.load(label_file)
    assert mask.shape == image.shape
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-4)
    assert mask.get_data_dtype() == np.uint8  # MONAI Label drops SaveImaged: inference.yaml casts pred itself
    assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1}


class _Datastore:
    """The one datastore call MONAI Label's bundle training makes."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def datalist(self) -> list[dict]:
        return self.items


def test_monailabel_bundle_training_with_its_overrides(app_models):
    bundle = app_models / NAME
    task = BundleTrainTask(str(bundle), conf={})
    assert task.is_valid()
    items = [{"image": i["image"], "label": i["label"]} for i in build_segmentation_datalist(SAMPLE)[:2]]
    before = torch.load(bundle / "models" / "model.pt", weights_only=True)
    # MONAI Label overrides bundle_root, device, max_epochs, the two data lists and train#handlers (with a
    # CheckpointLoader of models/model.pt inserted, "pretrained"); the config itself is used unchanged
    task({"model": NAME, "max_epochs": 1, "val_split": 0.5, "device": "cpu", "multi_gpu": False,
          "pretrained": True, "tracking": "None"}, _Datastore(items))
    after = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert set(after) == set(before)
    assert any(not torch.equal(after[k], before[k]) for k in after)  # trained and saved again
    assert (bundle / "runs" / "training_curves.png").is_file()
