"""The benchmark's figure: drawn from a saved result, and a clear error for a file that is not one."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import benchmark_pretraining  # noqa: E402


def test_plot_only_draws_a_saved_result(tmp_path):
    result = {"device": "CPU", "roi": 64, "batch": 2, "embed_dim": 48, "rounds": 2,
              "backbone_bf16_step_s": 1.5, "backbone_bf16_rounds_s": [1.4, 1.6],
              "dagman_bf16_step_s": 2.5, "dagman_bf16_rounds_s": [2.4, 2.6],
              "dagman_compiled_bf16_step_s": 2.0, "matmul_bf16_step_s": 0.04}
    saved = tmp_path / "result.json"
    saved.write_text("round 1/2: ...\n" + json.dumps(result) + "\n")
    figure = tmp_path / "arms.png"
    assert benchmark_pretraining.main(["--plot-only", str(saved), "--figure", str(figure)]) == result
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_only_names_a_file_that_is_not_a_result(tmp_path):
    saved = tmp_path / "log.txt"
    saved.write_text("round 1/2: backbone_bf16 1.5 s\n")
    with pytest.raises(SystemExit, match="log.txt: not a result of this script"):
        benchmark_pretraining.main(["--plot-only", str(saved), "--figure", str(tmp_path / "a.png")])
    assert not (tmp_path / "a.png").exists()
