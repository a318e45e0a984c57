"""Zoo-style unit test of dagman_lung_nodule_ct_classification (after the model zoo's ci/unit_tests).

The zoo's unit tests read configs/inference.json: train.yaml + infer.yaml, merged by scripts/export_json_configs.py; it runs alone.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
import unittest

import pytest
from zoo_utils import copy_bundle, run_inference, save_network_weights, write_ct

NAME = "dagman_lung_nodule_ct_classification"
TINY = {"embed_dim": 12, "depths": [2, 2, 2, 2], "num_heads": [3, 3, 3, 3], "sa_heads": 4}  # no model card beside
TEST_CASE_INFER = {**TINY, "device": "$torch.device('cpu')", "num_workers": 0, "batch_size": 2}

pytestmark = pytest.mark.slow


class TestDAGMaNNoduleClassification(unittest.TestCase):
    def setUp(self):
        self.root = tempfile.mkdtemp()
        self.bundle_root = str(copy_bundle(NAME, self.root))
        self.infer_source = os.path.join(self.root, "crops")
        os.makedirs(self.infer_source)
        write_ct(self.infer_source, count=3, shape=(32, 32, 32), spacing=1.0)  # nodule-centred crops, 1 mm
        save_network_weights(self.bundle_root, **TINY)

    def tearDown(self):
        shutil.rmtree(self.root)

    def test_infer_config(self):
        output_dir = os.path.join(self.root, "eval")
        run_inference(self.bundle_root, infer_source=self.infer_source, output_dir=output_dir, **TEST_CASE_INFER)
        with open(os.path.join(output_dir, "inference", "inference_predictions.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
        self.assertEqual(sorted(r["id"] for r in rows), ["image_0", "image_1", "image_2"])
        self.assertTrue(all(0.0 <= float(r["probability_malignant"]) <= 1.0 for r in rows))


if __name__ == "__main__":
    unittest.main()
