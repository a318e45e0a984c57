# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""ONNX export of a bundle's ``network_def`` and its check against eager PyTorch with onnxruntime.

The export is MONAI's own, ``monai.bundle.onnx_export`` in trace mode (PyTorch's ``torch.export`` based ONNX
exporter, which needs ``onnxscript``; the older TorchScript exporter cannot take the classifier's batch norm),
run on the bundle's inference config with ``models/model.pt``; this module adds what a deployment needs
around it: one-line errors for a missing extra or an input shape the Swin grid cannot take, an atomic write,
and :class:`OnnxNetwork`, an onnxruntime session that is called like the PyTorch network (so MONAI's inferers,
e.g. the segmentation bundle's sliding window, run it unchanged). ``scripts/export_onnx.py`` is the command.

The exported graph has a fixed input shape, batch 1 (``input_shape``); :class:`OnnxNetwork` runs a larger batch
one item at a time.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dagman_components.atomic import replace_atomically
from dagman_components.errors import ConfigValueError, DagmanError

__all__ = [
    "DEPLOY_EXTRA",
    "DeployExtraMissingError",
    "require_deploy_extra",
    "check_export_shape",
    "bundle_network",
    "export_onnx",
    "OnnxNetwork",
    "bundle_case",
]

DEPLOY_EXTRA = ("onnx", "onnxruntime", "onnxscript")


class DeployExtraMissingError(DagmanError, ImportError):
    """A package of the ``deploy`` extra is not installed."""


def require_deploy_extra(packages: Sequence[str] = DEPLOY_EXTRA) -> None:
    """Stop in one line when a package the ONNX export or onnxruntime needs is missing.

    Args:
        packages: the import names to look for.

    Raises:
        DeployExtraMissingError: naming the missing packages and the install command.
    """
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise DeployExtraMissingError(
            f"ONNX export and onnxruntime need {', '.join(missing)}, not installed; install the deploy extra: "
            f"pip install -e .[deploy] (or pip install {' '.join(missing)})."
        )


def check_export_shape(input_shape: Sequence[int], divisor: int, key: str = "input_shape") -> list[int]:
    """Check an export shape ``[1, C, H, W, D]`` against the network's grid.

    Args:
        input_shape: the shape the network is traced at.
        divisor: what every spatial side must be a multiple of (``patch_size * 2**4`` for the Swin encoders: 32).
        key: the option named in the error.

    Returns:
        ``input_shape`` as a list of ints.

    Raises:
        ConfigValueError: not five positive whole numbers, a batch other than 1, or a side the grid cannot take.
    """
    try:
        shape = [int(s) for s in input_shape]
        whole = all(float(s) == int(s) for s in input_shape)
    except (TypeError, ValueError):
        shape, whole = [], False
    if len(shape) != 5 or not whole or min(shape) < 1:
        raise ConfigValueError(f"{key} must be five positive whole numbers [1, channels, H, W, D], got {input_shape!r}.")
    if shape[0] != 1:
        raise ConfigValueError(f"{key} {shape}: the export is traced at batch 1 (OnnxNetwork runs larger batches item "
                               f"by item); set it to {[1, *shape[1:]]}.")
    bad = [s for s in shape[2:] if s % divisor]
    if bad:
        fixed = [1, shape[1], *(max(divisor, round(s / divisor) * divisor) for s in shape[2:])]
        raise ConfigValueError(f"{key} {shape}: every spatial side must be a multiple of {divisor} (the Swin grid: patch "
                               f"size x 2^4 merges), got {bad}; use e.g. {fixed}.")
    return shape


def bundle_network(bundle: str | os.PathLike, weights: str | os.PathLike | None = None) -> torch.nn.Module:
    """``network_def`` of a bundle's inference config with its weights, in eval mode on the CPU.

    Args:
        bundle: the bundle folder (its ``models/model_card.json`` gives the encoder settings).
        weights: the state dict to load; default ``models/model.pt``.

    Returns:
        the network.
    """
    from dagman_components.bundle_tools.zoo_checks import inference_parser

    bundle = Path(bundle)
    network = inference_parser(bundle).get_parsed_content("network_def")
    state = torch.load(Path(weights or bundle / "models" / "model.pt"), map_location="cpu", weights_only=True)
    network.load_state_dict(state)
    return network.eval()


def _divisor(network: torch.nn.Module) -> int:
    for module in network.modules():
        divisor = getattr(type(module), "input_divisor", None)
        if isinstance(divisor, property):
            return int(module.input_divisor)
    return 32  # MONAI's SwinUNETR: patch 2, four merges


def _metadata_shape(bundle: Path) -> list[int]:
    from monai.bundle import ConfigParser
    from monai.bundle.scripts import _get_fake_input_shape

    parser = ConfigParser()
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    return list(_get_fake_input_shape(parser))


def export_onnx(
    bundle: str | os.PathLike,
    filepath: str | os.PathLike | None = None,
    input_shape: Sequence[int] | None = None,
) -> Path:
    """Export ``network_def`` with ``models/model.pt`` to ONNX through ``monai.bundle.onnx_export`` (trace mode).

    Args:
        bundle: the bundle folder.
        filepath: the ONNX file; default ``<bundle>/models/model.onnx`` (an output: packaging leaves it out).
        input_shape: ``[1, C, H, W, D]`` the graph is traced at (fixed); default the metadata's input shape.

    Returns:
        the ONNX file, written atomically (a failed export leaves an earlier file as it was).

    Raises:
        DeployExtraMissingError: onnx, onnxruntime or onnxscript is missing.
        ConfigValueError: a shape the network's grid cannot take.
        FileNotFoundError: no inference config or no ``models/model.pt``.
    """
    require_deploy_extra()
    from monai.bundle import onnx_export

    from dagman_components.bundle_tools.zoo_checks import zoo_inference_config

    bundle = Path(bundle)
    weights = bundle / "models" / "model.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"'{weights}' does not exist: train the bundle (or unzip its packaged weights) first.")
    network = bundle_network(bundle)
    shape = check_export_shape(input_shape if input_shape is not None else _metadata_shape(bundle), _divisor(network))
    target = Path(filepath) if filepath is not None else bundle / "models" / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        onnx_export(net_id="network_def", filepath=tmp, ckpt_file=str(weights),
                    meta_file=str(bundle / "configs" / "metadata.json"), config_file=str(zoo_inference_config(bundle)),
                    bundle_root=str(bundle), use_trace=True, input_shape=shape)

    replace_atomically(target, write, suffix=".onnx")
    return target


class OnnxNetwork:
    """An onnxruntime session called like the PyTorch network: a tensor in, a tensor out.

    Args:
        path: the ONNX file.
        threads: onnxruntime's intra-op threads (``0``: its default, all cores).

    Example::

        network = OnnxNetwork("models/model.onnx")
        probabilities = monai.inferers.SlidingWindowInferer((64, 64, 32))(image, network)
    """

    def __init__(self, path: str | os.PathLike, threads: int = 0):
        require_deploy_extra(("onnxruntime",))
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(threads)
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        (self.input,) = self.session.get_inputs()
        self.input_shape = list(self.input.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Run ``x`` (``[N, C, H, W, D]``) item by item; ``C, H, W, D`` must be the export's."""
        if list(x.shape[1:]) != self.input_shape[1:]:
            raise ValueError(f"the ONNX graph takes {self.input_shape[1:]} (channels and spatial sides), got "
                             f"{list(x.shape[1:])}; export it at this shape (scripts/export_onnx.py --input_shape).")
        array = x.detach().cpu().float().numpy()
        outputs = [self.session.run(None, {self.input.name: array[i:i + 1]})[0] for i in range(array.shape[0])]
        return torch.from_numpy(np.concatenate(outputs)).to(x.device)


def bundle_case(bundle: str | os.PathLike, image: str | os.PathLike) -> tuple[torch.Tensor, Any]:
    """One image through a bundle's inference ``preprocessing``, and the bundle's ``inferer``.

    Args:
        bundle: the bundle folder.
        image: an image file the inference config reads.

    Returns:
        ``(batch of one image, inferer)``: call ``inferer(batch, network)`` with the eager or the ONNX network.
    """
    from dagman_components.bundle_tools.zoo_checks import inference_parser

    parser = inference_parser(bundle)
    parser.update({"device": "$torch.device('cpu')"})
    item = parser.get_parsed_content("preprocessing")({"image": str(image)})
    inferer = parser.get_parsed_content("inferer")
    inferer = getattr(inferer, "inferer", inferer)  # a wrapper of MONAI's inferer (e.g. CPU autocast): the inner one
    return torch.as_tensor(item["image"])[None].float(), inferer
