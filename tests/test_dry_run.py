"""The pretraining dry run times real steps of a config and leaves an existing run untouched."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest
from conftest import REPO
from test_pretraining_bundle import make_bundle

spec = importlib.util.spec_from_file_location("dry_run_pretraining", REPO / "scripts" / "dry_run_pretraining.py")
dry_run_pretraining = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dry_run_pretraining)


def test_overrides_parse_like_the_bundle_cli():
    assert dry_run_pretraining.parse_overrides(["--roi_size", "[32,32,32]", "--device", "cpu", "--amp", "False"]) == {
        "roi_size": [32, 32, 32], "device": "cpu", "amp": False}
    with pytest.raises(SystemExit, match="pairs"):
        dry_run_pretraining.parse_overrides(["--roi_size"])


def test_variants_are_the_speed_options_of_the_config():
    assert dry_run_pretraining.VARIANTS["fused_compiled"] == {"use_flash_attention": True, "compile": True}
    train = (REPO / "bundles" / "dagman_ct_pretraining" / "configs" / "train.yaml").read_text()
    for overrides in dry_run_pretraining.VARIANTS.values():
        for key in overrides:
            assert f"\n{key}: false" in train  # every variant switches an option the config has
    with pytest.raises(SystemExit, match="unknown --variants"):
        dry_run_pretraining.run_variants(["faster"], "train.yaml", 1, [], 1.0)


@pytest.mark.slow
def test_dry_run_times_steps_estimates_the_run_and_writes_nothing(tmp_path, capsys):
    bundle = make_bundle(tmp_path)
    (bundle / "models").mkdir()
    checkpoint = bundle / "models" / "checkpoint.pt"
    checkpoint.write_bytes(b"an existing run's checkpoint")
    before = sorted(p.relative_to(bundle) for p in bundle.rglob("*"))
    configs = [str(bundle / "configs" / c) for c in ("train.yaml", "demo.yaml", "tiny.yaml")]
    result = dry_run_pretraining.main(["--config_file", repr(configs), "--iterations", "2", "--bundle_root",
                                       str(bundle), "--dataset_dir", str(bundle / "datalist.json"), "--max_epochs", "7"])
    assert sorted(p.relative_to(bundle) for p in bundle.rglob("*")) == before  # no runs/, no model.pt
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == hashlib.sha256(b"an existing run's checkpoint").hexdigest()
    out = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in out if line.startswith("step ")] == ["step 1/3", "step 2/3", "step 3/3"]
    assert json.loads(out[-1]) == result
    assert result["max_epochs"] == 7 and result["iterations_per_epoch"] == 2 and result["timed_steps"] == 2
    assert result["estimated_hours"] == pytest.approx(result["s_per_iteration"] * 2 * 7 / 3600, abs=0.006)
    assert result["samples_per_s"] == pytest.approx(1 / result["s_per_iteration"], rel=0.01)  # batch 1 in demo.yaml
