"""Atomic saving and the one encoder loader every bundle uses."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from conftest import TINY_ENCODER
from monai.networks.nets import SwinUNETR

from dagman_components.weights.encoder_io import build_encoder
from dagman_components.networks import DAGMaNPretrainNetwork, SwinDAGMaN
from dagman_components.weights.state_dict import WeightLoadError, atomic_save, export_encoder, load_pretrained_encoder, sha256_of


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(1)
    enc = SwinDAGMaN(**TINY_ENCODER)
    path = tmp_path_factory.mktemp("w") / "model.pt"
    card = export_encoder(enc, path, {"network": dict(TINY_ENCODER)})
    return enc, path, card


def test_export_writes_flat_state_dict_and_card(exported):
    enc, path, card = exported
    sd = torch.load(path, weights_only=True)
    assert set(sd) == set(enc.state_dict())
    on_disk = json.loads(path.with_name("model_card.json").read_text())
    assert on_disk["sha256"] == sha256_of(path) == card["sha256"]
    assert on_disk["network"]["embed_dim"] == 12


def test_load_into_encoder_built_from_card(exported):
    enc, path, _ = exported
    target = build_encoder(path.with_name("model_card.json"))
    report = load_pretrained_encoder(target, path)
    assert report.missing == [] and report.unexpected == [] and report.loaded_fraction == 1.0
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), enc.state_dict().values()))


def test_load_into_swinunetr_and_ddp_prefix(exported, tmp_path):
    enc, path, _ = exported
    wrapped = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in enc.state_dict().items()}}, wrapped)
    seg = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(2, 2, 2, 2), num_heads=(3, 3, 3, 3),
                    window_size=4)
    before = seg.swinViT.patch_embed.proj.weight.clone()
    report = load_pretrained_encoder(seg, wrapped, key_prefix="swinViT.")
    assert report.missing == [] and report.loaded_fraction == 1.0
    assert {k.split(".")[0] for k in report.unexpected} == {"mask_token", "sa"}
    assert torch.equal(seg.swinViT.patch_embed.proj.weight, enc.patch_embed.proj.weight)
    assert not torch.equal(before, enc.patch_embed.proj.weight)


def test_full_checkpoint_gives_the_teacher_encoder(tmp_path):
    student = DAGMaNPretrainNetwork(SwinDAGMaN(**TINY_ENCODER), out_dim=8, hidden_dim=8, bottleneck_dim=4)
    teacher = DAGMaNPretrainNetwork(SwinDAGMaN(**TINY_ENCODER), out_dim=8, hidden_dim=8, bottleneck_dim=4,
                                    with_reconstruction=False)
    path = tmp_path / "checkpoint.pt"
    atomic_save({"student": student.state_dict(), "teacher": teacher.state_dict()}, path)
    target = SwinDAGMaN(**TINY_ENCODER)
    load_pretrained_encoder(target, path)
    assert torch.equal(target.sa.cls_token, teacher.encoder.sa.cls_token)
    assert not torch.equal(target.sa.cls_token, student.encoder.sa.cls_token)


def test_other_architecture_is_refused(exported):
    _, path, _ = exported
    wider = SwinDAGMaN(**{**TINY_ENCODER, "embed_dim": 24})
    with pytest.raises(WeightLoadError, match="another architecture"):
        load_pretrained_encoder(wider, path)


def test_unrelated_or_bad_files_are_refused(tmp_path):
    target = SwinDAGMaN(**TINY_ENCODER)
    with pytest.raises(WeightLoadError, match="do not exist"):
        load_pretrained_encoder(target, tmp_path / "nope.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightLoadError, match="corrupt.pt"):
        load_pretrained_encoder(target, bad)
    other = tmp_path / "other.pt"
    torch.save(nn.Linear(3, 3).state_dict(), other)
    with pytest.raises(WeightLoadError, match="only 0 of"):
        load_pretrained_encoder(target, other)


def test_atomic_save_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_save({"a": torch.ones(1)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"a": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(1))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


class PickledThing:
    """A custom class: torch.save pickles it, torch.load(weights_only=True) refuses it."""

    def __init__(self) -> None:
        self.value = torch.ones(2)


def test_file_with_pickled_objects_is_refused_in_our_words(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": nn.Linear(2, 2).state_dict(), "extra": PickledThing()}, path)
    with pytest.raises(WeightLoadError) as info:
        load_pretrained_encoder(SwinDAGMaN(**TINY_ENCODER), path)
    message = str(info.value)
    assert str(path) in message and "pickled Python objects" in message and "will not be loaded" in message
    assert "weights_only=False" not in message and info.value.__cause__ is None  # torch's advice is not passed on

    from ignite.engine import Engine

    from dagman_components.handlers import ResumeFromCheckpoint

    net = nn.Linear(2, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(WeightLoadError, match="checkpoint .*pickled Python objects"):
        ResumeFromCheckpoint(path, {"network": net})(Engine(lambda e, b: None))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_bundle_checkpoint_loader_refuses_pickled_objects_in_our_words(tmp_path):
    from ignite.engine import Engine

    from dagman_components.handlers import WeightsOnlyCheckpointLoader

    path = tmp_path / "model.pt"
    torch.save({"model": nn.Linear(2, 2).state_dict(), "extra": PickledThing()}, path)
    loader = WeightsOnlyCheckpointLoader(load_path=str(path), load_dict={"model": nn.Linear(2, 2)})
    with pytest.raises(WeightLoadError) as info:
        loader(Engine(lambda e, b: None))
    assert "pickled Python objects" in str(info.value) and str(path) in str(info.value)
    assert "weights_only=False" not in str(info.value)


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "legacy_model_key"])
def test_bundle_checkpoint_loader_reads_flat_and_legacy_model_files(tmp_path, nested):
    """model.pt is a flat state dict; files of earlier releases ({"model": state_dict}) still load,
    with the configs' load_dict {model: "@network"}."""
    from ignite.engine import Engine

    from dagman_components.handlers import WeightsOnlyCheckpointLoader

    torch.manual_seed(0)
    trained, fresh = nn.Linear(2, 2), nn.Linear(2, 2)
    path = tmp_path / "model.pt"
    torch.save({"model": trained.state_dict()} if nested else trained.state_dict(), path)
    WeightsOnlyCheckpointLoader(load_path=str(path), load_dict={"model": fresh})(Engine(lambda e, b: None))
    assert torch.equal(fresh.weight, trained.weight) and torch.equal(fresh.bias, trained.bias)


def test_checkpoint_without_the_seed_resumes_with_a_warning(tmp_path, caplog):
    """A checkpoint written before the trainer saved its seed still resumes (not draw-for-draw)."""
    import logging

    from ignite.engine import Engine

    from dagman_components.handlers import ResumeFromCheckpoint

    net = nn.Linear(2, 2)
    path = tmp_path / "checkpoint.pt"
    torch.save({"network": net.state_dict(), "trainer": {"iteration": 4, "epoch_length": 2, "max_epochs": 3}}, path)
    engine = Engine(lambda e, b: None)
    engine.state.seed = 7
    engine.state.max_epochs = 3
    engine.state_dict_user_keys.append("seed")
    with caplog.at_level(logging.WARNING):
        ResumeFromCheckpoint(path, {"network": nn.Linear(2, 2)})(engine)
    assert engine.state.iteration == 4 and engine.state.seed == 7 and "older checkpoint" in caplog.text
