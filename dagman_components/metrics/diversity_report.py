"""Attention-head diversity report of a pretrained encoder on a set of CT volumes (the paper's Figure 4).

The encoder is built from the ``model_card.json`` written beside ``model.pt`` by the pretraining
bundle and filled with those weights (:func:`dagman_components.weights.encoder_io.prepare_encoder`), put
in ``eval`` mode and run on each volume once, with no mask and no patch dropout. Every Swin block's window attention is recorded
(:class:`~dagman_components.metrics.SwinAttentionRecorder`) and summarised per stage and volume by
:func:`~dagman_components.metrics.stage_diversity`. The report gives, per stage, the mean and the
standard deviation over volumes of the distance-histogram entropy and of each head's mean attention
distance and attention entropy, in one JSON, and one box-plot PNG per stage (one box per head, the
attention distances of all queries, windows, blocks and volumes).

Volumes go through the project's CT preprocessing (:func:`~dagman_components.data.ct_load_and_normalise`)
and are centre-cropped or zero-padded to ``roi_size`` (default: the pretraining ``roi_size`` recorded
in the card), so that every volume gives the same number of windows.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from monai.data import Dataset
from monai.transforms import Compose, EnsureTyped, ResizeWithPadOrCropd

from dagman_components.atomic import atomic_write_png, atomic_write_text
from dagman_components.data import (
    DEFAULT_SPACING,
    HU_WINDOW,
    build_datalist,
    check_roi_size,
    ct_load_and_normalise,
)
from dagman_components.weights.encoder_io import card_preprocessing, prepare_encoder, read_model_card
from dagman_components.metrics.attention_diversity import (
    SwinAttentionRecorder,
    attention_distance,
    stage_diversity,
)
from dagman_components.runtime.progress import progress as show_progress

__all__ = [
    "volume_loader",
    "encoder_stage_diversity",
    "summarise_diversity",
    "plot_stage_boxplot",
    "diversity_report",
]

logger = logging.getLogger(__name__)

#: Attention distances kept per head and stage for the box plots (seeded subsample).
MAX_PLOT_SAMPLES = 20000


def volume_loader(
    source: str | os.PathLike | Sequence[Mapping[str, Any]],
    roi_size: Sequence[int] | int,
    spacing: Sequence[float] = DEFAULT_SPACING,
    hu_window: Sequence[float] = HU_WINDOW,
    max_volumes: int | None = None,
    mask_key: str | None = None,
) -> Dataset:
    """CT volumes, preprocessed as in pretraining and centre-cropped / zero-padded to ``roi_size``.

    Args:
        source: a folder of CT volumes, a JSON datalist or a list of ``{"image": path}``.
        roi_size: network input size, every side divisible by 32.
        spacing: voxel spacing (mm) of the pretraining.
        hu_window: HU window of the pretraining.
        max_volumes: keep the first this many volumes (``None``: all).
        mask_key: when every item has this key, its mask is loaded on the image's grid too.

    Returns:
        A MONAI ``Dataset`` of dicts with ``image`` (1, *roi_size) float tensors (and the mask).
    """
    roi = check_roi_size(roi_size, key="roi_size")
    items = list(source) if not isinstance(source, (str, os.PathLike)) else build_datalist(source)
    if max_volumes is not None:
        items = items[: int(max_volumes)]
    masks = (mask_key,) if mask_key and items and all(mask_key in it for it in items) else ()
    transforms = list(ct_load_and_normalise(("image",), masks, spacing=spacing, hu_window=hu_window))
    transforms += [ResizeWithPadOrCropd(("image", *masks), spatial_size=roi),
                   EnsureTyped(("image", *masks), track_meta=False)]
    return Dataset(items, Compose(transforms))


@torch.no_grad()
def encoder_stage_diversity(
    encoder: nn.Module, image: torch.Tensor, bins: int = 64, samples_per_head: int = 0, seed: int = 0
) -> tuple[dict[int, dict], dict[int, np.ndarray]]:
    """Diversity of every Swin stage for one input, in ``eval`` mode, no mask, no patch dropout.

    Args:
        encoder: a Swin encoder (:class:`SwinDAGMaN`); its training flag is restored afterwards.
        image: (1, C, D, H, W) input.
        bins: histogram bins of the distance entropy.
        samples_per_head: attention distances kept per head for plotting (0: none).
        seed: seed of that subsample.

    Returns:
        ``(summaries, samples)``: per stage, :func:`stage_diversity`'s dict, and per stage a
        (heads, k) array of distances (empty when ``samples_per_head`` is 0).

    Raises:
        ValueError: for an encoder without Swin stages (e.g. the ViT variant).
    """
    if not hasattr(encoder, "layers1"):
        raise ValueError(f"{type(encoder).__name__} has no Swin stages: head diversity is defined per Swin stage.")
    was_training = encoder.training
    encoder.eval()
    try:
        with SwinAttentionRecorder(encoder) as rec:
            encoder(image)
    finally:
        encoder.train(was_training)
    rng = np.random.default_rng(seed)
    summaries, samples = {}, {}
    for stage, records in sorted(rec.records.items()):
        summaries[stage] = stage_diversity(records, bins=bins)
        if samples_per_head:
            per_head = np.concatenate(
                [attention_distance(a, w).transpose(0, 1).reshape(a.shape[1], -1).numpy() for a, w in records], axis=1
            )
            k = min(samples_per_head, per_head.shape[1])
            samples[stage] = per_head[:, rng.choice(per_head.shape[1], size=k, replace=False)]
    return summaries, samples


def summarise_diversity(per_volume: Sequence[Mapping[int, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean and standard deviation over volumes of each stage's figures.

    Args:
        per_volume: one ``{stage: stage_diversity dict}`` per volume.

    Returns:
        ``{"stage<k>": {"distance_entropy_bits": {"mean", "std", "values"}, "per_head_mean_distance":
        {"mean": [...], "std": [...]}, "per_head_attention_entropy_bits": {...}, "head_spread_of_mean_distance":
        {"mean", "std"}}}``; the head spread is the standard deviation over heads of their mean
        distances (0 when all heads attend alike), computed per volume.
    """
    out: dict[str, dict[str, Any]] = {}
    stages = sorted({s for v in per_volume for s in v})
    for s in stages:
        ent = np.array([v[s]["distance_entropy_bits"] for v in per_volume])
        dist = np.array([v[s]["per_head_mean_distance"] for v in per_volume])
        att = np.array([v[s]["per_head_attention_entropy_bits"] for v in per_volume])
        spread = dist.std(axis=1)
        out[f"stage{s}"] = {
            "distance_entropy_bits": {"mean": float(ent.mean()), "std": float(ent.std()), "values": ent.tolist()},
            "per_head_mean_distance": {"mean": dist.mean(0).tolist(), "std": dist.std(0).tolist()},
            "per_head_attention_entropy_bits": {"mean": att.mean(0).tolist(), "std": att.std(0).tolist()},
            "head_spread_of_mean_distance": {"mean": float(spread.mean()), "std": float(spread.std())},
            "heads": int(dist.shape[1]),
            "volumes": len(per_volume),
        }
    return out


