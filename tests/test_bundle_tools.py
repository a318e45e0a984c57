"""Tests for dagman_components.bundle_tools.package and scripts/package_bundle.py, plus checks of the real bundles."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from dagman_components.bundle_tools.package import (
    DEFAULT_SCHEMA_PATH,
    SCHEMA_URL,
    BundleCheckError,
    LargeFileUrlError,
    check_bundle,
    package_bundle,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "package_bundle.py"
# a bundle is a folder of bundles/ with a configs/ folder; discovered at collection time
REAL_BUNDLES = sorted(p for p in (REPO / "bundles").glob("*") if (p / "configs").is_dir())
TENSOR = {"type": "image", "format": "hounsfield", "num_channels": 1, "spatial_shape": [96, 96, 96],
          "dtype": "float32", "value_range": [-1000, 1000]}  # fmt: skip
MINIMAL_METADATA = {
    "schema": SCHEMA_URL,
    "version": "0.1.0",
    "changelog": {"0.1.0": "first version"},
    "monai_version": "1.6.1",
    "pytorch_version": "2.13.0",
    "numpy_version": "2.1.0",
    "required_packages_version": {},
    "name": "Demo bundle",
    "task": "test bundle",
    "description": "a bundle built by the tests",
    "authors": "tests",
    "copyright": "none",
    "network_data_format": {"inputs": {"image": TENSOR}, "outputs": {"pred": TENSOR}},
}


def _metadata() -> dict:
    """Metadata of the first real bundle when it is schema-valid, else a minimal valid one."""
    schema = json.loads(DEFAULT_SCHEMA_PATH.read_text())
    for bundle in REAL_BUNDLES:
        try:
            meta = json.loads((bundle / "configs" / "metadata.json").read_text())
            jsonschema.validate(meta, schema)
        except (OSError, ValueError, jsonschema.ValidationError):
            continue
        if isinstance(meta.get("version"), str) and meta["version"] in meta.get("changelog", {}):
            return meta
    return copy.deepcopy(MINIMAL_METADATA)


def _write(path: Path, data: str | bytes = "x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A minimal valid bundle (small files only) plus the clutter packaging must leave out."""
    root = tmp_path / "demo_bundle"
    _write(root / "LICENSE", "Apache License 2.0\n")
    _write(root / "configs" / "metadata.json", json.dumps(_metadata(), indent=2))
    _write(root / "configs" / "inference.yaml", "network_def: {_target_: torch.nn.Identity}\n")
    _write(root / "configs" / "train.json", '{"epochs": 1}')
    _write(root / "docs" / "README.md", "# Demo\n")
    _write(root / "models" / "model.pt", b"weights")
    _write(root / "scripts" / "__init__.py", "")
    # left out of the zip:
    _write(root / "models" / "checkpoint_epoch=2.pt", b"ckpt")
    _write(root / "models" / "model_key_metric=0.5.pt", b"ckpt")
    _write(root / "models" / "model.onnx", b"onnx")  # scripts/export_onnx.py's output
    _write(root / "eval" / "events.out.tfevents.1")
    _write(root / "runs" / "run1" / "log.txt")
    _write(root / "logs" / "train.txt")
    _write(root / "scripts" / "__pycache__" / "x.cpython-311.pyc", b"\0")
    _write(root / ".ipynb_checkpoints" / "a.ipynb")
    _write(root / ".DS_Store")
    _write(root / "notes.tmp")
    _write(root / "train.log")
    return root


SHIPPED = {
    "demo_bundle/LICENSE",
    "demo_bundle/configs/metadata.json",
    "demo_bundle/configs/inference.yaml",
    "demo_bundle/configs/train.json",
    "demo_bundle/docs/README.md",
    "demo_bundle/models/model.pt",
    "demo_bundle/scripts/__init__.py",
}


def _version(bundle: Path) -> str:
    return json.loads((bundle / "configs" / "metadata.json").read_text())["version"]


