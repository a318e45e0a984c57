# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""The bad-input gallery (docs/bad_inputs.md): each bad input is refused with a message naming the file
or config key and what to do, the run fails, and the outputs already in ``bundle_root`` stay byte-identical.

Most kinds run the bundle's ``initialize`` in process (``ConfigWorkflow``), which is where the checks
sit; the command-line tests (marked slow) check the exit status and the one-glance error block.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import DATA, REPO, TINY_ENCODER

from dagman_components.errors import (
    DEBUG_ENV,
    find_known_error,
    format_error_block,
    shorten_log_record,
    summarise_state_dict_error,
)

BUNDLES = REPO / "bundles"
PRETRAIN = BUNDLES / "dagman_ct_pretraining"
CLASSIFY = BUNDLES / "dagman_lung_nodule_ct_classification"
SEGMENT = BUNDLES / "dagman_lung_tumor_ct_segmentation"
CLUSTER = BUNDLES / "dagman_organ_ct_clustering"
SAMPLE = DATA / "lidc_nodules_sample"
CT_SM = DATA / "totalseg_example" / "example_ct_sm.nii.gz"
DICOM_SERIES = DATA / "totalseg_example" / "example_ct_dicom"


def _permissions_bind() -> bool:
    """Whether file permissions stop this process (not so for root with its usual capabilities)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / "probe"
        probe.write_bytes(b"x")
        probe.chmod(0)
        try:
            probe.read_bytes()
            return False
        except PermissionError:
            return True
        finally:
            probe.chmod(0o644)


PERMISSIONS_BIND = _permissions_bind()
MAX_BLOCK_LINES = 15


# ----------------------------------------------------------------------------------------------- helpers


def bundle_with_outputs(root: Path, source: Path) -> Path:
    """A copy of a bundle's configs plus outputs of an earlier run (model, checkpoint, card, eval files)."""
    bundle = root / source.name
    shutil.copytree(source / "configs", bundle / "configs")
    rng = np.random.default_rng(0)
    for rel in ("models/model.pt", "models/checkpoint.pt", "models/model_card.json", "eval/metrics.csv",
                "runs/loss_curves.csv"):
        (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
        (bundle / rel).write_bytes(rng.bytes(256))
    return bundle


def output_hashes(bundle: Path) -> dict[str, str]:
    """sha256 of every file in the bundle outside ``configs/`` (the training lock is not an output: a run that
    stops creates or empties it)."""
    return {str(p.relative_to(bundle)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(bundle.rglob("*")) if p.is_file() and p.relative_to(bundle).parts[0] != "configs"
            and p.name != ".train.lock"}


def chain_text(exc: BaseException) -> str:
    text = []
    while exc is not None:
        text.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(text)


def assert_refused(bundle: Path, configs: list[str], expected: list[str], **override) -> str:
    """Run the configs' ``initialize`` in process; it must raise a known error whose one-glance block holds
    every string of ``expected``, and leave the bundle's outputs byte-identical. Returns the block."""
    from monai.bundle import ConfigWorkflow

    before = output_hashes(bundle)
    workflow = ConfigWorkflow(config_file=[str(bundle / "configs" / c) for c in configs], workflow_type=None,
                              bundle_root=str(bundle), **override)
    with pytest.raises(Exception) as info:
        workflow.initialize()
    block = format_error_block(info.value)
    assert block is not None, f"not a known error:\n{chain_text(info.value)}"
    for text in expected:
        assert text in block, block
    assert len(block.splitlines()) < MAX_BLOCK_LINES, block
    assert output_hashes(bundle) == before
    return block


def pretraining_datalist(bundle: Path, images: list[Path]) -> str:
    path = bundle / "datalist.json"
    path.write_text(json.dumps({"training": [{"image": str(p)} for p in images]}))
    return str(path)


def cli(bundle: Path, configs: list[str], *args: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    env.pop(DEBUG_ENV, None)
    if debug:
        env[DEBUG_ENV] = "1"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           repr([str(bundle / "configs" / c) for c in configs]), "--bundle_root", str(bundle), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(bundle.parent), env=env)


def assert_one_glance(result: subprocess.CompletedProcess, expected: list[str]) -> None:
    """Non-zero exit; stderr ends with the short block (no traceback) holding every string of ``expected``."""
    assert result.returncode != 0
    err = result.stderr
    assert "Traceback" not in err, err[-3000:]
    block = err[err.index("ERROR ("):]
    assert len(block.splitlines()) < MAX_BLOCK_LINES and len(err.splitlines()) < MAX_BLOCK_LINES + 5, err
    for text in expected:
        assert text in block, block
    assert f"{DEBUG_ENV}=1" in block.splitlines()[-1]


# ------------------------------------------------------------------------------------------ pretraining


def test_nifti_with_a_zero_length_axis(tmp_path):
    bundle = bundle_with_outputs(tmp_path, PRETRAIN)
    empty = tmp_path / "empty_axis.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((0, 40, 40), np.int16), np.eye(4)), str(empty))
    assert_refused(bundle, ["train.yaml", "demo.yaml"], [str(empty), "spatial size below 2", "remove them"],
                   dataset_dir=pretraining_datalist(bundle, [empty, CT_SM]))


def test_dicom_folder_with_two_series_mixed(tmp_path):
    import pydicom

    mixed = tmp_path / "mixed_dicom"
    mixed.mkdir()
    files = sorted(DICOM_SERIES.iterdir())
    for f in files:
        shutil.copy(f, mixed / f"a_{f.name}")
    for f in files[:5]:  # five slices of a second series
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
        ds.save_as(mixed / f"b_{f.name}")
    bundle = bundle_with_outputs(tmp_path, PRETRAIN)
    assert_refused(bundle, ["train.yaml", "demo.yaml"],
                   [str(mixed), "2 DICOM series mixed", f"({len(files)} files)", "(5 files)", "own folder"],
                   dataset_dir=pretraining_datalist(bundle, [mixed]))
    # the same files, one series per folder, are accepted
    from dagman_components.data import build_datalist, validate_volumes

    validate_volumes(build_datalist(DICOM_SERIES))


@pytest.mark.parametrize("value", [0, -3])
@pytest.mark.parametrize("source, configs", [(PRETRAIN, ["train.yaml", "demo.yaml"]), (CLASSIFY, ["train.yaml"]),
                                             (SEGMENT, ["train.yaml", "demo.yaml"])])
def test_max_epochs_zero_or_negative(tmp_path, source, configs, value):
    bundle = bundle_with_outputs(tmp_path, source)
    assert_refused(bundle, configs, [f"max_epochs must be a whole number of at least 1, got {value}", "--max_epochs"],
                   max_epochs=value)


def test_unknown_masking_strategy(tmp_path):
    bundle = bundle_with_outputs(tmp_path, PRETRAIN)
    assert_refused(bundle, ["train.yaml", "demo.yaml"],
                   ["masking_strategy 'attention_hnt' is unknown", "attention_hint, attention_high"],
                   masking_strategy="attention_hnt")


@pytest.mark.skipif(not PERMISSIONS_BIND, reason="this user (root) reads files whatever their permissions")
def test_unreadable_volume(tmp_path):
    bundle = bundle_with_outputs(tmp_path, PRETRAIN)
    locked = tmp_path / "locked.nii.gz"
    shutil.copy(CT_SM, locked)
    locked.chmod(0)
    try:
        assert_refused(bundle, ["train.yaml", "demo.yaml"], [str(locked), "cannot be read (permission denied)", "chmod a+r"],
                       dataset_dir=pretraining_datalist(bundle, [locked]))
    finally:
        locked.chmod(0o644)


@pytest.mark.skipif(not PERMISSIONS_BIND, reason="this user (root) writes to read-only folders")
def test_read_only_bundle_root(tmp_path):
    bundle = bundle_with_outputs(tmp_path, PRETRAIN)
    datalist = pretraining_datalist(bundle, [CT_SM])
    folders = [bundle, bundle / "models"]
    for folder in folders:
        folder.chmod(0o555)
    try:
        assert_refused(bundle, ["train.yaml", "demo.yaml"], [str(bundle / "models"), "--bundle_root"],
                       dataset_dir=datalist)
    finally:
        for folder in folders:
            folder.chmod(0o755)


def test_disk_full_while_a_checkpoint_is_written(tmp_path, monkeypatch):
    """The write fails half-way with ENOSPC: the previous checkpoint stays byte-identical, no temporary file is
    left, and the error names the file and says what to do."""
    import dagman_components.weights.state_dict as weights

    path = tmp_path / "models" / "checkpoint.pt"
    weights.atomic_save({"teacher": {"w": torch.arange(4.0)}}, path)
    old = path.read_bytes()

    def write_half_then_fill_the_disk(obj, stream):
        stream.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(weights.torch, "save", write_half_then_fill_the_disk)
    with pytest.raises(OSError) as info:
        weights.atomic_save({"teacher": {"w": torch.zeros(1000)}}, path)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == old and sorted(os.listdir(path.parent)) == ["checkpoint.pt"]
    block = format_error_block(info.value)
    assert str(path) in block and "previous version is kept" in block and "free space" in block


# --------------------------------------------------------------------------------------- classification


def test_nodule_csv_with_byte_order_mark_and_semicolons_is_read_like_the_original(tmp_path):
    from dagman_components.classification.table import read_nodule_table

    original = pd.read_csv(SAMPLE / "nodules.csv", dtype=object)
    variant = tmp_path / "nodules.csv"
    variant.write_bytes(b"\xef\xbb\xbf" + original.to_csv(sep=";", index=False).encode("utf-8"))
    assert variant.read_bytes()[:3] == b"\xef\xbb\xbf" and b";" in variant.read_bytes().splitlines()[0]
    expected = read_nodule_table(SAMPLE / "nodules.csv", SAMPLE / "image")
    assert read_nodule_table(variant, SAMPLE / "image") == expected and len(expected) == len(original)


# ----------------------------------------------------------------------------------------- segmentation


def _label_like_image(tmp_path: Path, image: Path, values: int = 1, shift_mm: float = 0.0) -> Path:
    ct = nib.load(str(image))
    affine = ct.affine.copy()
    affine[0, 3] += shift_mm
    label = np.zeros(ct.shape, np.uint8)
    label[tuple(s // 2 for s in ct.shape)] = values
    path = tmp_path / f"label_{values}_{shift_mm}.nii.gz"
    nib.save(nib.Nifti1Image(label, affine), str(path))
    return path


@pytest.mark.parametrize("case", ["affine", "shape", "values"])
def test_segmentation_label_that_does_not_fit_its_image(tmp_path, case):
    images = sorted((SAMPLE / "image").glob("*.nii.gz"))[:3]
    good = [{"image": str(p), "label": str(SAMPLE / "mask" / p.name)} for p in images]
    if case == "affine":
        label, expected = _label_like_image(tmp_path, images[0], shift_mm=5.0), "affines differ by up to 5 mm"
    elif case == "shape":
        label = tmp_path / "small_label.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), nib.load(str(images[0])).affine), str(label))
        expected = "shapes differ"
    else:  # a value outside channel_def (background, tumour)
        label, expected = _label_like_image(tmp_path, images[0], values=3), "values [3] outside 0..1 (num_classes 2"
    bad = {"image": str(images[0]), "label": str(label)}
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [bad, good[1]], "validation": [good[2]]}))
    bundle = bundle_with_outputs(tmp_path, SEGMENT)
    assert_refused(bundle, ["train.yaml", "demo.yaml"], [images[0].name, label.name, expected, "fix or remove them"],
                   dataset_dir=str(datalist), pretrained_encoder="", **{"train#dataset#cache_rate": 0})


# ------------------------------------------------------------------------------------- all downstream


@pytest.mark.parametrize("source, configs", [
    (CLASSIFY, ["train.yaml"]), (CLASSIFY, ["train.yaml", "infer.yaml"]),
    (SEGMENT, ["train.yaml"]), (SEGMENT, ["inference.yaml"]), (CLUSTER, ["inference.yaml"]),
])
def test_roi_size_not_divisible_by_32(tmp_path, source, configs):
    bundle = bundle_with_outputs(tmp_path, source)
    assert_refused(bundle, configs, ["roi_size must have every side positive and divisible by 32, got (100, 96, 48)",
                                     "--roi_size to e.g. [96, 96, 64]"], roi_size=[100, 96, 48])


# ------------------------------------------------------------------------------------------- clustering


def test_model_card_that_contradicts_its_weights(tmp_path):
    from dagman_components.weights.encoder_io import build_encoder, prepare_encoder
    from dagman_components.weights.state_dict import WeightLoadError, export_encoder

    bundle = bundle_with_outputs(tmp_path, CLUSTER)
    model = tmp_path / "weights" / "model.pt"
    export_encoder(build_encoder(None, **TINY_ENCODER), model, {"network": TINY_ENCODER})
    card_path = model.with_name("model_card.json")
    card = json.loads(card_path.read_text())
    card["network"]["embed_dim"] = 24  # the card says 24, the weights are 12 wide
    card_path.write_text(json.dumps(card))
    before = output_hashes(bundle)
    with pytest.raises(WeightLoadError) as info:
        prepare_encoder(model)
    block = format_error_block(info.value)
    assert str(model) in block and "shape mismatches" in block and str(card_path) in block
    assert "does not describe these weights" in block and len(block.splitlines()) < MAX_BLOCK_LINES
    assert output_hashes(bundle) == before


# ---------------------------------------------------------------------------------------- error module


def test_state_dict_mismatch_is_counted_not_listed():
    """torch's text for a network of another width names every tensor; the summary gives counts and five keys."""
    wide, narrow = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(40)]), \
        torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(41)])
    with pytest.raises(RuntimeError) as info:
        narrow.load_state_dict(wide.state_dict())
    assert str(info.value).count("size mismatch") == 80
    summary = summarise_state_dict_error(str(info.value))
    lines = summary.splitlines()
    assert lines[0] == "the weights do not fit Sequential:"
    assert lines[1] == "  80 tensors of another shape: 0.weight, 0.bias, 1.weight, 1.bias, 2.weight, ... (75 more)"
    assert lines[2] == "  2 missing: 40.weight, 40.bias" and "model card" in lines[3] and len(lines) == 4


