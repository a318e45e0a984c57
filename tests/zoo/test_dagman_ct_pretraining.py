"""Zoo-style unit test of dagman_ct_pretraining (after ci/unit_tests/test_<bundle>.py of the model zoo)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import unittest

import numpy as np
import pytest
from monai.bundle import ConfigWorkflow
from zoo_utils import check_workflow, copy_bundle, write_ct

NAME = "dagman_ct_pretraining"
TEST_CASE_TRAIN = {  # tiny settings: 32^3 views, embed 12, 2 epochs of 2 volumes
    "roi_size": [32, 32, 32], "embed_dim": 12, "depths": [2, 2, 2, 2], "num_heads": [3, 3, 3, 3], "sa_heads": 4,
    "head_out_dim": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16, "max_epochs": 2, "warmup_epochs": 1,
    "warmup_teacher_temp_epochs": 1, "batch_size": 1, "num_workers": 0, "cache_rate": 0.0, "amp": False,
    "save_interval": 2, "device": "$torch.device('cpu')",
}
TEST_CASE_INFER = {"device": "$torch.device('cpu')"}

pytestmark = pytest.mark.slow


class TestDAGMaNCTPretraining(unittest.TestCase):
    def setUp(self):
        self.root = tempfile.mkdtemp()
        self.bundle_root = str(copy_bundle(NAME, self.root))
        self.dataset_dir = os.path.join(self.root, "data")
        os.makedirs(self.dataset_dir)
        write_ct(self.dataset_dir, count=2, shape=(48, 48, 40), spacing=2.0)

    def tearDown(self):
        shutil.rmtree(self.root)

    def workflow(self, workflow_type, config, override):
        return ConfigWorkflow(
            workflow_type=workflow_type,
            config_file=os.path.join(self.bundle_root, "configs", config),
            logging_file=os.path.join(self.bundle_root, "configs", "logging.conf"),
            meta_file=os.path.join(self.bundle_root, "configs", "metadata.json"),
            bundle_root=self.bundle_root,
            dataset_dir=self.dataset_dir,
            **override,
        )

    def test_train_then_infer_config(self):
        # the co-distillation trainer has no train#inferer, a required train property: no property check here
        check_workflow(self.workflow("train", "train.yaml", TEST_CASE_TRAIN), check_properties=False)
        card = json.loads(open(os.path.join(self.bundle_root, "models", "model_card.json")).read())
        self.assertEqual(card["network"]["embed_dim"], 12)

        output_dir = os.path.join(self.root, "features")
        infer = self.workflow("infer", "inference.json", {**TEST_CASE_INFER, "output_dir": output_dir})
        check_workflow(infer, check_properties=True)
        with np.load(os.path.join(output_dir, "features.npz")) as features:
            self.assertEqual(features["cls"].shape, (2, 96))  # embed 12 * 2**3
        self.assertEqual(len(os.listdir(os.path.join(output_dir, "attention"))), 2)


if __name__ == "__main__":
    unittest.main()
