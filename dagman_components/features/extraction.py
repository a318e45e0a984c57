# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""DAGMaN features and S_ATT maps of a folder of CT: the pretraining bundle's ``inference`` config.

Each volume gets the model card's preprocessing (:func:`~dagman_components.data.ct_load_and_normalise`:
RAS, resampling to the card's spacing, HU window scaled to [0, 1]); then either the whole volume is
padded to a multiple of the encoder's input divisor (32 for the defaults; ``roi_size: null``) or it is
centre-cropped / padded to ``roi_size``. The frozen encoder (``eval``, no mask, no patch dropout) gives:

- the [CLS] token of the semantic-attention block and the average-pooled last stage (``global``), one
  row per case in ``features.npz`` (arrays ``case``, ``image``, ``cls``, ``global``);
- S_ATT, the [CLS]-to-patch attention over the SA cells (summing to 1 over the cells of a case): each
  voxel holds its cell's value (nearest neighbour), the padding / cropping, resampling and reorientation
  are undone with MONAI's ``Invertd``, and the map is written as ``attention/<case>_s_att.nii.gz`` on
  the input's own grid and affine (same shape as the input; voxels outside the encoded region are 0);
- ``cases.csv``: case, image, attention file, SA grid, and the encoded (preprocessed) shape.

Every file is written atomically; a progress bar counts the cases.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.data import Dataset, MetaTensor
from monai.inferers import SimpleInferer
from monai.transforms import Compose, DivisiblePadd, Invertd, ResizeWithPadOrCropd

from dagman_components.atomic import atomic_write_text, replace_atomically, save_nifti_atomic
from dagman_components.data import DEFAULT_SPACING, HU_WINDOW, check_roi_size, ct_load_and_normalise
from dagman_components.data.datalist import volume_stem
from dagman_components.networks.outputs import EncoderOutput
from dagman_components.runtime.progress import progress

__all__ = ["FEATURES_FILE", "CASES_FILE", "case_names", "extraction_preprocessing",
           "CTFeatureExtractor"]

logger = logging.getLogger(__name__)

#: The features of all cases (``np.load``): ``case``, ``image``, ``cls``, ``global``.
FEATURES_FILE = "features.npz"
#: One row per case: case, image, attention file, SA grid, encoded shape.
CASES_FILE = "cases.csv"


def case_names(images: Sequence[str | os.PathLike]) -> list[str]:
    """A file-system-safe, unique name per image: the file name without its volume suffix.

    Args:
        images: image paths (files, or DICOM series folders).

    Returns:
        One name per image; repeated names get ``_2``, ``_3``, ... in order.

    Example:
        >>> case_names(["a/ct.nii.gz", "b/ct.nii.gz", "c/lung.nrrd"])
        ['ct', 'ct_2', 'lung']
    """
    names: list[str] = []
    seen: dict[str, int] = {}
    for image in images:
        name = volume_stem(Path(os.fspath(image).rstrip("/\\")).name)
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "case"
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return names


def extraction_preprocessing(
    spacing: Sequence[float] = DEFAULT_SPACING,
    hu_window: Sequence[float] = HU_WINDOW,
    roi_size: Sequence[int] | int | None = None,
    divisor: int = 32,
) -> Compose:
    """The card's CT preprocessing, then padding to ``divisor`` (``roi_size`` None) or to exactly ``roi_size``.

    Args:
        spacing: voxel spacing in mm (the card's ``preprocessing.spacing_mm``).
        hu_window: HU window scaled to [0, 1] (the card's ``preprocessing.hu_window``).
        roi_size: ``None``: the whole volume, padded so every side is a multiple of ``divisor``;
            else centre crop / pad to this size (every side divisible by ``divisor``).
        divisor: the encoder's input divisor (``SwinDAGMaN.input_divisor``).

    Returns:
        An invertible ``Compose`` on the key ``image``.
    """
    transforms = ct_load_and_normalise(["image"], spacing=spacing, hu_window=hu_window)
    if roi_size is None:
        transforms.append(DivisiblePadd("image", k=int(divisor)))
    else:
        transforms.append(ResizeWithPadOrCropd("image", spatial_size=check_roi_size(roi_size, divisor)))
    return Compose(transforms)