def test_unknown_errors_keep_the_traceback():
    try:
        [][1]
    except IndexError as err:
        assert find_known_error(err) is None and format_error_block(err) is None
    try:
        raise ValueError("a library's own complaint")  # raised here, not in dagman_components
    except ValueError as err:
        assert format_error_block(err) is None


def test_log_records_of_known_errors_are_short_unless_debugging(monkeypatch):
    import logging

    from dagman_components.data import DataSourceError

    def record(exc: BaseException, msg: str) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            return logging.LogRecord("x", logging.ERROR, __file__, 1, msg, (), sys.exc_info())

    wide, narrow = torch.nn.Linear(8, 8), torch.nn.Linear(4, 4)
    try:
        narrow.load_state_dict(wide.state_dict())
    except RuntimeError as err:
        mismatch = err
    short = shorten_log_record(record(mismatch, f"Exception: {mismatch}"))
    assert short.exc_info is None and "size mismatch" not in short.getMessage()
    assert short.getMessage().startswith("Exception: the weights do not fit Linear:\n  2 tensors of another shape")
    unknown = shorten_log_record(record(IndexError("x"), "Exception: x"))
    assert unknown.exc_info is not None and unknown.getMessage() == "Exception: x"
    monkeypatch.setenv(DEBUG_ENV, "1")
    kept = shorten_log_record(record(DataSourceError("bad"), "Exception: bad"))
    assert kept.exc_info is not None