def _edit_metadata(bundle: Path, edit) -> None:
    path = bundle / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def test_valid_bundle_checks_and_packages_exactly(bundle, tmp_path):
    assert check_bundle(bundle) == []
    zip_path = package_bundle(bundle, tmp_path / "dist")
    assert zip_path == tmp_path / "dist" / f"demo_bundle_v{_version(bundle)}.zip"
    with zipfile.ZipFile(zip_path) as zf:
        assert set(zf.namelist()) == SHIPPED
        assert zf.read("demo_bundle/models/model.pt") == b"weights"
        zf.extractall(tmp_path / "unpacked")
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == [zip_path.name]  # no temp file, no large list
    assert check_bundle(tmp_path / "unpacked" / "demo_bundle") == []  # the zip alone is a valid bundle


def test_model_card_travels_with_its_weights(bundle, tmp_path):
    """encoder_io builds the encoder from models/model_card.json: it ships beside each kept .pt, and only there."""
    card = b'{"network": "SwinDAGMaN"}'
    _write(bundle / "models" / "model_card.json", card)
    _write(bundle / "models" / "other" / "model_card.json", b"{}")  # beside no kept weights: left out
    with zipfile.ZipFile(package_bundle(bundle, tmp_path / "dist")) as zf:
        assert set(zf.namelist()) == SHIPPED | {"demo_bundle/models/model_card.json"}
        assert zf.read("demo_bundle/models/model_card.json") == card
    with zipfile.ZipFile(package_bundle(bundle, tmp_path / "ts_only", keep_models=("model.ts",))) as zf:
        assert not any(name.startswith("demo_bundle/models/") for name in zf.namelist())  # no weights, no card


def test_zip_is_reproducible(bundle, tmp_path):
    first = package_bundle(bundle, tmp_path / "a").read_bytes()
    assert package_bundle(bundle, tmp_path / "b").read_bytes() == first


# (name, how to break the bundle, a fragment the problem must contain)
BROKEN = [
    ("no LICENSE", lambda b: (b / "LICENSE").unlink(), "LICENSE: missing"),
    ("empty LICENSE", lambda b: (b / "LICENSE").write_text(" \n"), "LICENSE: empty"),
    ("no README", lambda b: (b / "docs" / "README.md").unlink(), "docs/README.md: missing"),
    ("no metadata", lambda b: (b / "configs" / "metadata.json").unlink(), "configs/metadata.json: missing"),
    ("metadata not JSON", lambda b: (b / "configs" / "metadata.json").write_text("{"), "metadata.json: does not parse"),
    (
        "version missing from changelog",
        lambda b: _edit_metadata(b, lambda m: m.update(version="9.9.9")),
        "version '9.9.9' is not a key of 'changelog'",
    ),
    ("no changelog", lambda b: _edit_metadata(b, lambda m: m.pop("changelog")), "'changelog' is missing"),
    (
        "schema-invalid: required key dropped",
        lambda b: _edit_metadata(b, lambda m: m.pop("authors")),
        "schema: 'authors' is a required property",
    ),
    (
        "schema-invalid: wrong type",
        lambda b: _edit_metadata(b, lambda m: m.update(references="one paper")),
        "(at references)",
    ),
    (
        "inference config without weights",
        lambda b: (b / "models" / "model.pt").unlink(),
        "models/model.pt: missing (configs/inference.yaml needs weights",
    ),
    ("json does not parse", lambda b: _write(b / "configs" / "train.json", "{oops"), "train.json: does not parse"),
    ("yaml does not parse", lambda b: _write(b / "configs" / "extra.yaml", "a: [1,"), "extra.yaml: does not parse"),
    (
        "large file without url",
        lambda b: _write(b / "large_files.yml", "large_files:\n  - path: models/model.pt\n    url: ''\n"),
        "large_files.yml: models/model.pt has no 'url'",
    ),
]


