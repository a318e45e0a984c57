"""scripts/time_to_useful_encoder.py: the first probe 0.05 above random init, in wall time."""

from __future__ import annotations

import pytest
from conftest import imported_script

COLUMNS = "iteration,auc_cls,auc_global,wall_s,seconds\n"


def write_run(root, rows):
    (root / "runs").mkdir(parents=True)
    (root / "runs" / "probe_auc.csv").write_text(COLUMNS + "".join(f"{r}\n" for r in rows))
    return root


def test_reports_the_first_probe_above_the_margin_and_refuses_old_csvs(tmp_path):
    with imported_script("time_to_useful_encoder") as script:
        _check(script, tmp_path)


def _check(script, tmp_path):
    fast = write_run(tmp_path / "fast", ["0,0.70,0.7,6,5", "100,0.76,0.7,70,5", "200,0.74,0.7,130,5"])
    slow = write_run(tmp_path / "slow", ["0,0.70,0.7,6,5", "100,0.72,0.7,70,5"])
    assert script.main(["--run", f"fast={fast}", "--run", f"slow={slow}", "--output", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "time_to_useful.md").read_text().splitlines()
    assert table[2] == "| fast | 0.700 | 0.740 | 100 | 1.2 min |"
    assert table[3] == "| slow | 0.700 | 0.720 | not reached | > 1.2 min |"
    assert (tmp_path / "out" / "time_to_useful.png").stat().st_size > 1000
    old = tmp_path / "old" / "runs"
    old.mkdir(parents=True)
    (old / "probe_auc.csv").write_text("iteration,auc_cls,auc_global,seconds\n0,0.7,0.7,5\n")
    with pytest.raises(SystemExit, match="no wall_s"):
        script.main(["--run", f"old={old.parent}", "--output", str(tmp_path / "out2")])