# ---------------------------------------------------------------------------- command line: one glance


@pytest.mark.slow
def test_cli_zero_length_axis_one_glance_and_debug_traceback(tmp_path):
    bundle = bundle_with_outputs(tmp_path, PRETRAIN)
    empty = tmp_path / "empty_axis.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((40, 0, 40), np.int16), np.eye(4)), str(empty))
    args = ["--dataset_dir", pretraining_datalist(bundle, [empty])]
    before = output_hashes(bundle)
    short = cli(bundle, ["train.yaml", "demo.yaml"], *args)
    assert_one_glance(short, ["ERROR (DataSourceError)", str(empty), "spatial size below 2",
                              "While evaluating the config: $dagman_components.data.validate_volumes(@train#datalist)"])
    trace_file = short.stderr.split("written to ", 1)[1].split(";", 1)[0]
    assert "Traceback (most recent call last)" in Path(trace_file).read_text()
    Path(trace_file).unlink()
    debug = cli(bundle, ["train.yaml", "demo.yaml"], *args, debug=True)
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr and str(empty) in debug.stderr
    assert output_hashes(bundle) == before


@pytest.mark.slow
@pytest.mark.parametrize("source, configs, args, expected", [
    (PRETRAIN, ["train.yaml", "demo.yaml"], ["--masking_strategy", "blocks"],
     ["ERROR (ConfigValueError)", "masking_strategy 'blocks' is unknown"]),
    (CLASSIFY, ["train.yaml"], ["--max_epochs", "0"], ["ERROR (ConfigValueError)", "max_epochs", "got 0"]),
    (SEGMENT, ["train.yaml"], ["--roi_size", "[64,64,40]"], ["ERROR (ConfigValueError)", "roi_size", "(64, 64, 40)"]),
], ids=["masking", "max_epochs", "roi_size"])
def test_cli_config_errors_in_one_glance(tmp_path, source, configs, args, expected):
    bundle = bundle_with_outputs(tmp_path, source)
    before = output_hashes(bundle)
    assert_one_glance(cli(bundle, configs, *args), expected)
    assert output_hashes(bundle) == before


