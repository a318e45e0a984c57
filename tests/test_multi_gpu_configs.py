"""Each multi_gpu_train.yaml holds only what differs from its train.yaml: MONAI's config merging keeps
train.yaml's initialize (which runs the file's distributed_init after the lock) and appends the
process-group teardown to train.yaml's finalize. The DDP runs themselves are in the bundle tests."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO
from monai.bundle import ConfigParser

BUNDLES = ["dagman_ct_pretraining", "dagman_lung_nodule_ct_classification", "dagman_lung_tumor_ct_segmentation"]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_multi_gpu_config_lists_only_differences(bundle):
    configs = REPO / "bundles" / bundle / "configs"
    ddp_file = yaml.safe_load((configs / "multi_gpu_train.yaml").read_text())
    assert "initialize" not in ddp_file and "finalize" not in ddp_file  # merged, not re-listed
    assert "load_encoder_weights" not in (configs / "multi_gpu_train.yaml").read_text()
    single = ConfigParser()
    single.read_config(str(configs / "train.yaml"))
    merged = ConfigParser()
    merged.read_config([str(configs / "train.yaml"), str(configs / "multi_gpu_train.yaml")])
    assert merged["initialize"] == single["initialize"]
    steps = [str(step) for step in merged["initialize"]]
    assert steps.index("@distributed_init") == steps.index("$@training_lock.acquire()") + 1  # before any network
    assert single.get_parsed_content("distributed_init") == []
    assert any("init_process_group" in str(step) for step in merged["distributed_init"])
    same = [str(step).replace("::", "#") for step in single["finalize"]]  # the parser may spell '#' as '::'
    assert [str(step).replace("::", "#") for step in merged["finalize"]][: len(same)] == same
    assert str(merged["finalize"][-1]).endswith("destroy_process_group()")
    assert merged["network"]["_target_"] == "torch.nn.parallel.DistributedDataParallel"
