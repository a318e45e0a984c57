"""monai.bundle.load on every bundle: it reads configs/inference.json and returns the network with the weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_ENCODER, imported_script
from monai.bundle import ConfigParser

from dagman_components.networks import SwinDAGMaN
from dagman_components.weights.state_dict import export_encoder

BUNDLES = REPO / "bundles"
PRETRAINING = "dagman_ct_pretraining"
NAMES = ["dagman_ct_pretraining", "dagman_lung_nodule_ct_classification", "dagman_lung_tumor_ct_segmentation",
         "dagman_organ_ct_clustering"]
TINY_CARD = {"network": {"class": "dagman_components.networks.SwinDAGMaN", "in_channels": 1, "window_size": 4,
                         "patch_size": 2, "sa_stage": 3, **TINY_ENCODER},
             "preprocessing": {"orientation": "RAS", "spacing_mm": [2.0, 2.0, 2.0], "hu_window": [-175.0, 250.0]}}


def copy_bundle(name: str, root: Path) -> Path:
    """The bundle's shipped files (configs, LICENSE, docs, sample data) without models/ or outputs."""
    src, dst = BUNDLES / name, root / name
    ignore = shutil.ignore_patterns("models", "eval", "runs", "__pycache__")
    shutil.copytree(src, dst, ignore=ignore)
    (dst / "models").mkdir()
    return dst


def tiny_bundles(root: Path, card: dict = TINY_CARD) -> dict[str, Path]:
    """All four bundles side by side, as in the repository, each with weights of the tiniest settings.

    The pretraining bundle gets tiny encoder weights and their card (as its training writes them); each
    downstream bundle gets the state dict of its own inference ``network_def`` built on that card (what the
    zoo's CI does to make weights), the clustering bundle also the card beside its encoder weights.
    """
    torch.manual_seed(0)
    bundles = {name: copy_bundle(name, root) for name in NAMES}
    settings = {k: v for k, v in card["network"].items() if k != "class"}
    export_encoder(SwinDAGMaN(**settings), bundles[PRETRAINING] / "models" / "model.pt", card)
    for name in NAMES[1:]:
        bundle = bundles[name]
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        parser.update({"bundle_root": str(bundle), "device": "$torch.device('cpu')"})
        torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")
    shutil.copy(bundles[PRETRAINING] / "models" / "model_card.json", bundles[NAMES[3]] / "models" / "model_card.json")
    return bundles


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    return tiny_bundles(tmp_path_factory.mktemp("bundles"))


def test_shipped_json_configs_equal_their_yaml():
    with imported_script("export_json_configs") as script:
        assert script.export(sorted(BUNDLES / n for n in NAMES), check=True) == []
        for name in NAMES:
            shipped = json.loads((BUNDLES / name / "configs" / "inference.json").read_text())
            sources = script.json_sources(BUNDLES / name)["inference.json"]
            assert shipped == script.merged_config(BUNDLES / name, sources)


def test_check_names_a_stale_json_config(tmp_path):
    bundle = copy_bundle(PRETRAINING, tmp_path)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["token"] = "global"
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with imported_script("export_json_configs") as script:
        assert script.export([bundle], check=True) == [str(bundle / "configs" / "inference.json")]
        assert script.main([str(bundle), "--check"]) == 1
        assert script.main([str(bundle)]) == 0 and script.export([bundle], check=True) == []


@pytest.mark.parametrize("name, network_class", [
    ("dagman_ct_pretraining", "EncoderEmbedding"), ("dagman_lung_nodule_ct_classification", "NoduleClassifier"),
    ("dagman_lung_tumor_ct_segmentation", "SwinUNETR"), ("dagman_organ_ct_clustering", "EncoderEmbedding"),
])
def test_monai_bundle_load_returns_the_network_with_the_weights(bundles, tmp_path, name, network_class):
    from monai.bundle import load

    args = tmp_path / "args.json"  # bundle_root: load() runs the config from the working directory otherwise
    args.write_text(json.dumps({"bundle_root": str(bundles[name])}))
    with pytest.warns(UserWarning, match="parsing config_file"):  # MONAI's warning about running config code
        net = load(name, bundle_dir=str(bundles[name].parent), workflow_type="inference", args_file=str(args),
                   device="cpu")
    assert isinstance(net, torch.nn.Module) and type(net).__name__ == network_class
    saved = torch.load(bundles[name] / "models" / "model.pt", weights_only=True)
    state = net.state_dict()
    assert list(state) == list(saved)
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    meta = json.loads((bundles[name] / "configs" / "metadata.json").read_text())["network_data_format"]
    shape = [32 if isinstance(s, str) else s for s in meta["inputs"]["image"]["spatial_shape"]]
    shape = [64 if str(s).startswith("64") else v for s, v in zip(meta["inputs"]["image"]["spatial_shape"], shape)]
    with torch.no_grad():
        out = net.eval()(torch.rand(1, meta["inputs"]["image"]["num_channels"], *shape))
    assert isinstance(out, torch.Tensor)