@pytest.mark.slow
def test_cli_weights_of_another_width_are_summarised(tmp_path):
    """Segmentation inference with a model.pt of a narrower SwinUNETR: torch's ~200-line list becomes counts."""
    from monai.networks.nets import SwinUNETR

    bundle = bundle_with_outputs(tmp_path, SEGMENT)
    narrow = SwinUNETR(1, 2, feature_size=12, depths=(2, 2, 2, 2), num_heads=(3, 3, 3, 3), window_size=4)
    torch.save(narrow.state_dict(), bundle / "models" / "model.pt")
    (bundle / "models" / "model_card.json").unlink()  # weights without their card: the default settings are built
    before = output_hashes(bundle)
    image = sorted((SAMPLE / "image").glob("*.nii.gz"))[0]
    result = cli(bundle, ["inference.yaml"], "--dataset_dir", str(image), "--num_workers", "0")
    assert_one_glance(result, ["ERROR (RuntimeError)", f"the weights '{bundle / 'models' / 'model.pt'}' do not fit "
                               "SwinUNETR", "tensors of another shape", "more)", "model card"])
    assert "size mismatch" not in result.stderr + result.stdout  # nor in the log (Ignite and MONAI log it twice)
    assert output_hashes(bundle) == before


@pytest.mark.parametrize("content", [b"\xc5\x00 not text", b'{"network": ', b"[1, 2]"], ids=["binary", "cut", "list"])
def test_cli_damaged_model_card_of_trained_weights_is_named(tmp_path, content):
    """Segmentation inference reads the card written with the trained model.pt: a damaged one is named."""
    bundle = bundle_with_outputs(tmp_path, SEGMENT)
    card = bundle / "models" / "model_card.json"
    card.write_bytes(content)
    before = output_hashes(bundle)
    image = sorted((SAMPLE / "image").glob("*.nii.gz"))[0]
    result = cli(bundle, ["inference.yaml"], "--dataset_dir", str(image), "--num_workers", "0")
    assert_one_glance(result, ["ERROR (EncoderSettingError)", f"model card '{card}'",
                               "put back the model_card.json written with the model.pt"])
    assert output_hashes(bundle) == before