class CTFeatureExtractor:
    """Write DAGMaN features and S_ATT maps of every volume of a dataset (the inference config's ``evaluator``).

    Args:
        network: the frozen encoder (a ``SwinDAGMaN`` / ``ViTDAGMaN``, or an
            :class:`~dagman_components.networks.EncoderEmbedding`, whose ``encoder`` is used).
        dataset: a MONAI ``Dataset`` of items with ``image`` whose transform is the invertible
            :func:`extraction_preprocessing` (the S_ATT maps are brought back to the input grid with it).
        output_dir: where ``features.npz``, ``cases.csv`` and ``attention/`` go.
        inferer: calls the encoder (``inferer(inputs, encoder)``); default MONAI's ``SimpleInferer``.
        device: where the encoder runs.
        save_attention: write the S_ATT NIfTI maps.
        progress: show a progress bar over the cases.

    Raises:
        ValueError: for an empty dataset.
    """

    def __init__(
        self,
        network: nn.Module,
        dataset: Dataset,
        output_dir: str | os.PathLike,
        inferer: Callable[..., Any] | None = None,
        device: str | torch.device = "cpu",
        save_attention: bool = True,
        progress: bool = True,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("the datalist is empty: set dataset_dir to a folder of CT volumes or a JSON datalist.")
        self.encoder = getattr(network, "encoder", network)
        self.dataset = dataset
        self.output_dir = Path(output_dir)
        self.inferer = inferer or SimpleInferer()
        self.inverse = Invertd("s_att", transform=dataset.transform, orig_keys="image", nearest_interp=True)
        self.device = torch.device(device)
        self.save_attention = bool(save_attention)
        self.progress = progress

    def _attention_on_input(self, item: dict[str, Any], s_att: torch.Tensor, grid: Sequence[int]) -> MetaTensor:
        """S_ATT (N,) on the encoded grid, then inverted to the input's grid (nearest neighbour)."""
        image: MetaTensor = item["image"]
        cells = s_att.float().reshape(1, 1, *grid)
        voxels = F.interpolate(cells, size=tuple(image.shape[1:]), mode="nearest")[0].cpu()
        item["s_att"] = MetaTensor(voxels, meta=dict(image.meta), applied_operations=list(image.applied_operations))
        return self.inverse(item)["s_att"]

    @torch.no_grad()
    def run(self) -> dict[str, Any]:
        """Encode every volume and write the outputs.

        Returns:
            ``{"features": path, "cases": path, "attention": [paths], "num_cases": n}``.
        """
        self.encoder.eval()
        sources = [str(item["image"]) for item in self.dataset.data]
        names = case_names(sources)
        rows, cls_rows, global_rows, attention_files = [], [], [], []
        for index in progress(range(len(names)), "DAGMaN features", unit="case", enabled=self.progress):
            name, item = names[index], self.dataset[index]
            out = self.inferer(item["image"].as_tensor().unsqueeze(0).to(self.device), self.encoder)
            global_rows.append(out[EncoderOutput.GLOBAL][0].float().cpu().numpy())
            grid: list[int] = []
            attention_file = ""
            if EncoderOutput.S_ATT in out:
                cls_rows.append(out[EncoderOutput.CLS][0].float().cpu().numpy())
                grid = [int(g) for g in out[EncoderOutput.SA_GRID]]
                if self.save_attention:
                    attention = self._attention_on_input(item, out[EncoderOutput.S_ATT][0], grid)
                    path = self.output_dir / "attention" / f"{name}_s_att.nii.gz"
                    save_nifti_atomic(attention[0].numpy(), np.asarray(attention.affine), path)
                    attention_file = str(path)
                    attention_files.append(attention_file)
            rows.append([name, sources[index], attention_file, "x".join(map(str, grid)),
                         "x".join(str(s) for s in item["image"].shape[1:])])
        features = {"case": np.asarray(names), "image": np.asarray(sources), "global": np.stack(global_rows)}
        if cls_rows:
            features["cls"] = np.stack(cls_rows)
        features_path = self.output_dir / FEATURES_FILE
        replace_atomically(features_path, lambda tmp: np.savez(tmp, **features), suffix=".npz")
        table = io.StringIO()
        writer = csv.writer(table)
        writer.writerow(["case", "image", "attention", "sa_grid", "encoded_shape"])
        writer.writerows(rows)
        cases_path = self.output_dir / CASES_FILE
        atomic_write_text(table.getvalue(), cases_path)
        logger.info("DAGMaN features of %d case(s) -> %s", len(names), features_path)
        return {"features": str(features_path), "cases": str(cases_path), "attention": attention_files,
                "num_cases": len(names)}
