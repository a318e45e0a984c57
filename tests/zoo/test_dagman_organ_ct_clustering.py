"""Zoo-style unit test of dagman_organ_ct_clustering (after the model zoo's ci/unit_tests)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import unittest

import pytest
import torch
from zoo_utils import copy_bundle, run_inference

from dagman_components.networks import SwinDAGMaN
from dagman_components.weights.state_dict import export_encoder

NAME = "dagman_organ_ct_clustering"
TINY = {"embed_dim": 12, "depths": [2, 2, 2, 2], "num_heads": [3, 3, 3, 3], "sa_heads": 4}
TEST_CASE_INFER = {"device": "$torch.device('cpu')", "umap_neighbors": 10}

pytestmark = pytest.mark.slow


class TestDAGMaNOrganClustering(unittest.TestCase):
    def setUp(self):
        self.root = tempfile.mkdtemp()
        self.bundle_root = str(copy_bundle(NAME, self.root))
        torch.manual_seed(0)  # the bundle's own weights with their model card (as a packaged bundle ships them)
        export_encoder(SwinDAGMaN(**TINY), os.path.join(self.bundle_root, "models", "model.pt"),
                       {"network": {"class": "dagman_components.networks.SwinDAGMaN", **TINY}})

    def tearDown(self):
        shutil.rmtree(self.root)

    def test_infer_config(self):  # on the organ crops shipped in sample_data/
        run_inference(self.bundle_root, **TEST_CASE_INFER)
        out = os.path.join(self.bundle_root, "eval", "pretrained_global")
        metrics = json.loads(open(os.path.join(out, "clustering_metrics.json")).read())
        self.assertEqual(metrics["encoder"]["feature_dim"], 12 * 16)
        self.assertTrue(os.path.isfile(os.path.join(out, "umap.png")))


if __name__ == "__main__":
    unittest.main()
