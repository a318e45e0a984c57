"""The patient-level split of a nodule folder into pretraining images and a held-out probe folder."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import DATA, imported_script


@pytest.fixture()
def split():
    with imported_script("split_lidc_by_patient") as module:
        yield module


def test_split_keeps_patients_apart_and_is_seeded(split, tmp_path):
    source = DATA / "lidc_nodules_sample"
    assert split.main(["--nodules", str(source), "--output", str(tmp_path / "a"), "--heldout_fraction", "0.25"]) == 0
    train = [json.loads((tmp_path / "a" / "pretrain_datalist.json").read_text())["training"]][0]
    held = pd.read_csv(tmp_path / "a" / "heldout" / "nodules.csv")
    assert len(held) == 6 and len(train) == 18  # 24 patients with one nodule each
    held_names = {f"{r.patient_id}_R_{r.nodule_id}.nii.gz" for r in held.itertuples()}
    assert not held_names & {t["image"].split("/")[-1] for t in train}
    assert {p.name for p in (tmp_path / "a" / "heldout" / "image").iterdir()} == held_names
    assert (tmp_path / "a" / "heldout" / "README.md").is_file()  # the licence travels with the copy
    assert split.main(["--nodules", str(source), "--output", str(tmp_path / "b"), "--heldout_fraction", "0.25"]) == 0
    assert pd.read_csv(tmp_path / "b" / "heldout" / "nodules.csv").equals(held)
    assert split.split_patients([f"p{i}" for i in range(24)], 0.25, 1) != split.split_patients(
        [f"p{i}" for i in range(24)], 0.25, 2)


def test_split_errors(split, tmp_path, capsys):
    assert split.main(["--nodules", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "nodules.csv" in capsys.readouterr().err
    with pytest.raises(ValueError, match="heldout_fraction"):
        split.split_patients(["a", "b"], 1.5, 0)
