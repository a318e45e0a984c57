"""The paper's comparisons: diversity report, diversity handler, attention overlay, ViT variant, compare script resume."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from conftest import DATA, REPO, TINY_ENCODER, imported_script
from ignite.engine import Engine
from monai.bundle import ConfigParser

from dagman_components.handlers import DiagnosticEvents
from dagman_components.handlers.attention_diversity import AttentionDiversityHandler
from dagman_components.metrics.diversity_report import (
    diversity_report,
    encoder_stage_diversity,
    volume_loader,
)
from dagman_components.weights.encoder_io import prepare_encoder
from dagman_components.networks import DAGMaNPretrainNetwork, SwinDAGMaN
from dagman_components.networks.vit_dagman import ViTDAGMaN
from dagman_components.visualize.attention_overlay import attention_overlay_figure, attention_volume
from dagman_components.visualize.heatmap import OUTLINE_COLOUR, plot_attention_slices
from dagman_components.weights.state_dict import export_encoder

CONFIGS = REPO / "bundles" / "dagman_ct_pretraining" / "configs"
CT = str(DATA / "totalseg_example" / "example_ct_sm.nii.gz")
NODULE = str(DATA / "lidc_nodules_sample" / "image" / "LIDC-IDRI-0001_R_1.nii.gz")
CARD = {
    "network": {"class": "dagman_components.networks.SwinDAGMaN", **{k: list(v) if isinstance(v, tuple) else v
                                                                      for k, v in TINY_ENCODER.items()}},
    "training": {"roi_size": [32, 32, 32]},
    "preprocessing": {"spacing_mm": [4.0, 4.0, 4.0]},
}
TINY_BUNDLE = {"roi_size": [32, 32, 32], "embed_dim": 12, "depths": [2, 2, 2, 2], "num_heads": [3, 3, 3, 3],
               "sa_heads": 3, "head_out_dim": 32, "head_hidden_dim": 16, "head_bottleneck_dim": 8, "max_epochs": 2}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    export_encoder(SwinDAGMaN(**TINY_ENCODER), path, CARD)
    return path


def test_diversity_report_writes_json_and_one_png_per_stage(tiny_checkpoint, tmp_path):
    rep = diversity_report(tiny_checkpoint, [{"image": CT}, {"image": NODULE}], tmp_path, progress=False)
    saved = json.loads((tmp_path / "diversity.json").read_text())
    assert saved["volumes"] == 2 and saved["roi_size"] == [32, 32, 32] and saved["init"] == "pretrained"
    assert sorted(saved["stages"]) == ["stage1", "stage2", "stage3", "stage4"]
    for stage in range(1, 5):
        png = tmp_path / f"diversity_stage{stage}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        s = saved["stages"][f"stage{stage}"]
        assert len(s["per_head_mean_distance"]["mean"]) == 3 and s["volumes"] == 2
        values = s["distance_entropy_bits"]["values"]
        assert s["distance_entropy_bits"]["mean"] == pytest.approx(np.mean(values))
        assert s["distance_entropy_bits"]["std"] == pytest.approx(np.std(values))
    # the first volume's numbers are those of the encoder run directly on the same preprocessed crop
    encoder = prepare_encoder(tiny_checkpoint)
    image = volume_loader([{"image": CT}], 32, spacing=(4.0, 4.0, 4.0))[0]["image"].unsqueeze(0)
    direct, _ = encoder_stage_diversity(encoder, image)
    assert rep["stages"]["stage2"]["distance_entropy_bits"]["values"][0] == pytest.approx(
        direct[2]["distance_entropy_bits"], abs=1e-6)
    assert not encoder.training  # measured in eval mode


def test_diversity_refuses_a_vit():
    vit = ViTDAGMaN(img_size=32, patch_size=8, hidden_size=24, num_layers=2, num_heads=3)
    with pytest.raises(ValueError, match="no Swin stages"):
        encoder_stage_diversity(vit, torch.rand(1, 1, 32, 32, 32))


class _Writer:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass


def test_handler_logs_per_stage_every_n_epochs():
    torch.manual_seed(0)
    net = DAGMaNPretrainNetwork(SwinDAGMaN(**TINY_ENCODER), out_dim=16, hidden_dim=8, bottleneck_dim=4).train()
    image = torch.rand(1, 1, 32, 32, 32)
    writer = _Writer()
    engine = Engine(lambda e, b: None)
    handler = AttentionDiversityHandler(net, interval=2, images=image, summary_writer=writer)
    handler.attach(engine)
    fired = []
    engine.add_event_handler(DiagnosticEvents.ATTENTION_DIVERSITY, lambda e: fired.append(handler.epoch))
    engine.run([0], max_epochs=5)
    assert sorted({s for _, _, s in writer.scalars}) == [2, 4]
    tags = {t for t, _, s in writer.scalars if s == 2}
    assert len(tags) == 16 and "diversity/stage3/distance_entropy_bits" in tags
    expected, _ = encoder_stage_diversity(net.encoder, image)
    logged = {t: v for t, v, s in writer.scalars if s == 4}
    assert logged["diversity/stage1/distance_entropy_bits"] == pytest.approx(expected[1]["distance_entropy_bits"])
    assert logged["diversity/stage2/mean_distance"] == pytest.approx(np.mean(expected[2]["per_head_mean_distance"]))
    assert net.training  # the student's mode is restored
    assert handler.summary["stage4"]["volumes"] == 1 and fired == [2, 4]
    assert not hasattr(engine.state, "attention_diversity")  # the result stays on the handler


def test_handler_is_off_by_default_and_the_override_file_adds_it(tmp_path):
    engine = Engine(lambda e, b: None)
    AttentionDiversityHandler(torch.nn.Linear(1, 1)).attach(engine)  # interval 0: nothing attached, no writer needed
    assert not any(type(h[0]).__name__ == "AttentionDiversityHandler" for hs in engine._event_handlers.values() for h in hs)
    base = ConfigParser()
    base.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "demo.yaml")])
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "demo.yaml"), str(CONFIGS / "diversity_logging.yaml")])
    parser.update({**TINY_BUNDLE, "bundle_root": str(tmp_path)})
    n = len(parser["train#main_process_handlers"])
    assert n == len(base["train#main_process_handlers"]) + 1
    handler = parser.get_parsed_content(f"train#main_process_handlers#{n - 1}")
    assert isinstance(handler, AttentionDiversityHandler) and handler.interval == 10
    assert handler.network is parser.get_parsed_content("teacher")


def test_heat_map_has_a_colour_bar_an_outline_and_transparent_low_attention(tmp_path):
    image = np.full((32, 32, 32), 0.5)
    attention = np.zeros((32, 32, 32))
    attention[16:, 16:, :] = 1.0  # one attended block
    mask = np.zeros((32, 32, 32))
    mask[4:12, 4:12, :] = 1
    fig = plot_attention_slices([image], [attention], [mask], slices=2, title="t")
    panels = [ax for ax in fig.axes if ax.images]
    bars = [ax for ax in fig.axes if ax.get_ylabel() == "attention"]
    assert len(panels) == 4 and len(bars) == 1  # CT and CT + attention per slice, one colour bar
    assert all(ax.collections for ax in panels)  # the mask's outline on every panel
    fig.savefig(tmp_path / "heat.png", dpi=110)
    overlay = panels[1].images[1].get_array()
    assert overlay.shape == (32, 32, 4)
    assert overlay[..., 3].min() == 0.0 and overlay[..., 3].max() == pytest.approx(0.75)  # low attention: transparent
    rgb = mpimg.imread(tmp_path / "heat.png")[..., :3]
    cyan = np.all(np.abs(rgb - np.array([0.0, 1.0, 1.0])) < 0.1, axis=-1)
    assert OUTLINE_COLOUR == "cyan" and cyan.sum() > 20
    with pytest.raises(ValueError, match="as many attention maps"):
        plot_attention_slices([image], [])


@pytest.mark.parametrize("sa_stage, grid, cell", [(3, [2, 2, 2], [64.0] * 3), (2, [4, 4, 4], [32.0] * 3)])
def test_overlay_shows_the_sa_grid_and_its_cell_size(tmp_path, sa_stage, grid, cell):
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    export_encoder(SwinDAGMaN(**{**TINY_ENCODER, "sa_stage": sa_stage}),
                   path, {**CARD, "network": {**CARD["network"], "sa_stage": sa_stage}})
    info = attention_overlay_figure(path, [{"image": CT, "mask": CT}], tmp_path / "overlay.png", slices=2)
    assert info["sa_grid"] == grid and info["cell_mm"] == cell
    assert mpimg.imread(tmp_path / "overlay.png").shape[2] in (3, 4)
    encoder = prepare_encoder(path)
    att = attention_volume(encoder, torch.rand(1, 1, 32, 32, 32))
    assert att.shape == (32, 32, 32) and att.min() == 0.0 and att.max() == pytest.approx(1.0)
    # nearest upsampling: one value per SA cell, so the picture shows the true cells
    assert len(np.unique(att)) == int(np.prod(grid))


@pytest.mark.parametrize("masking", ["attention_hint", "attention_high", "random"])
def test_vit_variant_takes_a_trainer_step(masking, tmp_path, monkeypatch):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "demo.yaml"), str(CONFIGS / "variants" / "vit.yaml")])
    parser.update({**TINY_BUNDLE, "bundle_root": str(tmp_path), "masking_strategy": masking, "vit_patch_size": 8,
                   "vit_hidden_size": 24, "vit_depth": 2, "vit_heads": 3})
    parser["train#dataloader"] = "$[0]"
    trainer = parser.get_parsed_content("train#trainer")
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=False)
    trainer.state.epoch, trainer.state.iteration = 2, 2
    network = parser.get_parsed_content("network")
    assert isinstance(network.encoder, ViTDAGMaN) and parser.get_parsed_content("model_card")["network"]["img_size"] == [32] * 3
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(1, 1, 32, 32, 32, generator=g), "image_2": torch.rand(1, 1, 32, 32, 32, generator=g)}
    before = {k: v.clone() for k, v in network.state_dict().items()}
    seen = []
    orig = type(trainer.masking).__call__

    def spy(self, att, grid, b, step=None):
        m = orig(self, att, grid, b, step=step)
        seen.append((att.clone(), m.clone()))
        return m

    monkeypatch.setattr(type(trainer.masking), "__call__", spy)
    out = trainer._iteration(trainer, batch)
    cells = 64  # (32 / 8)^3 patches, one mask cell each
    counts = {"attention_hint": round(0.7 * cells) - round(0.07 * cells)}
    assert out["scalars"]["masked_fraction"] == pytest.approx(counts.get(masking, round(0.7 * cells)) / cells)
    assert all(np.isfinite(v) for k, v in out["scalars"].items() if k.startswith("loss"))
    att, mask = seen[0]
    assert att.shape == (1, cells) and torch.allclose(att.sum(-1), torch.ones(1))
    if masking == "attention_high":  # the masked cells are the teacher's most attended ones
        top = set(torch.topk(att[0], round(0.7 * cells)).indices.tolist())
        assert set(torch.nonzero(mask[0]).flatten().tolist()) == top
    after = network.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_vit_rejects_another_input_size():
    vit = ViTDAGMaN(img_size=32, patch_size=8, hidden_size=24, num_layers=1, num_heads=3)
    with pytest.raises(ValueError, match="img_size"):
        vit(torch.rand(1, 1, 64, 64, 64))
    with pytest.raises(ValueError, match="divisible"):
        ViTDAGMaN(img_size=36, patch_size=8, hidden_size=24, num_layers=1, num_heads=3)


# ------------------------------------------------------------------------------------------------ compare script


@pytest.fixture()
def compare():
    with imported_script("compare_pretraining") as module:
        yield module


def test_compare_resumes_where_it_stopped(compare, tmp_path, monkeypatch):
    calls = []
    broken = {"smit/nodule_lp"}

    def stub(step):
        def run(variant, run_dir, args):
            calls.append(f"{variant}/{step}")
            if f"{variant}/{step}" in broken:
                raise RuntimeError("interrupted")
            value = {"pretrain": {"seconds": 1.0, "final_loss_last10pct": {"loss": 2.0}},
                     "nodule_lp": {"auc_mean": 0.75, "auc_std": 0.05},
                     "organ_clustering": {"knn_accuracy": 0.5, "silhouette": 0.1, "nmi": 0.3},
                     "head_diversity": {"stage1": {"entropy_mean": 3.0, "entropy_std": 0.1}},
                     "attention_overlay": {"png": "x.png"},
                     "attention_in_mask": {"mean_ratio": 1.5, "mean_mass_inside": 0.3, "mean_mask_share": 0.2}}[step]
            return value

        return run

    for step in compare.STEPS:
        monkeypatch.setitem(compare.STEP_FUNCTIONS, step, stub(step))
    argv = ["--ct_dir", str(tmp_path), "--nodules", str(tmp_path), "--organs", str(tmp_path / "o.npz"),
            "--output", str(tmp_path / "out"), "--variants", "random_init", "dagman", "smit", "--max_epochs", "3"]
    assert compare.main(argv) == 1
    first = list(calls)
    assert len(first) == 3 * len(compare.STEPS) and "smit/nodule_lp" in first
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "nodule_lp" not in saved["runs"]["smit"] and "head_diversity" in saved["runs"]["smit"]
    broken.clear()
    calls.clear()
    assert compare.main(argv) == 0
    assert calls == ["smit/nodule_lp"]  # only the missing step runs again
    table = json.loads((tmp_path / "out" / "table.json").read_text())
    assert list(table) == ["random_init", "dagman", "smit"] and table["smit"]["nodule_lp_auc"] == 0.75
    md = (tmp_path / "out" / "results.md").read_text()
    assert md.count("\n| ") == 4 and "0.750 ± 0.050" in md  # header + 3 variants
    assert (tmp_path / "out" / "results.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(compare.SettingsMismatchError, match="max_epochs"):
        compare.main(argv[:-1] + ["4"])
    with pytest.raises(ValueError, match="unknown variant"):
        compare.main(argv[:-6] + ["--variants", "nope"])


def test_summarise_seeds_gives_mean_and_std(compare, tmp_path):
    for seed, (auc, ratio) in enumerate(((0.70, 1.0), (0.80, 2.0), (0.75, None))):
        out = tmp_path / f"seed{seed}"
        out.mkdir()
        (out / "table.json").write_text(json.dumps({"dagman": {"nodule_lp_auc": auc, "satt_in_nodule_ratio": ratio}}))
    assert compare.main(["--summarise", *(str(tmp_path / f"seed{k}") for k in range(3)), "--output",
                         str(tmp_path / "all")]) == 0
    summary = json.loads((tmp_path / "all" / "results_seeds.json").read_text())
    auc = summary["dagman"]["nodule_lp_auc"]
    assert auc["n"] == 3 and auc["mean"] == pytest.approx(0.75) and auc["std"] == pytest.approx(np.std([0.7, 0.8, 0.75]))
    assert summary["dagman"]["satt_in_nodule_ratio"] == {"mean": 1.5, "std": 0.5, "n": 2}  # a missing value is left out
    assert "0.750 ± 0.041" in (tmp_path / "all" / "results_seeds.md").read_text()
    with pytest.raises(FileNotFoundError, match="table.json"):
        compare.summarise_seeds([tmp_path / "nope"], tmp_path / "x")


def test_compare_pretraining_failure_skips_the_variants_evaluations(compare, tmp_path, monkeypatch):
    calls = []

    def failing_pretrain(variant, run_dir, args):
        calls.append(variant)
        raise RuntimeError("bundle failed")

    monkeypatch.setitem(compare.STEP_FUNCTIONS, "pretrain", failing_pretrain)
    argv = ["--ct_dir", str(tmp_path), "--nodules", str(tmp_path), "--organs", str(tmp_path / "o.npz"),
            "--output", str(tmp_path / "out"), "--variants", "smit"]
    assert compare.main(argv) == 1 and calls == ["smit"]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["runs"]["smit"] == {}


def test_nodule_cache_holds_no_pickled_objects_and_reads_back_equal(tmp_path):
    from dagman_components.classification.encoder_comparison import load_nodule_set

    cache = tmp_path / "cache" / "nodules.pt"
    first = load_nodule_set(DATA / "lidc_nodules_sample", cache)
    stored = torch.load(cache, weights_only=True)  # would refuse numpy arrays or other pickled objects
    assert set(stored) == {"images", "ids", "hu_window"} and stored["hu_window"] == [-175.0, 250.0]
    again = load_nodule_set(DATA / "lidc_nodules_sample", cache)
    assert torch.equal(first.images, again.images) and first.ids == again.ids
    lung = load_nodule_set(DATA / "lidc_nodules_sample", cache, hu_window="lung")  # another window: not the cache
    assert lung.hu_window == (-1024.0, 300.0) and not torch.equal(lung.images, first.images)
    assert torch.equal(first.images_for("lung"), lung.images) and first.images_for("soft_tissue") is first.images
    assert np.array_equal(first.labels, again.labels) and np.array_equal(first.patients, again.patients)
    assert len(first.ids) == 24 and first.images.shape[1:] == (1, 32, 32, 32)
