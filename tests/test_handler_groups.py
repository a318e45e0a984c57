"""train#handlers of the pretraining bundle is a list that MONAI's ConfigWorkflow.check_properties reads."""

from __future__ import annotations

import pytest
from conftest import REPO
from monai.bundle import ConfigWorkflow
from monai.bundle.properties import TrainProperties

from dagman_components.runtime.distributed import HandlerGroup

CONFIGS = REPO / "bundles" / "dagman_ct_pretraining" / "configs"


class _Recorder:
    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def attach(self, engine) -> None:
        self.log.append((self.name, engine))


@pytest.mark.parametrize("rank, expected", [("0", ["a", "b", "c"]), ("1", ["a", "b"])])
def test_groups_attach_in_order_and_main_only_on_rank_0(monkeypatch, rank, expected):
    monkeypatch.setenv("RANK", rank)
    log: list = []
    groups = [HandlerGroup([_Recorder(log, "a"), _Recorder(log, "b")]),
              HandlerGroup([_Recorder(log, "c")], main_process_only=True)]
    for group in groups:
        group.attach("engine")
    assert [name for name, _ in log] == expected and all(e == "engine" for _, e in log)


@pytest.mark.parametrize("extra", [[], ["multi_gpu_train.yaml"], ["probe.yaml", "diversity_logging.yaml"]])
def test_train_handlers_is_a_list_of_components_and_properties_check(tmp_path, extra):
    files = [str(CONFIGS / "train.yaml")] + [str(CONFIGS / f) for f in extra]
    workflow = ConfigWorkflow(config_file=files, meta_file=str(CONFIGS / "metadata.json"), logging_file=False,
                              workflow_type="train", bundle_root=str(tmp_path))
    handlers = workflow.parser["train#handlers"]
    assert isinstance(handlers, list) and all(isinstance(h, dict) and "_target_" in h for h in handlers)
    # the part of check_properties() that read train#handlers (TypeError on the former expression); the whole
    # check also needs train#inferer, which the co-distillation trainer does not have
    for name in ("evaluator", "val_interval"):
        assert workflow._check_optional_id(name, TrainProperties[name]), name
