# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""The MONAI model zoo's pull-request checks of a bundle, run offline, each on its own.

A re-statement of ``ci/verify_bundle.py`` of ``Project-MONAI/model-zoo`` with the same MONAI functions
and arguments (the zoo's script stops at the first failure and downloads the metadata schema; here
every check runs and reports, and the schema is a local file):

- ``directory``: ``configs/metadata.json``, ``LICENSE``, ``models/model.pt`` and an inference config;
- ``version``: ``version`` is a key of ``changelog`` (the zoo also refuses a version it already hosts);
- ``metadata``: ``monai.bundle.verify_metadata`` against the schema;
- ``properties``: ``ConfigWorkflow(workflow_type="inference")`` initialised, ``check_properties()``
  empty (the zoo runs it for apps that define properties; its unit tests run it for every bundle);
- ``data_shape``: ``monai.bundle.verify_net_in_out`` on ``network_def`` with inputs from the metadata's
  ``network_data_format``: the output must be a tensor with the declared channels and dtype;
- ``torchscript``: ``monai.bundle.ckpt_export`` of ``network_def`` with ``models/model.pt``; scripted as
  the zoo does, or, for a bundle on the zoo's TorchScript exclusion list, traced at the metadata's input
  shape, loaded back with ``torch.jit.load`` and compared with the eager network.

Like the zoo, the inference config is the last of ``inference.json``, ``inference.yaml``,
``inference.yml`` that exists.
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKS", "zoo_inference_config", "inference_parser", "measured_output_channels", "run_zoo_checks", "traced_export_matches"]

#: The checks, in the zoo's order.
CHECKS = ("directory", "version", "metadata", "properties", "data_shape", "torchscript")


def zoo_inference_config(bundle: str | os.PathLike) -> Path | None:
    """The inference config the zoo picks: the last of ``inference.{json,yaml,yml}`` in ``configs/``."""
    found = [Path(bundle) / "configs" / f"inference.{s}" for s in ("json", "yaml", "yml")]
    found = [p for p in found if p.is_file()]
    return found[-1] if found else None


def _directory(bundle: Path) -> None:
    for rel in ("configs/metadata.json", "LICENSE", "models/model.pt"):
        if not (bundle / rel).exists():
            raise ValueError(f"necessary file {rel} is not existing.")
    if zoo_inference_config(bundle) is None:
        raise ValueError("inference config file is not existing.")


def _version(bundle: Path) -> None:
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    if metadata.get("version") not in metadata.get("changelog", {}):
        raise ValueError(f"version {metadata.get('version')!r} is missing in 'changelog' of configs/metadata.json.")


def _metadata(bundle: Path, schema: Path) -> None:
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(schema))


def _properties(bundle: Path, overrides: Mapping[str, Any]) -> None:
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=str(zoo_inference_config(bundle)),
                              meta_file=str(bundle / "configs" / "metadata.json"), logging_file=False,
                              workflow_type="inference", bundle_root=str(bundle), **overrides)
    workflow.initialize()
    missing = workflow.check_properties()
    if missing:
        raise ValueError(f"check properties for workflow failed: {missing}")


def _data_shape(bundle: Path, overrides: Mapping[str, Any]) -> None:
    from monai.bundle import verify_net_in_out

    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                      config_file=str(zoo_inference_config(bundle)), bundle_root=str(bundle), device="cpu",
                      **overrides)


def inference_parser(bundle: str | os.PathLike) -> Any:
    """A ``monai.bundle.ConfigParser`` of the bundle's inference config (the zoo's pick) and metadata, ``bundle_root``
    set to the folder.

    Raises:
        FileNotFoundError: the folder has no inference config.
    """
    from monai.bundle import ConfigParser

    bundle = Path(bundle)
    config = zoo_inference_config(bundle)
    if config is None:
        raise FileNotFoundError(f"'{bundle}' has no configs/inference.json or inference.yaml: not a bundle folder.")
    parser = ConfigParser()
    parser.read_config(str(config))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(bundle)})
    return parser


def measured_output_channels(bundle: str | os.PathLike) -> int:
    """The channels of ``network_def``'s output as the bundle's inference config builds it now.

    The inference configs build their network from ``models/model_card.json`` (the card of the shipped weights),
    so this is what ``verify_net_in_out`` (the ``data_shape`` check) will find: the network runs on the fake
    input the metadata's ``network_data_format`` gives (MONAI's own ``_get_fake_input_shape``).

    Args:
        bundle: the bundle folder.

    Returns:
        ``output.shape[1]``.
    """
    from monai.bundle.scripts import _get_fake_input_shape

    parser = inference_parser(bundle)
    network = parser.get_parsed_content("network_def")
    with torch.no_grad():
        output = network.eval()(torch.rand(_get_fake_input_shape(parser)))
    return int(output.shape[1])


