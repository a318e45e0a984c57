"""The model zoo's pull-request checks (ci/verify_bundle.py, re-stated offline) on every bundle.

Each bundle is copied beside the others into a temporary folder with weights of the smallest settings
that keep the channel counts its metadata declares (embed 24, one block per stage, semantic attention
after stage 4: [CLS] and pooled global token are both 384 wide), and the metadata schema is copied to
``eval/schema.json`` as the zoo's ``prepare_schema.py`` would download it.

TorchScript: MONAI's ``SwinTransformer`` (in every bundle's network) cannot be compiled by
``torch.jit.script``, so every bundle goes on the zoo's TorchScript exclusion list
(``exclude_verify_torchscript_list`` in the zoo's ``ci/bundle_custom_data.py``); the test checks that
scripting does fail, and checks a traced export at the metadata's input shape instead (loaded back and
equal to the eager network). A traced export is only valid at that input shape.
"""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO
from monai.bundle import ConfigParser
from test_bundle_load import NAMES, tiny_bundles

from dagman_components.bundle_tools.zoo_checks import CHECKS, run_zoo_checks, zoo_inference_config

SCHEMA = REPO / "schemas" / "meta_schema_20240725.json"
ZOO_CARD = {"network": {"class": "dagman_components.networks.SwinDAGMaN", "in_channels": 1, "embed_dim": 24,
                        "depths": [1, 1, 1, 1], "num_heads": [3, 3, 3, 3], "window_size": 4, "patch_size": 2,
                        "sa_stage": 4, "sa_heads": 8},
            "preprocessing": {"orientation": "RAS", "spacing_mm": [2.0, 2.0, 2.0], "hu_window": [-175.0, 250.0]}}
#: Bundles the zoo's TorchScript check skips (MONAI's Swin cannot be scripted); a traced export is tested.
TORCHSCRIPT_EXCLUDED = set(NAMES)
#: The key under which each bundle's inference dataset reads its input folder (the properties check parses the
#: dataset): given a folder of test CT; the clustering bundle's default data ship with it.
INPUT_KEYS = {"dagman_ct_pretraining": "dataset_dir", "dagman_lung_tumor_ct_segmentation": "dataset_dir",
              "dagman_lung_nodule_ct_classification": "infer_source"}
#: Known failures, with the reason; the test fails when one starts passing (strict).
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The four bundles with tiny weights and the schema, the properties' test data, and the check results."""
    root = tmp_path_factory.mktemp("models")
    bundles = tiny_bundles(root, ZOO_CARD)
    ct = root / "ct"
    ct.mkdir()
    volume = np.random.default_rng(0).uniform(-1000, 400, size=(40, 40, 40)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0])), ct / "case0.nii.gz")
    results = {}
    for name, bundle in bundles.items():
        (bundle / "eval").mkdir(exist_ok=True)
        shutil.copy(SCHEMA, bundle / "eval" / "schema.json")
        overrides = {INPUT_KEYS[name]: str(ct)} if name in INPUT_KEYS else {}
        results[name] = run_zoo_checks(bundle, bundle / "eval" / "schema.json", overrides=overrides,
                                       traced_torchscript=name in TORCHSCRIPT_EXCLUDED)
    return bundles, results


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("check", CHECKS)
def test_zoo_check(zoo, name, check):
    _, results = zoo
    if (name, check) in KNOWN_FAILURES:
        assert results[name][check].startswith("FAIL"), f"now passes: remove it from KNOWN_FAILURES ({check})"
        pytest.xfail(KNOWN_FAILURES[name, check])
    assert results[name][check] == "PASS", results[name][check]


def test_checks_fail_where_the_zoo_would(zoo, tmp_path):
    """The re-stated checks catch what the zoo catches: no weights, no inference config, a dict network_def."""
    bundles, _ = zoo
    bundle = tmp_path / "dagman_ct_pretraining"
    shutil.copytree(bundles["dagman_ct_pretraining"], bundle)
    (bundle / "models" / "model.pt").unlink()
    assert "models/model.pt is not existing" in run_zoo_checks(bundle, SCHEMA, checks=("directory",))["directory"]
    shutil.copytree(bundles["dagman_ct_pretraining"] / "models", bundle / "models", dirs_exist_ok=True)
    config = zoo_inference_config(bundle)
    text = config.read_text().replace("_target_: dagman_components.networks.EncoderEmbedding",
                                      "_target_: dagman_components.networks.EncoderEmbedding\n  _mode_: default")
    network = "network: \"$dagman_components.weights.encoder_io.with_encoder_weights(@network_def"
    assert network in text
    config.write_text(text.replace("network_def:\n", "network_def_wrapped:\n").replace(
        network, "network_def: '$@network_def_wrapped.encoder'\n" + network))
    result = run_zoo_checks(bundle, SCHEMA, checks=("data_shape",))["data_shape"]
    assert "has no attribute 'shape'" in result, result  # the encoder's dict
    for suffix in ("json", "yaml"):
        (bundle / "configs" / f"inference.{suffix}").unlink()
    assert "inference config file is not existing" in run_zoo_checks(bundle, SCHEMA, checks=("directory",))["directory"]
    with pytest.raises(ValueError, match="unknown zoo checks"):
        run_zoo_checks(bundle, SCHEMA, checks=("shape",))


@pytest.mark.parametrize("name", sorted(TORCHSCRIPT_EXCLUDED - {"dagman_lung_nodule_ct_classification"}))
def test_torchscript_exclusion_is_needed(zoo, name):
    """torch.jit.script fails on the network (the reason for the exclusion)."""
    bundles, _ = zoo
    parser = ConfigParser()
    parser.read_config(str(zoo_inference_config(bundles[name])))
    parser.update({"bundle_root": str(bundles[name])})
    with pytest.raises(Exception):
        torch.jit.script(parser.get_parsed_content("network_def"))