@pytest.mark.parametrize("breakage, fragment", [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_check_names_each_problem(bundle, breakage, fragment):
    breakage(bundle)
    problems = check_bundle(bundle)
    assert any(fragment in p for p in problems), problems


def test_bad_folder_name_is_a_problem_and_case_a_warning(bundle, tmp_path, caplog):
    dashed = bundle.rename(tmp_path / "demo-bundle")
    assert any("folder name may only hold" in p for p in check_bundle(dashed))
    camel = dashed.rename(tmp_path / "demoBundle")
    with caplog.at_level(logging.WARNING, logger="dagman_components.bundle_tools.package"):
        assert check_bundle(camel) == []
    assert "lower snake_case" in caplog.text


def test_weights_optional_or_listed(bundle):
    (bundle / "models" / "model.pt").unlink()
    assert check_bundle(bundle, require_weights=False) == []
    _write(bundle / "large_files.yml", "large_files:\n  - path: models/model.pt\n    url: https://example.org/m.pt\n")
    assert check_bundle(bundle) == []


def test_failed_check_writes_nothing(bundle, tmp_path):
    (bundle / "LICENSE").unlink()
    with pytest.raises(BundleCheckError) as info:
        package_bundle(bundle, tmp_path / "dist")
    assert info.value.problems == ["LICENSE: missing"]
    assert not (tmp_path / "dist").exists()


def test_large_file_without_url_is_refused_and_nothing_written(bundle, tmp_path):
    (bundle / "models" / "model.pt").write_bytes(bytes(range(256)) * 16)  # 4 KiB, over 0.001 MiB
    with pytest.raises(LargeFileUrlError, match=r"models/model.pt over 0.001 MB .* without a download url.*"
                                                r"--large-file-url models/model.pt=https://"):
        package_bundle(bundle, tmp_path / "dist", max_file_mb=0.001)
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


def test_large_file_goes_to_large_files_yml_and_the_zoo_downloader_fetches_it(bundle, tmp_path):
    weights = bytes(range(256)) * 16  # 4 KiB, over the 0.001 MiB (1048 bytes) limit; the rest is smaller
    (bundle / "models" / "model.pt").write_bytes(weights)
    hosted = tmp_path / "hosted" / "model.pt"  # a file:// url stands for the hosted copy (no network here)
    hosted.parent.mkdir()
    hosted.write_bytes(weights)
    zip_path = package_bundle(bundle, tmp_path / "dist", max_file_mb=0.001,
                              large_file_urls={"models/model.pt": hosted.as_uri()})
    expected = {"large_files": [{"path": "models/model.pt", "url": hosted.as_uri(),
                                 "hash_val": hashlib.sha256(weights).hexdigest(), "hash_type": "sha256"}]}
    sidecar = tmp_path / "dist" / f"demo_bundle_v{_version(bundle)}_large_files.yml"
    assert yaml.safe_load(sidecar.read_text()) == expected
    with zipfile.ZipFile(zip_path) as zf:
        assert set(zf.namelist()) == SHIPPED - {"demo_bundle/models/model.pt"} | {"demo_bundle/large_files.yml"}
        assert yaml.safe_load(zf.read("demo_bundle/large_files.yml")) == expected
        zf.extractall(tmp_path / "unpacked")
    unpacked = tmp_path / "unpacked" / "demo_bundle"
    assert check_bundle(unpacked) == []
    from monai.bundle import download_large_files

    download_large_files(bundle_path=str(unpacked))  # MONAI's downloader (the zoo CI's does the same per entry)
    assert (unpacked / "models" / "model.pt").read_bytes() == weights


def test_large_file_keeps_existing_url_when_hash_matches(bundle, tmp_path):
    weights = b"w" * 4096
    (bundle / "models" / "model.pt").write_bytes(weights)
    entry = {"path": "models/model.pt", "url": "https://example.org/m.pt", "hash_val": hashlib.md5(weights).hexdigest(),
             "hash_type": "md5"}  # fmt: skip
    _write(bundle / "large_files.yaml", yaml.safe_dump({"large_files": [entry]}))
    zip_path = package_bundle(bundle, tmp_path / "dist", max_file_mb=0.001)
    with zipfile.ZipFile(zip_path) as zf:
        assert "demo_bundle/large_files.yaml" not in zf.namelist()  # replaced by the merged large_files.yml
        (listed,) = yaml.safe_load(zf.read("demo_bundle/large_files.yml"))["large_files"]
    assert listed["url"] == entry["url"] and listed["hash_val"] == hashlib.sha256(weights).hexdigest()


def test_existing_zip_is_not_overwritten(bundle, tmp_path):
    zip_path = package_bundle(bundle, tmp_path / "dist")
    zip_path.write_bytes(b"earlier release")
    with pytest.raises(FileExistsError):
        package_bundle(bundle, tmp_path / "dist")
    assert zip_path.read_bytes() == b"earlier release"
    assert package_bundle(bundle, tmp_path / "dist", overwrite=True) == zip_path
    assert zipfile.is_zipfile(zip_path)


def test_failure_while_writing_leaves_no_partial_zip(bundle, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("dagman_components.bundle_tools.package.shutil.copyfileobj", fail)
    with pytest.raises(OSError, match="disk full"):
        package_bundle(bundle, tmp_path / "dist")
    assert list((tmp_path / "dist").iterdir()) == []


def test_out_dir_inside_bundle_is_left_out(bundle):
    first = package_bundle(bundle, bundle / "dist")
    with zipfile.ZipFile(package_bundle(bundle, bundle / "dist", overwrite=True)) as zf:
        assert set(zf.namelist()) == SHIPPED
    assert first.is_file()


def test_cli_packages_from_another_directory(bundle, tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    cmd = [sys.executable, str(SCRIPT), str(bundle), "--out", str(tmp_path / "dist")]
    made = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert Path(made.stdout.strip()) == tmp_path / "dist" / f"demo_bundle_v{_version(bundle)}.zip"


def test_cli_exit_codes_and_messages(bundle, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("package_bundle_cli", SCRIPT)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([str(bundle), "--check-only"]) == 0
    assert "OK" in capsys.readouterr().out
    out = ["--out", str(tmp_path / "dist")]
    assert cli.main([str(bundle), *out]) == 0
    assert capsys.readouterr().out.strip().endswith(".zip")
    assert cli.main([str(bundle), *out]) == 1  # the zip exists
    assert "exists" in capsys.readouterr().err
    assert cli.main([str(bundle), *out, "--overwrite"]) == 0
    (bundle / "LICENSE").unlink()
    assert cli.main([str(bundle), "--check-only"]) == 1
    assert "LICENSE: missing" in capsys.readouterr().err
    assert cli.main([str(bundle), *out, "--overwrite"]) == 1
    assert "LICENSE: missing" in capsys.readouterr().err


@pytest.mark.slow  # a MONAI process per bundle, several seconds each on 2 CPU cores
@pytest.mark.parametrize("bundle_dir", REAL_BUNDLES, ids=[p.name for p in REAL_BUNDLES])
def test_real_bundle_metadata_passes_monai_verify_metadata(bundle_dir, tmp_path):
    meta_file = bundle_dir / "configs" / "metadata.json"
    assert meta_file.is_file(), f"{bundle_dir.name} has no configs/metadata.json"
    # verify_metadata downloads the schema named in metadata unless `filepath` exists: give it the repo copy
    assert json.loads(meta_file.read_text())["schema"] == SCHEMA_URL
    schema = shutil.copy(DEFAULT_SCHEMA_PATH, tmp_path / "schema.json")
    cmd = [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(meta_file), "--filepath", schema]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("bundle_dir", REAL_BUNDLES, ids=[p.name for p in REAL_BUNDLES])
def test_real_bundle_passes_check(bundle_dir):
    # weights are never committed: a training run (or large_files.yml) provides models/model.pt
    assert check_bundle(bundle_dir, require_weights=False) == []


@pytest.mark.slow
def test_zip_with_the_wheel_runs_its_inference_where_the_repository_is_absent(tmp_path):
    """package_bundle(with_wheel=True): unzip into an empty folder, ``pip install`` the shipped wheel (into a
    target folder here), run the inference config from there with that install and no checkout on the path."""
    import os

    import numpy as np

    from dagman_components.networks import SwinDAGMaN
    from dagman_components.weights.state_dict import export_encoder

    tiny = {"embed_dim": 12, "depths": [1, 1, 1, 1], "num_heads": [3, 3, 3, 3], "sa_heads": 4}
    bundle = tmp_path / "dagman_ct_pretraining"
    shutil.copytree(REPO / "bundles" / bundle.name, bundle, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    (bundle / "models").mkdir()
    export_encoder(SwinDAGMaN(**tiny), bundle / "models" / "model.pt",
                   {"network": {"class": "dagman_components.networks.SwinDAGMaN", **tiny}})
    zip_path = package_bundle(bundle, tmp_path / "dist", with_wheel=True)
    alone, site = tmp_path / "alone", tmp_path / "site"
    with zipfile.ZipFile(zip_path) as zf:
        (wheel,) = [n for n in zf.namelist() if n.startswith(f"{bundle.name}/wheels/") and n.endswith(".whl")]
        zf.extractall(alone)
    assert Path(wheel).name.startswith("dagman_components-0.1.0-")  # the version the metadata pins
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                    str(alone / wheel)], check=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site), "DAGMAN_PROGRESS": "0"}
    where = subprocess.run([sys.executable, "-c", "import dagman_components; print(dagman_components.__file__)"],
                           cwd=alone, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the wheel's copy, not this checkout
    ct = f"{bundle.name}/sample_data/totalseg_example/example_ct_sm.nii.gz"
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                           f"{bundle.name}/configs/inference.json", "--bundle_root", bundle.name, "--dataset_dir", ct,
                           "--output_dir", "features", "--device", "cpu"],
                          cwd=alone, env=env, capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    with np.load(alone / "features" / "features.npz") as features:
        assert features["cls"].shape == (1, 12 * 8) and np.isfinite(features["cls"]).all()


def _pretraining_with_card(tmp_path: Path, network: dict) -> Path:
    """A copy of the pretraining bundle shipping weights whose card describes ``network``."""
    root = tmp_path / "dagman_ct_pretraining"
    shutil.copytree(REPO / "bundles" / "dagman_ct_pretraining", root, ignore=shutil.ignore_patterns("models", "runs", "eval"))
    _write(root / "models" / "model.pt", b"weights")  # only the card builds the network here
    _write(root / "models" / "model_card.json", json.dumps({"network": network}))
    return root


def test_packaged_metadata_follows_the_card_of_the_shipped_weights(tmp_path, caplog):
    """The zoo's verify_net_in_out on the zip: a tiny encoder (embed 12: a 96-wide [CLS] token) whose metadata
    declares the paper-size 384 channels ships with 96; the bundle's own metadata is left as it is."""
    from monai.bundle import verify_net_in_out

    root = _pretraining_with_card(tmp_path, {"class": "SwinDAGMaN", "embed_dim": 12, "depths": [2, 2, 2, 2],
                                             "num_heads": [3, 3, 3, 3], "sa_heads": 4})
    before = (root / "configs" / "metadata.json").read_bytes()
    assert json.loads(before)["network_data_format"]["outputs"]["pred"]["num_channels"] == 384
    with caplog.at_level(logging.WARNING):
        zip_path = package_bundle(root, tmp_path / "dist")
    assert "declares 384 output channels" in caplog.text and "gives 96" in caplog.text
    assert (root / "configs" / "metadata.json").read_bytes() == before
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(tmp_path / "unpacked")
    unpacked = tmp_path / "unpacked" / root.name
    shipped = json.loads((unpacked / "configs" / "metadata.json").read_text())
    assert shipped["network_data_format"]["outputs"]["pred"]["num_channels"] == 96
    assert check_bundle(unpacked) == []  # still valid against the schema
    verify_net_in_out(net_id="network_def", meta_file=str(unpacked / "configs" / "metadata.json"),
                      config_file=str(unpacked / "configs" / "inference.json"), bundle_root=str(unpacked), device="cpu")


def test_card_that_builds_no_network_is_refused_naming_both(tmp_path):
    root = _pretraining_with_card(tmp_path, {"class": "NoSuchEncoder"})
    with pytest.raises(BundleCheckError) as info:
        package_bundle(root, tmp_path / "dist")
    (problem,) = info.value.problems
    assert "declares 384 output channels" in problem and "models/model_card.json" in problem
    assert "NoSuchEncoder" in problem and "\n" not in problem
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())