def test_resume_from_a_checkpoint_of_another_network_is_short_and_kept(tmp_path):
    """The pretraining resume path: the checkpoint's tensors are counted, not listed, and the file is untouched."""
    from ignite.engine import Engine

    from dagman_components.handlers.checkpoint import AtomicCheckpointSaver, ResumeFromCheckpoint

    path = tmp_path / "models" / "checkpoint.pt"
    trainer = Engine(lambda engine, batch: None)
    wide = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(30)])
    AtomicCheckpointSaver(path, {"student": wide}).attach(trainer)
    trainer.run([0], max_epochs=1)
    old = path.read_bytes()
    narrow = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(30)])
    with pytest.raises(RuntimeError) as info:
        ResumeFromCheckpoint(path, {"student": narrow})(Engine(lambda engine, batch: None))
    block = format_error_block(info.value)
    assert block.startswith(f"ERROR (RuntimeError): cannot resume from '{path}': the weights do not fit Sequential:")
    assert "  60 tensors of another shape: 0.weight, 0.bias, 1.weight, 1.bias, 2.weight, ... (55 more)" in block
    assert "move it away to start from scratch" in block and "size mismatch" not in block
    assert len(block.splitlines()) < MAX_BLOCK_LINES and path.read_bytes() == old


class PickledThing:
    """A custom class: torch.load(weights_only=True) refuses to unpickle it."""


def test_pickled_objects_refused_by_torch_itself_get_our_words(tmp_path):
    """Where a MONAI loader calls torch.load(weights_only=True) itself, the CLI block still says, in our words, that the
    file holds pickled objects and will not be loaded, and never suggests weights_only=False."""
    path = tmp_path / "model.pt"
    torch.save({"model": PickledThing()}, path)  # a pickled object weights_only refuses

    def load(load_path):
        return torch.load(load_path, weights_only=True)

    with pytest.raises(Exception) as info:
        load(path)
    block = format_error_block(info.value)
    assert block is not None and str(path) in block and "pickled Python objects" in block
    assert "weights_only=False" not in block and len(block.splitlines()) < MAX_BLOCK_LINES


def test_every_error_class_of_the_package_derives_from_the_one_base():
    """One base class, no registry of names: each module's own error classes derive from DagmanError, so the
    short report knows them without errors.py importing any package (the core imports no task package)."""
    import importlib
    import inspect
    import pkgutil

    import dagman_components
    from dagman_components.errors import DagmanError, format_error_block

    found = {}
    for info in pkgutil.walk_packages(dagman_components.__path__, "dagman_components."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    assert len(found) >= 11, sorted(found)
    assert [n for n, cls in found.items() if not issubclass(cls, DagmanError)] == []
    from dagman_components.clustering.organ_npz import OrganDataError

    block = format_error_block(OrganDataError("organ crops 'x.npz' hold no labels"))  # raised outside the package
    assert block.startswith("ERROR (OrganDataError): organ crops 'x.npz' hold no labels")
