"""Bundle metadata a model-zoo reviewer checks: one paper title, a data licence, versions that install."""

from __future__ import annotations

import configparser
import json

import pytest
from conftest import REPO

BUNDLES = sorted(p for p in (REPO / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())
PAPER = "Co-distilled attention guided masked image modeling with noisy teacher for self-supervised learning on medical images"


def test_four_bundles_found():
    assert [b.name for b in BUNDLES] == ["dagman_ct_pretraining", "dagman_lung_nodule_ct_classification",
                                         "dagman_lung_tumor_ct_segmentation", "dagman_organ_ct_clustering"]


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_one_paper_title_and_a_data_licence(bundle):
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    midl = [r for r in meta["references"] if "MIDL 2025" in r]
    assert len(midl) == 1 and PAPER in midl[0], midl
    readme = (bundle / "docs" / "README.md").read_text()
    assert PAPER in readme and "Deeply-supervised" not in readme and "Self-distilled Attention" not in readme
    licence = (bundle / "docs" / "data_license.txt").read_text()
    assert "CC BY" in licence and "clinical" in licence


def test_supported_python_versions_match_the_pinned_packages():
    # numpy 2.4.x and pandas 3.1.x, pinned in the metadata, publish no wheels for Python 3.10
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    assert cfg["options"]["python_requires"] == ">=3.11,<3.13"
    pins = {}
    for bundle in BUNDLES:
        meta = json.loads((bundle / "configs" / "metadata.json").read_text())
        pins.update({"numpy": meta["numpy_version"]}, **meta["required_packages_version"])
    assert pins["numpy"].startswith("2.4") and "Python 3.11 or 3.12" in (REPO / "README.md").read_text()
