"""The in-loop frozen-feature probe of DAGMaN pretraining (handlers.probe) and its override config."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import DATA, REPO
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.transforms import Compose
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dagman_components.classification.splits import grouped_stratified_folds
from dagman_components.classification.table import read_nodule_table
from dagman_components.classification.transforms import nodule_preprocessing
from dagman_components.data import HU_WINDOW
from dagman_components.handlers import (
    AtomicCheckpointSaver,
    DiagnosticEvents,
    LoggedScalars,
    ResumeFromCheckpoint,
    TeacherEMAHandler,
)
from dagman_components.handlers.probe import FrozenFeatureProbe, select_cases
from dagman_components.networks import DAGMaNPretrainNetwork, SwinDAGMaN

SAMPLE = DATA / "lidc_nodules_sample"
BUNDLE = REPO / "bundles" / "dagman_ct_pretraining"
CONFIGS = BUNDLE / "configs"
TINY_BUNDLE = {"roi_size": [32, 32, 32], "embed_dim": 12, "depths": [1, 1, 1, 1], "num_heads": [3, 3, 3, 3],
               "sa_heads": 4, "head_out_dim": 16, "head_hidden_dim": 16, "head_bottleneck_dim": 8, "max_epochs": 2}


def _network(seed: int = 0) -> DAGMaNPretrainNetwork:
    torch.manual_seed(seed)
    encoder = SwinDAGMaN(embed_dim=12, num_heads=(3, 3, 3, 3), depths=(1, 1, 1, 1), sa_heads=4)
    return DAGMaNPretrainNetwork(encoder, out_dim=16, hidden_dim=16, bottleneck_dim=8)


def _engine(teacher: nn.Module | None = None) -> Engine:
    engine = Engine(lambda e, b: {"loss": torch.tensor(0.0), "scalars": {"loss": 0.0}})
    engine.teacher = teacher
    return engine


def _probe(tmp_path, **kwargs) -> FrozenFeatureProbe:
    return FrozenFeatureProbe(SAMPLE, png_path=tmp_path / "probe_auc.png", roi_size=32, **kwargs)


class _LabelEncoder(nn.Module):
    """Stub encoder: looks each image up among the probe's images and returns its label (or a constant)."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, constant: bool = False) -> None:
        super().__init__()
        self.register_buffer("ref", images.flatten(1))
        self.register_buffer("labels", torch.as_tensor(labels, dtype=torch.float32))
        self.constant = constant

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.constant:
            f = torch.ones(len(x), 4)
        else:
            f = self.labels[torch.cdist(x.flatten(1), self.ref).argmin(1)][:, None].repeat(1, 3)
        return {"cls": f, "global": -f}