def plot_stage_boxplot(samples: np.ndarray, summary: Mapping[str, Any], stage: int, path: str | os.PathLike,
                       title: str = "") -> Path:
    """One box per head of the attention distances of a stage, with the entropy in the title.

    Args:
        samples: (heads, k) attention distances in tokens.
        summary: the stage's entry of :func:`summarise_diversity`.
        stage: stage number (for the labels).
        path: PNG path (written atomically).
        title: first title line.

    Returns:
        The PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(5.5, 0.5 * samples.shape[0] + 2), 3.6))
    ax.boxplot(list(samples), showfliers=False)
    ax.set_xticks(range(1, samples.shape[0] + 1), [str(h) for h in range(samples.shape[0])])
    ax.set_xlabel("head")
    ax.set_ylabel("attention distance (tokens)")
    e = summary["distance_entropy_bits"]
    ax.set_title(f"{title}\nstage {stage}: distance entropy {e['mean']:.3f} ± {e['std']:.3f} bits "
                 f"over {summary['volumes']} volume(s)", fontsize=8)
    fig.tight_layout()
    atomic_write_png(fig, path, dpi=100)
    plt.close(fig)
    return path


def diversity_report(
    model_path: str | os.PathLike | None,
    source: str | os.PathLike | Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    model_card: str | os.PathLike | Mapping | None = None,
    roi_size: Sequence[int] | int | None = None,
    spacing: Sequence[float] | None = None,
    max_volumes: int | None = None,
    bins: int = 64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    title: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``diversity.json`` and ``diversity_stage<k>.png`` for one checkpoint.

    Args:
        model_path: the pretraining bundle's ``models/model.pt``; ``None`` for the seeded random
            encoder of the card (then ``model_card`` is required).
        source: CT volumes (folder, JSON datalist or list of dicts).
        output_dir: where the JSON and PNGs go.
        model_card: the encoder settings (default: ``model_card.json`` beside ``model_path``).
        roi_size: crop size (default: the card's ``training.roi_size``, else 64).
        spacing: voxel spacing (default: the card's ``preprocessing.spacing_mm``, else 2 mm).
        max_volumes: use at most this many volumes.
        bins: histogram bins.
        device: where to run.
        seed: seed of the random encoder and of the plotted subsample.
        title: first line of each plot title (e.g. the variant name).
        progress: show a progress bar.

    Returns:
        The report dict (also in ``diversity.json``).

    Raises:
        ValueError: when no volume is found or the encoder has no Swin stages.
    """
    if model_path is None and model_card is None:
        raise ValueError("the random encoder (model_path None) needs model_card for its settings.")
    card = read_model_card(model_card if model_card is not None else model_path)
    roi = roi_size or card.get("training", {}).get("roi_size") or 64
    preprocessing = card_preprocessing(card, spacing=spacing)
    spacing, hu = preprocessing["spacing"], preprocessing["hu_window"]
    encoder = prepare_encoder(model_path, card, seed=seed).to(device)
    ds = volume_loader(source, roi, spacing=spacing, hu_window=hu, max_volumes=max_volumes)
    if len(ds) == 0:
        raise ValueError(f"no CT volume found in '{source}'.")
    per_volume, samples = [], {}
    budget = max(1, MAX_PLOT_SAMPLES // len(ds))
    for i in show_progress(range(len(ds)), "head diversity", unit="volume", enabled=progress):
        image = ds[i]["image"].unsqueeze(0).to(device)
        summaries, smp = encoder_stage_diversity(encoder, image, bins=bins, samples_per_head=budget, seed=seed + i)
        per_volume.append(summaries)
        for s, arr in smp.items():
            samples.setdefault(s, []).append(arr)
    stages = summarise_diversity(per_volume)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = []
    for s, arrs in sorted(samples.items()):
        pngs.append(plot_stage_boxplot(np.concatenate(arrs, axis=1), stages[f"stage{s}"], s,
                                       out_dir / f"diversity_stage{s}.png", title=title).name)
    report = {
        "weights": None if model_path is None else str(model_path),
        "weights_sha256": encoder.weights_sha256,
        "init": "random" if model_path is None else "pretrained",
        "volumes": len(ds),
        "roi_size": list(check_roi_size(roi, key="roi_size")),
        "spacing_mm": list(spacing),
        "mode": "eval, no masking, no patch dropout",
        "bins": bins,
        "stages": stages,
        "figures": pngs,
    }
    atomic_write_text(json.dumps(report, indent=2), out_dir / "diversity.json")
    logger.info(
        "head diversity (%s): %s -> %s",
        report["init"],
        ", ".join(f"{k} {v['distance_entropy_bits']['mean']:.3f}" for k, v in stages.items()),
        out_dir,
    )
    return report


def iter_images(images: torch.Tensor | Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    """Yield (1, C, D, H, W) tensors from a batch tensor or an iterable of tensors."""
    if isinstance(images, torch.Tensor):
        images = images if images.ndim == 5 else images.unsqueeze(0)
        for i in range(images.shape[0]):
            yield images[i : i + 1]
    else:
        for img in images:
            yield from iter_images(img)
