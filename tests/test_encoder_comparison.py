"""The paired evaluation of encoders (dagman_components.probing.paired, classification.encoder_comparison and
scripts/evaluate_encoders.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from dagman_components.networks import SwinDAGMaN
from dagman_components.probing import paired_auc_difference
from dagman_components.weights.state_dict import export_encoder

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "lidc_nodules_sample"
TINY = {"in_channels": 1, "embed_dim": 12, "depths": [2, 2, 2, 2], "num_heads": [3, 3, 3, 3], "window_size": 4,
        "patch_size": 2, "sa_stage": 3, "sa_heads": 4}


def _cases(n_patients: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    patients = np.repeat(np.arange(n_patients), 2)
    labels = np.tile([0, 1], n_patients)
    return rng, labels, patients.astype(str)


def test_a_clearly_better_encoder_has_an_interval_above_zero_and_equal_ones_zero():
    rng, y, patients = _cases()
    weak = rng.normal(size=(3, len(y))) + 0.3 * y  # three seeds, AUC about 0.58
    strong = rng.normal(size=(3, len(y))) + 2.0 * y  # AUC about 0.92
    d = paired_auc_difference(weak, strong, y, patients, n_boot=300)
    expected = np.mean([roc_auc_score(y, s) for s in strong]) - np.mean([roc_auc_score(y, s) for s in weak])
    assert d.difference == pytest.approx(expected, abs=1e-12)
    assert d.low > 0.15 and d.high > d.difference > d.low and d.share_b_better == 1.0 and d.n_boot == 300
    same = paired_auc_difference(weak, weak, y, patients, n_boot=50)
    assert (same.difference, same.low, same.high, same.share_b_better) == (0.0, 0.0, 0.0, 0.0)
    # swapped: the same interval, mirrored
    back = paired_auc_difference(strong, weak, y, patients, n_boot=300)
    assert back.difference == pytest.approx(-d.difference) and back.high == pytest.approx(-d.low)


def test_the_paired_interval_is_narrower_than_the_unpaired_spread_for_correlated_scores():
    rng, y, patients = _cases(seed=1)
    shared = rng.normal(size=len(y)) + 0.8 * y  # most of the noise is common to both encoders
    a, b = shared + 0.1 * rng.normal(size=len(y)), shared + 0.1 * rng.normal(size=len(y)) + 0.15 * y
    d = paired_auc_difference(a, b, y, patients, n_boot=400)
    single = paired_auc_difference(np.zeros(len(y)) + rng.normal(size=len(y)) * 1e-9, b, y, patients, n_boot=400)
    assert d.high - d.low < 0.5 * (single.high - single.low)


def test_paired_scores_must_describe_the_same_cases():
    _, y, patients = _cases(n_patients=5)
    with pytest.raises(ValueError, match="same cases"):
        paired_auc_difference(np.zeros(10), np.zeros(9), y, patients)
    with pytest.raises(ValueError, match="finite"):
        paired_auc_difference(np.full(10, np.nan), np.zeros(10), y, patients)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("pre") / "model.pt"
    export_encoder(SwinDAGMaN(**TINY), path, {"network": {"class": "dagman_components.networks.SwinDAGMaN", **TINY}})
    return path


def _script(tmp_path: Path, weights: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "scripts" / "evaluate_encoders.py"), "--nodules", str(SAMPLE),
           "--output", str(tmp_path / "eval"), "--encoder", f"random=random:{weights}", "--encoder", f"tiny={weights}",
           "--seeds", "0", "--folds", "2", "--fractions", "0.5", "1.0", "--n_boot", "20", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)


def test_script_writes_the_table_and_a_rerun_skips_finished_cells(tmp_path, tiny_weights):
    first = _script(tmp_path, tiny_weights)
    assert first.returncode == 0, first.stderr[-2000:]
    cells = json.loads((tmp_path / "eval" / "cells.json").read_text())["cells"]
    # lp at 2 fractions + knn, 2 encoders, 1 seed, 2 folds; every shipped crop tested once per protocol
    assert len(cells) == 3 * 2 * 2
    lp = {**cells["tiny|lp|1|0|0"], **cells["tiny|lp|1|0|1"]}
    assert len(lp) == 24
    md = (tmp_path / "eval" / "comparison.md").read_text()
    assert md.count("| tiny |") == 3 and md.count("| random |") == 3
    assert (tmp_path / "eval" / "comparison.png").stat().st_size > 5000
    before = (tmp_path / "eval" / "cells.json").read_text()
    second = _script(tmp_path, tiny_weights)
    assert second.returncode == 0 and "12 of 12 cells already done" in second.stderr
    assert (tmp_path / "eval" / "cells.json").read_text() == before
    # other settings in the same folder are refused, in one line, and nothing is overwritten
    third = _script(tmp_path, tiny_weights, "--token", "global")
    assert third.returncode == 2 and "other settings" in third.stderr
    assert (tmp_path / "eval" / "cells.json").read_text() == before


def test_script_names_a_missing_card_or_weights(tmp_path):
    missing = _script(tmp_path, tmp_path / "none.pt")
    assert missing.returncode == 2 and "none.pt" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.slow
def test_script_fine_tunes_each_encoder_through_the_bundle(tmp_path, tiny_weights):
    """--protocols finetune: one bundle run per (encoder, seed, fold), random init included, scored on its test fold."""
    run = _script(tmp_path, tiny_weights, "--protocols", "finetune", "--finetune_set", "max_epochs=1", "batch_size=4",
                  "num_workers=0")
    assert run.returncode == 0, run.stderr[-2000:]
    cells = json.loads((tmp_path / "eval" / "cells.json").read_text())["cells"]
    assert sorted(cells) == ["random|finetune|1|0|0", "random|finetune|1|0|1", "tiny|finetune|1|0|0", "tiny|finetune|1|0|1"]
    assert len({**cells["tiny|finetune|1|0|0"], **cells["tiny|finetune|1|0|1"]}) == 24
    card = json.loads((tmp_path / "eval" / "finetune" / "random_seed0_fold0" / "models" / "model_card.json").read_text())
    assert card["encoder_weights"] == "random"
    card = json.loads((tmp_path / "eval" / "finetune" / "tiny_seed0_fold0" / "models" / "model_card.json").read_text())
    assert card["encoder_weights"]["sha256"]