class _PooledEncoder(nn.Module):
    """Cheap deterministic stub encoder (2^3 average pooling) for the plumbing tests."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = torch.nn.functional.adaptive_avg_pool3d(x, 2).flatten(1)
        return {"cls": f, "global": f.square()}


def test_probes_at_start_every_interval_and_end_and_reports_everywhere(tmp_path):
    net = _network().train()  # any mode: restored after each probe
    engine = _engine(teacher=net)
    seen: dict[int, dict] = {}
    results: list[dict] = []
    probe = _probe(tmp_path, interval=4)  # network None: engine.teacher
    probe.attach(engine)
    probe.attach(engine)  # idempotent
    logged = LoggedScalars([probe])
    engine.add_event_handler(Events.ITERATION_COMPLETED,  # attached after it, like the bundle's TensorBoard handler
                             lambda e: seen.__setitem__(e.state.iteration, logged(e.state.output)))
    untouched = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: untouched.append(e.state.output["scalars"] == {"loss": 0.0}))
    engine.add_event_handler(DiagnosticEvents.PROBE_RESULT, lambda e: results.append(dict(probe.last_result)))
    engine.run(range(5), max_epochs=2)  # 10 iterations
    assert probe.iterations == [0, 4, 8, 10]  # baseline, every 4, and the end
    assert len(probe.aucs["cls"]) == len(probe.aucs["global"]) == len(probe.seconds) == 4
    assert net.training
    for it, scalars in seen.items():
        has = {"probe_auc_cls", "probe_auc_global"} <= set(scalars)
        assert has == (it in (4, 8)), it
    n = probe.iterations.index(8)
    assert seen[8]["probe_auc_cls"] == probe.aucs["cls"][n] and seen[8]["probe_auc_global"] == probe.aucs["global"][n]
    assert [r["iteration"] for r in results] == [0, 4, 8, 10]  # one PROBE_RESULT per probe, the baseline too
    assert results[-1]["cases"] == 24 and results[-1]["folds"] == 3
    assert not hasattr(engine.state, "probe")
    assert len(untouched) == 10 and all(untouched)  # the trainer's output is left alone
    assert all(0.0 <= a <= 1.0 for t in ("cls", "global") for a in probe.aucs[t])
    assert (tmp_path / "probe_auc.png").stat().st_size > 1000
    with open(tmp_path / "probe_auc.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == [0, 4, 8, 10]
    assert list(rows[0]) == ["iteration", "auc_cls", "auc_global", "wall_s", "seconds"]
    assert float(rows[1]["auc_global"]) == pytest.approx(probe.aucs["global"][1], abs=1e-5)


def test_auc_equals_a_direct_scikit_learn_recomputation_of_the_balanced_probe(tmp_path):
    net = _network(seed=1)
    probe = _probe(tmp_path, network=net, interval=0)
    engine = _engine()
    probe.attach(engine)
    engine.run(range(2), max_epochs=1)
    assert probe.iterations == [0, 2]
    items = read_nodule_table(SAMPLE / "nodules.csv", image_dir=SAMPLE / "image")
    pre = Compose(nodule_preprocessing(roi_size=32, spacing=(1.0, 1.0, 1.0), hu_window=HU_WINDOW, track_meta=False))
    images = torch.stack([torch.as_tensor(pre(dict(it))["image"]) for it in items]).float()
    labels = np.array([it["label"] for it in items])
    folds = grouped_stratified_folds(labels, [it["patient"] for it in items], 3, 0)
    net.encoder.eval()
    with torch.no_grad():
        out = net.encoder(images)
    for token in ("cls", "global"):
        x = out[token].double().numpy()
        aucs = []
        for test in folds:
            train = np.setdiff1d(np.arange(len(labels)), test)
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, class_weight="balanced", tol=1e-10, max_iter=10000))
            aucs.append(roc_auc_score(labels[test], clf.fit(x[train], labels[train]).predict_proba(x[test])[:, 1]))
        assert probe.aucs[token][0] == pytest.approx(np.mean(aucs), abs=1e-6)
        assert probe.aucs[token][1] == probe.aucs[token][0]  # deterministic: same weights, same number


@pytest.mark.parametrize("classifier", ["logistic", "knn"])
def test_separating_features_score_one_and_constant_features_one_half(tmp_path, classifier):
    probe = _probe(tmp_path, classifier=classifier, n_neighbors=3)
    d = probe.data
    probe.network = _LabelEncoder(d.images, d.labels)
    assert probe.score(probe.features()) == {"cls": 1.0, "global": 1.0}
    probe.network = _LabelEncoder(d.images, d.labels, constant=True)
    assert probe.score(probe.features()) == {"cls": 0.5, "global": 0.5}


def test_history_round_trips_and_a_resumed_run_skips_the_baseline(tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    net = _PooledEncoder()
    probe = _probe(tmp_path, network=net, interval=2)
    engine = _engine()
    AtomicCheckpointSaver(ckpt, {"probe": probe}).attach(engine)
    probe.attach(engine)
    engine.run(range(4), max_epochs=1)
    assert probe.iterations == [0, 2, 4]
    state = torch.load(ckpt, weights_only=True)["probe"]
    copy = _probe(tmp_path, network=net, interval=2)
    copy.load_state_dict(state)
    assert copy.state_dict() == probe.state_dict()
    with pytest.raises(ValueError, match="different lengths"):
        copy.load_state_dict({**state, "seconds": []})

    resumed = _probe(tmp_path, network=net, interval=2)  # restored from the checkpoint, as the bundle does
    engine = _engine()
    seen: list[int] = []
    ResumeFromCheckpoint(ckpt, {"probe": resumed}).attach(engine)
    engine.add_event_handler(Events.STARTED, lambda e: seen.append(e.state.iteration))
    resumed.attach(engine)
    engine.run(range(4), max_epochs=2)
    assert seen == [4] and engine.state.iteration == 8
    assert resumed.iterations == [0, 2, 4, 6, 8]  # no second baseline
    assert resumed.aucs["cls"][:3] == probe.aucs["cls"]
    walls = resumed.history.values("wall_s")
    assert walls[:3] == probe.history.values("wall_s") and all(b > a for a, b in zip(walls, walls[1:]))

    from_csv = _probe(tmp_path, network=net, interval=2)  # not in the checkpoint: its CSV is read back
    engine = _engine()
    ResumeFromCheckpoint(ckpt, {"probe": probe}).attach(engine)
    from_csv.attach(engine)
    engine.run(range(4), max_epochs=3)
    assert from_csv.iterations == [0, 2, 4, 6, 8, 10, 12]


def test_only_rank_zero_probes(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # a second torchrun process (no process group in this test)
    probe = _probe(tmp_path, network=_PooledEncoder(), interval=1)
    engine = _engine()
    probe.attach(engine)
    engine.run(range(2), max_epochs=1)
    assert probe.iterations == [] and not (tmp_path / "probe_auc.png").exists()


def test_clear_errors_for_a_missing_folder_or_too_few_patients(tmp_path):
    missing = tmp_path / "no_such_nodules"
    with pytest.raises(FileNotFoundError, match="probe_dir") as err:
        FrozenFeatureProbe(missing)
    assert str(missing) in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"probe_dir.*nodules\.csv"):
        FrozenFeatureProbe(tmp_path)
    with pytest.raises(ValueError, match=r"probe_dir .*2 patient\(s\) with a malignant and 2 with a benign"):
        FrozenFeatureProbe(SAMPLE, max_cases=4, n_folds=3)
    with pytest.raises(ValueError, match="classifier"):
        FrozenFeatureProbe(SAMPLE, classifier="svm")


def test_max_cases_keeps_whole_patients_stratified_and_seeded():
    items = [{"id": f"n{i}", "patient": f"p{i // 2}", "label": int(i < 12)} for i in range(36)]  # 2 nodules each
    subset = select_cases(items, 12, seed=3)
    assert subset == select_cases(items, 12, seed=3) and subset != select_cases(items, 12, seed=4)
    assert len(subset) == 12 and sum(it["label"] for it in subset) == 4  # a third malignant, as in all
    patients = {it["patient"] for it in subset}
    assert all(sum(it["patient"] == p for it in subset) == 2 for p in patients)
    assert select_cases(items, None) == items
    probe = FrozenFeatureProbe(SAMPLE, roi_size=32, max_cases=12)
    assert len(probe.items) == 12 and sum(it["label"] for it in probe.items) == 6


def test_override_config_adds_the_probe_to_the_trainer_handlers(tmp_path):
    base = ConfigParser()
    base.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "demo.yaml")])
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "demo.yaml"), str(CONFIGS / "probe.yaml")])
    parser.update({**TINY_BUNDLE, "bundle_root": str(BUNDLE), "output_dir": str(tmp_path / "runs"),
                   "ckpt_dir": str(tmp_path / "models"), "checkpoint_objects#probe": "@probe_handler"})
    parser["train#dataloader"] = "$[0]"  # no CT loading: the handlers only need its length
    assert len(parser["train#common_handlers"]) == len(base["train#common_handlers"]) + 1
    handlers = [h for group in parser.get_parsed_content("train#handlers") for h in group.handlers]
    probes = [h for h in handlers if isinstance(h, FrozenFeatureProbe)]
    assert len(probes) == 1
    from monai.handlers import TensorBoardStatsHandler

    at = {type(h): i for i, h in enumerate(handlers)}  # attached in list order: EMA, probe, TensorBoard
    assert at[TeacherEMAHandler] < handlers.index(probes[0]) < at[TensorBoardStatsHandler]
    probe = probes[0]
    assert probe.network is parser.get_parsed_content("teacher") and probe.interval == 50 and probe.n_folds == 3
    assert list(probe.roi_size) == [32, 32, 32] and list(probe.spacing) == [1.0, 1.0, 1.0]
    assert list(probe.hu_window) == list(parser.get_parsed_content("hu_window"))
    assert probe.probe_dir.resolve() == SAMPLE.resolve() and len(probe.items) == 24
    assert probe.png_path == tmp_path / "runs" / "probe_auc.png"
    assert parser.get_parsed_content("checkpoint_objects")["probe"] is probe  # the header's checkpoint recipe


def test_attention_option_records_shifted_crop_metrics_and_keeps_them_across_a_resume(tmp_path):
    from dagman_components.handlers.probe import ATTENTION_SERIES

    net = _network(seed=2)
    probe = _probe(tmp_path, network=net, interval=0, attention=True, attention_patch_drop=0.7, overlay_cases=2)
    assert probe.data.masks.shape == probe.data.images.shape and float(probe.data.masks.sum()) > 0
    engine = _engine()
    probe.attach(engine)
    engine.run(range(1), max_epochs=1)
    assert probe.iterations == [0, 1]
    state = probe.state_dict()
    for name in ATTENTION_SERIES:
        assert len(state[name]) == 2 and all(np.isfinite(state[name]))
    assert state["att_cell_auroc"][0] != state["att_cell_auroc_noisy"][0]  # the noisy pass differs
    from PIL import Image

    with Image.open(tmp_path / "attention_overlay.png") as png:  # 2 crops: 2 rows of (CT, CT + S_ATT)
        assert png.size[1] > 200
    with open(tmp_path / "probe_auc.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["iteration", "auc_cls", "auc_global", *ATTENTION_SERIES, "wall_s", "seconds"]
    copy = _probe(tmp_path, network=net, interval=0, attention=True)
    copy._recover_from_csv(1)  # a resumed run without the probe in its checkpoint reads the CSV back
    assert all(copy.state_dict()[k] == pytest.approx(v, rel=1e-5) for k, v in state.items())


def test_attention_option_needs_masks_and_says_where(tmp_path):
    import shutil

    folder = tmp_path / "nomask"
    shutil.copytree(SAMPLE, folder, ignore=shutil.ignore_patterns("mask"))
    with pytest.raises(FileNotFoundError, match="probe_attention"):
        FrozenFeatureProbe(folder, attention=True, roi_size=32)


def test_demo_recipe_pretrains_on_shipped_crops_of_other_patients_than_it_probes(tmp_path):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / c) for c in ("train.yaml", "small_cpu.yaml", "probe.yaml", "demo_recipe.yaml")])
    parser.update({"bundle_root": str(BUNDLE)})
    images = sorted(Path(parser.get_parsed_content("dataset_dir")).glob("*.nii.gz"))
    assert len(images) == 158
    assert parser.get_parsed_content("probe_attention") is True and parser.get_parsed_content("probe_overlay_cases") == 6
    probed = {r["patient_id"] for r in csv.DictReader(open(Path(parser.get_parsed_content("probe_dir")) / "nodules.csv"))}
    pretrained = {p.name.split("_R_")[0] for p in images}
    assert len(pretrained) == 96 and not probed & pretrained


def test_time_to_a_useful_encoder_is_the_first_probe_margin_above_iteration_zero(tmp_path):
    probe = _probe(tmp_path)
    history = {"iterations": [0, 100, 200, 300], "auc_cls": [0.70, 0.74, 0.76, 0.72], "auc_global": [0.7] * 4,
               "wall_s": [5.0, 65.0, 130.0, 190.0], "seconds": [5.0] * 4}
    probe.load_state_dict(history)
    assert probe.time_to_useful("cls", 0.05) == (200, 130.0)
    assert probe.time_to_useful("cls", 0.07) is None and probe.time_to_useful("global") is None
    assert probe._wall_offset == 190.0  # a resumed run's wall clock continues from its last probe
    probe.load_state_dict({k: v[1:] for k, v in history.items()})
    assert probe.time_to_useful("cls") is None  # no random-init baseline recorded
