"""Encoder I/O (dagman_components.weights.encoder_io): settings from the model card, build by class, one load policy,
one spelling of random, and the downstream configs that use it."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from dagman_components.weights.encoder_io import (
    EncoderOutput,
    EncoderSettingError,
    build_encoder,
    card_path,
    encoder_settings,
    find_card,
    load_encoder_weights,
    prepare_encoder,
    trained_model_card,
    weights_or_random,
)
from dagman_components.handlers import TrainedModelCard
from dagman_components.networks import ENCODER_DEFAULTS, SwinDAGMaN
from dagman_components.networks.vit_dagman import ViTDAGMaN
from dagman_components.weights.state_dict import WeightLoadError, export_encoder, sha256_of

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
#: A small encoder with the demo's width (embed 24, heads 3-6-12-24) and shallow stages, for speed.
DEMO_LIKE = {"in_channels": 1, "embed_dim": 24, "depths": [2, 2, 2, 2], "num_heads": [3, 6, 12, 24], "window_size": 4,
             "patch_size": 2, "sa_stage": 3, "sa_heads": 8}


@pytest.fixture(scope="module")
def demo_weights(tmp_path_factory) -> Path:
    """The pretraining bundle's output as `make demo` leaves it, beside the downstream bundles' folders."""
    root = tmp_path_factory.mktemp("bundles")
    torch.manual_seed(0)
    path = root / "dagman_ct_pretraining" / "models" / "model.pt"
    export_encoder(SwinDAGMaN(**DEMO_LIKE), path, {"network": {"class": "dagman_components.networks.SwinDAGMaN",
                                                               **DEMO_LIKE}})
    return path


def _parser(bundle: str, configs: list[str], root: Path, **overrides) -> ConfigParser:
    (root / bundle).mkdir(exist_ok=True)
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / c) for c in configs])
    parser.update({"bundle_root": str(root / bundle), "device": "$torch.device('cpu')", **overrides})
    return parser


def _cause_chain(err: BaseException) -> str:
    messages = []
    while err is not None:
        messages.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(messages)


def test_card_class_picks_vit_or_swin():
    vit_card = {"network": {"class": "dagman_components.networks.vit_dagman.ViTDAGMaN", "in_channels": 1,
                            "img_size": [32, 32, 32], "patch_size": 16, "hidden_size": 24, "num_layers": 1,
                            "num_heads": 2}}
    vit = build_encoder(vit_card, drop_path_rate=0.1)  # a runtime setting the ViT does not take is dropped
    assert isinstance(vit, ViTDAGMaN) and vit.out_dim == 24
    swin = build_encoder({"network": {"class": "dagman_components.networks.SwinDAGMaN", **DEMO_LIKE}})
    assert isinstance(swin, SwinDAGMaN) and swin.embed_dim == 24
    with pytest.raises(EncoderSettingError, match="encoder class 'UNet'"):
        build_encoder({"network": {"class": "monai.networks.nets.UNet"}})


def test_settings_come_from_the_card_and_a_contradiction_fails_in_one_line(demo_weights):
    card = card_path(demo_weights)
    s = encoder_settings(card, embed_dim=None, num_heads=None, window_size=[4, 4, 4], drop_path_rate=0.1)
    assert s["embed_dim"] == 24 and s["num_heads"] == [3, 6, 12, 24] and s["drop_path_rate"] == 0.1
    with pytest.raises(EncoderSettingError) as err:
        encoder_settings(card, embed_dim=48)
    message = str(err.value)
    assert "\n" not in message and "embed_dim=48" in message and "embed_dim=24" in message and str(card) in message
    # no card: the config values over the defaults (checked against the weights when loading)
    assert encoder_settings(card_path(demo_weights.parent / "absent" / "model.pt"), embed_dim=12)["embed_dim"] == 12
    assert encoder_settings(None)["num_heads"] == ENCODER_DEFAULTS["num_heads"]
    with pytest.raises(WeightLoadError, match="another architecture"):
        load_encoder_weights(build_encoder(None), demo_weights)


def test_one_spelling_of_random(caplog):
    with caplog.at_level(logging.WARNING, logger="dagman_components.weights.encoder_io"):
        assert weights_or_random(None, "pretrained_path") is None
        assert weights_or_random("null", "pretrained_path") is None
    assert "RANDOM" in caplog.text
    for spelling in ("", "random", "None", "none", "false"):
        with pytest.raises(EncoderSettingError, match=r"config key 'my_key' is .*--my_key null"):
            weights_or_random(spelling, "my_key")
    assert weights_or_random("runs/model.pt", "my_key") == "runs/model.pt"


def test_load_policy_refuses_tensors_the_target_lacks(tmp_path):
    torch.manual_seed(1)
    deep = SwinDAGMaN(embed_dim=12, depths=(2, 2, 4, 2), num_heads=(3, 3, 3, 3), sa_heads=4)
    torch.save(deep.state_dict(), tmp_path / "deep.pt")
    shallow = SwinDAGMaN(embed_dim=12, depths=(2, 2, 2, 2), num_heads=(3, 3, 3, 3), sa_heads=4)
    with pytest.raises(WeightLoadError, match=r"2 encoder tensors|encoder tensors that the network has no place"):
        load_encoder_weights(shallow, tmp_path / "deep.pt")
    # frozen, loaded and labelled
    enc = prepare_encoder(tmp_path / "deep.pt", card={"network": {"embed_dim": 12, "depths": [2, 2, 4, 2],
                                                                  "num_heads": [3, 3, 3, 3], "sa_heads": 4}})
    assert enc.init == "pretrained" and len(enc.weights_sha256) == 64 and not enc.training
    assert not any(p.requires_grad for p in enc.parameters())
    assert all(torch.equal(v, deep.state_dict()[k]) for k, v in enc.state_dict().items())
    assert set(enc(torch.rand(1, 1, 32, 32, 32))) >= {EncoderOutput.CLS, EncoderOutput.GLOBAL, EncoderOutput.S_ATT}


def test_downstream_configs_take_the_demo_card_without_flags(demo_weights):
    root = demo_weights.parents[2]
    cls_train = _parser("dagman_lung_nodule_ct_classification", ["train.yaml"], root).get_parsed_content("network_def")
    assert cls_train.encoder.embed_dim == 24 and cls_train.encoder.sa_dim == 24 * 8
    cls_infer = _parser("dagman_lung_nodule_ct_classification", ["train.yaml", "infer.yaml"], root)
    assert cls_infer.get_parsed_content("network_def").encoder.embed_dim == 24
    seg = "dagman_lung_tumor_ct_segmentation"
    for configs in (["train.yaml", "demo.yaml"], ["inference.yaml"]):
        net = _parser(seg, configs, root).get_parsed_content("network_def")
        assert net.swinViT.embed_dim == 24 and net.swinViT.layers4[0].blocks[0].attn.num_heads == 24, configs
    clu = _parser("dagman_organ_ct_clustering", ["inference.yaml"], root).get_parsed_content("network_def").encoder
    assert clu.embed_dim == 24 and clu.init == "pretrained" and clu.load_report.loaded_fraction == 1.0
    # --model_path null: the seeded random encoder, with the default card's settings (like for like)
    rnd = _parser("dagman_organ_ct_clustering", ["inference.yaml"], root, model_path="null")
    assert rnd.get_parsed_content("network_def").encoder.embed_dim == 24
    assert rnd.get_parsed_content("encoder").init == "random"
    assert Path(rnd.get_parsed_content("output_dir")).name == "random_global"


def test_find_card_takes_the_first_weights_that_have_one(tmp_path):
    trained, encoder = tmp_path / "trained" / "model.pt", tmp_path / "encoder" / "model.pt"
    encoder.parent.mkdir()
    (encoder.parent / "model_card.json").write_text("{}")
    assert find_card(trained, encoder) == card_path(encoder)  # weights trained before cards were written
    trained.parent.mkdir()
    (trained.parent / "model_card.json").write_text("{}")
    assert find_card(trained, encoder) == card_path(trained)
    assert find_card(None, "null", encoder) == card_path(encoder)  # random: skipped
    missing = tmp_path / "none" / "model.pt"
    assert find_card(missing, tmp_path / "nowhere" / "model.pt") == card_path(missing)  # logged as missing
    assert find_card(None, "null") is None


def test_trained_model_card_records_settings_start_and_file(demo_weights, tmp_path):
    settings = encoder_settings(demo_weights, drop_path_rate=0.3, use_checkpoint=True)
    model = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, model)
    writer = TrainedModelCard(model, settings, demo_weights, {"model": {"num_classes": 2}})
    card = json.loads(writer(sha256_of(model), "val_auc", 0.75, 3))
    assert writer.path == card_path(model) and card["selected_by"] == {"val_auc": 0.75, "epoch": 3}
    assert card["network"] == {"class": "dagman_components.networks.SwinDAGMaN", **ENCODER_DEFAULTS, **DEMO_LIKE}
    assert card["encoder_weights"] == {"path": str(demo_weights), "sha256": sha256_of(demo_weights)}
    assert card["file"] == "model.pt" and card["sha256"] == sha256_of(model) and card["model"] == {"num_classes": 2}
    # the card gives back the settings it was written from (less the training-only ones), and allows
    # another drop_path_rate at inference
    settings.pop("use_checkpoint")
    assert encoder_settings(card, drop_path_rate=0.0) == {**settings, "drop_path_rate": 0.0}
    assert trained_model_card(settings, "null")["encoder_weights"] == "random"


def test_trained_models_own_card_comes_before_the_pretraining_card(demo_weights, tmp_path):
    """A downstream bundle whose models/ holds its trained weights and card builds from that card, with the
    pretraining bundle's card (embed 24) beside it and without any pretraining bundle."""
    tiny = {**DEMO_LIKE, "embed_dim": 12, "num_heads": [3, 3, 3, 3], "sa_heads": 4}
    cases = {"dagman_lung_nodule_ct_classification": (["train.yaml", "infer.yaml"], lambda n: n.encoder.embed_dim),
             "dagman_lung_tumor_ct_segmentation": (["inference.yaml"], lambda n: n.swinViT.embed_dim)}
    for root in (demo_weights.parents[2], tmp_path):
        for bundle, (configs, embed_dim) in cases.items():
            models = root / bundle / "models"
            models.mkdir(parents=True, exist_ok=True)
            model = models / "model.pt"
            torch.save({}, model)
            (models / "model_card.json").write_text(
                TrainedModelCard(model, {"class": "SwinDAGMaN", **tiny})(sha256_of(model), "val_auc", 1.0, 1))
            assert embed_dim(_parser(bundle, configs, root).get_parsed_content("network_def")) == 12, (root, bundle)
            shutil.rmtree(models)