def traced_export_matches(bundle: str | os.PathLike, overrides: Mapping[str, Any] | None = None,
                          atol: float = 1e-4) -> Path:
    """Export ``network_def`` with ``models/model.pt`` by ``torch.jit.trace`` and check the export.

    Args:
        bundle: the bundle folder.
        overrides: config overrides (as the zoo passes ``bundle_root``).
        atol: largest allowed difference between the exported and the eager network's output.

    Returns:
        The TorchScript file, ``models/verify_model.ts``.

    Raises:
        AssertionError: when the loaded export's output differs from the eager network's.
    """
    from monai.bundle import ConfigParser, ckpt_export
    from monai.bundle.scripts import _get_fake_input_shape

    bundle = Path(bundle)
    config, meta = str(zoo_inference_config(bundle)), str(bundle / "configs" / "metadata.json")
    path = bundle / "models" / "verify_model.ts"
    ckpt_export(net_id="network_def", filepath=str(path), ckpt_file=str(bundle / "models" / "model.pt"),
                meta_file=meta, config_file=config, bundle_root=str(bundle), use_trace=True,
                converter_kwargs={"check_trace": False}, **(overrides or {}))  # compared below instead
    parser = ConfigParser()
    parser.read_config(config)
    parser.read_meta(meta)
    parser.update({"bundle_root": str(bundle), **(overrides or {})})
    eager = parser.get_parsed_content("network_def")
    eager.load_state_dict(torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True))
    x = torch.rand(_get_fake_input_shape(parser))
    with torch.no_grad():
        expected, exported = eager.eval()(x), torch.jit.load(str(path), map_location="cpu")(x)
    difference = float((expected - exported).abs().max())
    if difference > atol:
        raise AssertionError(f"the traced export differs from the network by {difference:.3g} (> {atol}).")
    return path


def _torchscript(bundle: Path, overrides: Mapping[str, Any], traced: bool) -> None:
    if traced:
        traced_export_matches(bundle, overrides)
        return
    from monai.bundle import ckpt_export

    ckpt_export(net_id="network_def", filepath=str(bundle / "models" / "verify_model.ts"),
                ckpt_file=str(bundle / "models" / "model.pt"), meta_file=str(bundle / "configs" / "metadata.json"),
                config_file=str(zoo_inference_config(bundle)), bundle_root=str(bundle), **overrides)


def run_zoo_checks(
    bundle: str | os.PathLike,
    schema: str | os.PathLike,
    overrides: Mapping[str, Any] | None = None,
    traced_torchscript: bool = False,
    checks: tuple[str, ...] = CHECKS,
) -> dict[str, str]:
    """Run every check on ``bundle`` and report each.

    Args:
        bundle: the bundle folder (with ``models/model.pt``).
        schema: a local copy of the metadata schema its ``metadata.json`` names.
        overrides: config overrides for ``properties`` (e.g. ``dataset_dir`` of test data); not used by the
            other checks, which run on the config as shipped (plus ``bundle_root``), as in the zoo.
        traced_torchscript: the bundle is on the zoo's TorchScript exclusion list: check a traced export.
        checks: the checks to run (default: all, in the zoo's order).

    Returns:
        ``{check: "PASS" or "FAIL: <exception chain>"}`` for each check run.

    Raises:
        ValueError: for an unknown check name.
    """
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown zoo checks {unknown}; known: {list(CHECKS)}.")
    bundle = Path(bundle)
    overrides = dict(overrides or {})
    run: dict[str, Callable[[], None]] = {
        "directory": lambda: _directory(bundle),
        "version": lambda: _version(bundle),
        "metadata": lambda: _metadata(bundle, Path(schema)),
        "properties": lambda: _properties(bundle, overrides),
        "data_shape": lambda: _data_shape(bundle, {}),
        "torchscript": lambda: _torchscript(bundle, {}, traced_torchscript),
    }
    results = {}
    for name in checks:
        try:
            run[name]()
            results[name] = "PASS"
        except Exception as err:  # every check reports, as the zoo's CI log would show it
            chain = traceback.format_exception_only(type(err), err)[-1].strip()
            cause = err.__cause__ or err.__context__
            while cause is not None:
                chain += " <- " + traceback.format_exception_only(type(cause), cause)[-1].strip()
                cause = cause.__cause__ or cause.__context__
            results[name] = f"FAIL: {chain}"
    return results
