"""Zoo-style unit test of dagman_lung_tumor_ct_segmentation (after the model zoo's ci/unit_tests)."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import unittest

import nibabel as nib
import pytest
from zoo_utils import copy_bundle, run_inference, save_network_weights, write_ct

NAME = "dagman_lung_tumor_ct_segmentation"
TINY = {"embed_dim": 12, "depths": [2, 2, 2, 2], "num_heads": [3, 3, 3, 3]}  # no model card beside: explicit settings
TEST_CASE_INFER = {**TINY, "device": "cpu", "num_workers": 0, "sw_batch_size": 1}

pytestmark = pytest.mark.slow


class TestDAGMaNLungTumorSegmentation(unittest.TestCase):
    def setUp(self):
        self.root = tempfile.mkdtemp()
        self.bundle_root = str(copy_bundle(NAME, self.root))
        self.dataset_dir = os.path.join(self.root, "data")
        os.makedirs(self.dataset_dir)
        self.images = write_ct(self.dataset_dir, count=2, shape=(40, 36, 20), spacing=0.7)
        save_network_weights(self.bundle_root, **TINY)

    def tearDown(self):
        shutil.rmtree(self.root)

    def test_infer_config(self):
        output_dir = os.path.join(self.root, "eval")
        run_inference(self.bundle_root, dataset_dir=self.dataset_dir, output_dir=output_dir, **TEST_CASE_INFER)
        masks = sorted(glob.glob(os.path.join(output_dir, "*_seg.nii.gz")))
        self.assertEqual(len(masks), 2)
        for image, mask in zip(self.images, masks):
            self.assertEqual(nib.load(mask).shape, nib.load(image).shape)  # the input's own grid


if __name__ == "__main__":
    unittest.main()