def test_downstream_contradicting_setting_names_both_values_and_the_card(demo_weights):
    root = demo_weights.parents[2]
    parser = _parser("dagman_lung_nodule_ct_classification", ["train.yaml"], root, embed_dim=48)
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("network_def")
    text = _cause_chain(err.value)
    assert "embed_dim=48 contradicts embed_dim=24 in the model card" in text and str(card_path(demo_weights)) in text


@pytest.mark.parametrize(
    "bundle, configs, key",
    [
        ("dagman_lung_nodule_ct_classification", ["train.yaml", "infer.yaml"], "model_path"),
        ("dagman_lung_tumor_ct_segmentation", ["inference.yaml"], "ckpt_path"),
    ],
)
def test_inference_without_weights_names_the_training_command(tmp_path, bundle, configs, key):
    parser = _parser(bundle, configs, tmp_path)
    parser.get_parsed_content("initialize")  # needs no files (monai.bundle.load runs it)
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("run")
    text = _cause_chain(err.value)
    assert f"{tmp_path / bundle / 'models' / 'model.pt'}' do not exist yet" in text
    assert "made by this bundle's training (configs/train.yaml" in text


def test_with_encoder_weights_loads_every_tensor_as_the_network_is_built(demo_weights, caplog):
    """The one name configs use: the weights are in the returned network (nested under a prefix here), null
    gives the random network back with a warning, and a missing file names the config key."""
    from dagman_components.weights.encoder_io import with_encoder_weights

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = SwinDAGMaN(**DEMO_LIKE)

    torch.manual_seed(1)
    net = Holder()
    assert with_encoder_weights(net, demo_weights, key="pretrained_path", key_prefix="encoder.") is net
    shipped = torch.load(demo_weights, weights_only=True)
    assert all(torch.equal(net.encoder.state_dict()[k], v) for k, v in shipped.items())
    random_net = Holder()
    before = {k: v.clone() for k, v in random_net.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="dagman_components.weights.encoder_io"):
        assert with_encoder_weights(random_net, "null", key="pretrained_path", key_prefix="encoder.") is random_net
    assert all(torch.equal(random_net.state_dict()[k], v) for k, v in before.items())
    assert "pretrained_path is null" in caplog.text
    with pytest.raises(FileNotFoundError, match="config key 'pretrained_path'"):
        with_encoder_weights(Holder(), demo_weights.parent / "absent.pt", key="pretrained_path", key_prefix="encoder.")


def test_encoder_weights_folder_prefers_the_bundles_own_weights(tmp_path):
    from dagman_components.weights.encoder_io import encoder_weights_folder

    bundle = tmp_path / "dagman_organ_ct_clustering"
    (bundle / "models").mkdir(parents=True)
    assert encoder_weights_folder(str(bundle)) == str(bundle / ".." / "dagman_ct_pretraining" / "models")
    (bundle / "models" / "model.pt").write_bytes(b"")
    assert encoder_weights_folder(str(bundle)) == str(bundle / "models")
