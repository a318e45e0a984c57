"""An in-loop linear probe: how useful are the frozen teacher's features on labelled nodules?

The pretraining loss says little about the downstream value of the features. This handler embeds
a small labelled nodule set (the LIDC layout: ``nodules.csv`` + ``image/``) with the frozen
teacher encoder every ``interval`` iterations, scores the ``cls`` and ``global`` tokens with the
project's one linear probe (:mod:`dagman_components.probing`: standardised, balanced logistic
regression fitted to its optimum; or kNN) in patient-grouped stratified folds and records the
mean test ROC AUC over the folds, with the random-init baseline at iteration 0. It is off unless
added to the trainer's handlers (``configs/probe.yaml`` of the pretraining bundle does so).

The images are preprocessed once, on first use, and kept in memory as one (N, 1, D, H, W)
tensor; only the features are recomputed. Folds and classifiers are seeded, so a probe of the
same weights always gives the same numbers.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from ignite.engine import Engine, Events

from dagman_components.data.splits import few_shot_subset, grouped_stratified_folds
from dagman_components.data.nodule_table import NoduleTableError, read_nodule_table
from dagman_components.data.nodule_transforms import NODULE_ROI, NODULE_SPACING, nodule_preprocessing
from dagman_components.data import HU_WINDOW
from dagman_components.runtime.distributed import is_main_process
from dagman_components.features.frozen_features import frozen_features, image_batches, module_device
from dagman_components.networks.pretrain import unwrap
from dagman_components.probing import CLASSIFIERS, DEFAULT_C, ProbeScores, probe_auc, probe_scores
from dagman_components.handlers.curves import CurveHistory, CurveWriter
from dagman_components.handlers.events import DiagnosticEvents, register_diagnostic_events

__all__ = [
    "FrozenFeatureProbe",
    "ProbeData",
    "CLASSIFIERS",
    "select_cases",
    "check_probe_classes",
    "probe_auc",
    "probe_scores",
    "ProbeScores",
    "ProbeCurveWriter",
]  # CLASSIFIERS, probe_auc, probe_scores and ProbeScores are dagman_components.probing's, re-exported

logger = logging.getLogger(__name__)

#: Config key of the labelled folder, named in every error about it.
_DIR_KEY = "probe_dir"
#: Series the ``attention`` option adds: S_ATT's cell AUROC and mass ratio on shifted crops, clean and noisy pass
#: (:func:`~dagman_components.metrics.attention_localisation.attention_localisation`).
#: Wall-clock seconds of the run when each probe finished (training, data and earlier probes included; a resumed
#: run continues from its last recorded value): the x axis of "time to a useful encoder".
WALL_SERIES = "wall_s"
#: ATTENTION_SERIES: S_ATT's localisation on shifted crops, clean and noisy pass.
ATTENTION_SERIES: tuple[str, ...] = ("att_cell_auroc", "att_mass_ratio", "att_cell_auroc_noisy", "att_mass_ratio_noisy")


@dataclass
class ProbeData:
    """The preprocessed labelled set of a probe.

    Attributes:
        images: (N, 1, D, H, W) float32 images, on the CPU.
        labels: (N,) 0 / 1 labels (1 = malignant).
        patients: (N,) patient ids (the folds keep each patient's nodules together).
        ids: the case ids, in table order.
        folds: the test indices of each patient-grouped stratified fold.
        masks: (N, 1, D, H, W) lesion masks on the images' grid (only with the ``attention`` option).
    """

    images: torch.Tensor
    labels: np.ndarray
    patients: np.ndarray
    ids: list[str]
    folds: list[np.ndarray]
    masks: torch.Tensor | None = None


def first_useful_probe(iterations: Sequence[int], walls: Sequence[float], aucs: Sequence[float],
                       margin: float = 0.05) -> tuple[int, float] | None:
    """The first probe ``margin`` above the iteration-0 probe (the random-initialised encoder).

    Args:
        iterations: the probed iterations.
        walls: the run's wall seconds at each probe.
        aucs: the probe AUC at each.
        margin: the AUC gain asked for.

    Returns:
        ``(iteration, wall seconds)``, or ``None`` (not reached, or no iteration-0 probe).

    Example:
        >>> first_useful_probe([0, 100, 200], [5.0, 60.0, 120.0], [0.70, 0.74, 0.76])
        (200, 120.0)
    """
    if not iterations or iterations[0] != 0:
        return None
    return next(((int(i), float(w)) for i, w, a in zip(iterations, walls, aucs) if a >= aucs[0] + margin), None)


def _patients_per_class(items: Sequence[Mapping[str, Any]]) -> dict[int, int]:
    """Number of patients with at least one nodule of each class (0 benign, 1 malignant)."""
    members: dict[int, set[str]] = {0: set(), 1: set()}
    for it in items:
        members[int(it["label"])].add(str(it["patient"]))
    return {c: len(p) for c, p in members.items()}


def select_cases(items: Sequence[Mapping[str, Any]], max_cases: int | None, seed: int = 0) -> list[Mapping[str, Any]]:
    """A deterministic subset of whole patients, stratified by label, of about ``max_cases`` nodules:
    the nodule splits' :func:`~dagman_components.data.splits.few_shot_subset`
    with the share ``max_cases / len(items)``.

    Args:
        items: labelled items with ``label`` and ``patient``.
        max_cases: the nodule budget; ``None`` (or at least ``len(items)``) keeps every item.
        seed: shuffling seed.

    Returns:
        The chosen items, in their original order.

    Raises:
        ValueError: for ``max_cases < 1``.
    """
    if max_cases is None or int(max_cases) >= len(items):
        return list(items)
    if int(max_cases) < 1:
        raise ValueError(f"max_cases must be at least 1 (or None for all cases), got {max_cases}.")
    return few_shot_subset(items, int(max_cases) / len(items), seed)


def check_probe_classes(items: Sequence[Mapping[str, Any]], n_folds: int, source: str) -> None:
    """Raise when the folds cannot each test both classes.

    Args:
        items: the labelled items the probe uses.
        n_folds: number of patient-grouped folds.
        source: the folder, named in the message.

    Raises:
        ValueError: when either class has fewer than ``max(2, n_folds)`` patients; the message names
            ``probe_dir`` and the counts.
    """
    need = max(2, int(n_folds))
    counts = _patients_per_class(items)
    if min(counts.values()) < need:
        raise ValueError(
            f"{_DIR_KEY} '{source}': the probe needs at least {need} patients of each class for n_folds={n_folds} "
            f"patient-grouped folds, but its {len(items)} nodule(s) come from {counts[1]} patient(s) with a malignant "
            f"and {counts[0]} with a benign nodule. Point {_DIR_KEY} at a larger set, raise max_cases or lower n_folds."
        )


class ProbeCurveWriter(CurveWriter):
    """The probe ROC AUC of each token over the pretraining iterations: ``png_path`` and its CSV
    (``iteration,auc_<token>...,seconds``), through the one curve writer. :class:`FrozenFeatureProbe`
    adds the points to the history and calls :meth:`write`; it is not attached to an engine itself.

    The iteration-0 values (the random-init baseline), when recorded, are dashed horizontal lines in
    each token's colour; chance (0.5) is dotted.

    Args:
        png_path: the PNG (the CSV beside it, ``.csv``).
        tokens: the probed encoder outputs (series ``auc_<token>``).
        history: the probe's history (default a new one).
        title: the figure's title.
    """

    x_name = "iteration"

    def __init__(self, png_path: str | os.PathLike, tokens: Sequence[str], history: CurveHistory | None = None,
                 title: str = "DAGMaN pretraining: frozen-feature probe", attention: bool = False) -> None:
        super().__init__(png_path, history)
        self.tokens = [str(t) for t in tokens]
        self.title = title
        self.attention = bool(attention)

    def record(self, engine: Engine) -> None:
        """Nothing per iteration: the probe adds its points when it probes."""

    def _draw_attention(self, ax: Any) -> None:
        _draw_attention_panel(ax, self.history)

    def columns(self) -> list[str]:
        return ([f"auc_{t}" for t in self.tokens] + (list(ATTENTION_SERIES) if self.attention else [])
                + [WALL_SERIES, "seconds"])

    def draw(self, plt: Any) -> Any:
        if self.attention:
            fig, (ax, att) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=120)
            self._draw_attention(att)
        else:
            fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
        its = self.history.xs("seconds")
        for n, token in enumerate(self.tokens):
            values, colour = self.history.values(f"auc_{token}"), f"C{n}"
            ax.plot(its, values, marker="o", ms=3, color=colour, label=f"{token} token")
            if its and its[0] == 0 and math.isfinite(values[0]):
                ax.axhline(values[0], color=colour, ls="--", lw=1, alpha=0.8,
                           label=f"{token} at init ({values[0]:.3f})")
        ax.axhline(0.5, color="grey", ls=":", lw=1, label="chance")
        finite = [v for t in self.tokens for v in self.history.values(f"auc_{t}") if math.isfinite(v)]
        ax.set_ylim(max(0.0, min(finite + [0.5]) - 0.05), 1.0)
        ax.set_xlabel("iteration")
        ax.set_ylabel("probe ROC AUC (mean over folds)")
        ax.set_title(self.title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig


def _draw_attention_panel(ax: Any, history: CurveHistory) -> None:
    """S_ATT on shifted crops: cell AUROC (left axis) and mass ratio (right axis), clean and noisy pass."""
    its = history.xs("seconds")
    for name, style in (("att_cell_auroc", "-"), ("att_cell_auroc_noisy", "--")):
        ax.plot(its, history.values(name), style, marker="o", ms=3, color="C2",
                label="cell AUROC" + (" (noisy pass)" if "noisy" in name else ""))
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set_ylabel("S_ATT cell AUROC (lesion cells vs the rest)")
    ax.set_xlabel("iteration")
    ratio = ax.twinx()
    for name, style in (("att_mass_ratio", "-"), ("att_mass_ratio_noisy", "--")):
        ratio.plot(its, history.values(name), style, marker="s", ms=3, color="C3",
                   label="mass ratio" + (" (noisy pass)" if "noisy" in name else ""))
    ratio.axhline(1.0, color="C3", ls=":", lw=1)
    ratio.set_ylabel("S_ATT mass on the lesion / lesion share (1: uniform)")
    lines = ax.get_legend_handles_labels()
    more = ratio.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)
    ax.set_title("attention on shifted crops")
    ax.grid(alpha=0.3)


class FrozenFeatureProbe:
    """Probe the frozen teacher's features on a labelled nodule set during pretraining.

    At ``Events.STARTED`` of a fresh run (iteration 0: the random-init baseline; skipped on a resumed
    run), every ``interval`` iterations and at ``Events.COMPLETED`` (unless just probed), it embeds
    the nodules with the network's encoder (eval mode, ``torch.no_grad()``, no mask, no token
    dropout, the previous mode restored), scores each token with :func:`probe_auc` in
    patient-grouped stratified folds and:

    * appends to its history (``state_dict`` / ``load_state_dict``; put it in the checkpoint dict to
      carry it across resumes; without that, a resumed run reads back the rows of its CSV up to the
      resumed iteration);
    * keeps the result in ``last_result`` (iteration, ``auc_<token>``, seconds, cases, folds) and its
      ``probe_<series>`` numbers (``probe_auc_<token>``, and the attention series) in ``scalars`` for
      the rest of that iteration (a :class:`~dagman_components.handlers.events.DiagnosticSource`: the
      bundle's TensorBoard and MLflow handlers, attached after it, log them through
      :class:`~dagman_components.handlers.events.LoggedScalars`), then fires
      :attr:`~dagman_components.handlers.events.DiagnosticEvents.PROBE_RESULT`;
    * logs one INFO line and rewrites ``png_path`` and the CSV next to it, atomically.

    Only rank 0 probes under ``torch.distributed``. Handlers run in the order they are attached:
    attach it after the resume handler and the teacher's EMA update and before the TensorBoard
    handler and the checkpoint saver (``configs/probe.yaml`` appends it to ``train#common_handlers``),
    so that ``STARTED`` sees the resumed iteration and the same iteration's logs see its result.

    Args:
        probe_dir: a folder in the LIDC layout: ``nodules.csv`` (read with
            :func:`~dagman_components.data.nodule_table.read_nodule_table` and its defaults: the paper's
            label rule) and ``image/``.
        network: the network probed (its ``encoder`` if it has one; DDP-unwrapped); ``None`` takes
            ``engine.teacher``.
        interval: probe every this many iterations; 0 or less: only the baseline and the end.
        png_path: the AUC plot; the CSV goes next to it with a ``.csv`` suffix; ``None`` writes neither.
        roi_size: crop size in voxels (every side divisible by 32).
        spacing: voxel spacing in mm.
        hu_window: HU window scaled to [0, 1] (the pretraining one).
        n_folds: patient-grouped stratified folds.
        classifier: ``"logistic"`` (default) or ``"knn"``.
        C: inverse L2 strength of the logistic probe
            (:func:`~dagman_components.probing.fit_logistic_probe`, balanced classes).
        n_neighbors: k of the kNN classifier.
        batch_size: images per forward pass.
        max_cases: keep a seeded, label-stratified subset of whole patients of about this many
            nodules (:func:`select_cases`); ``None`` keeps all.
        tokens: encoder outputs probed.
        seed: seed of the folds, the subset and the classifier.
        device: where the features are computed; default the engine's (``engine.state.device``), else
            the network's.
        attention: also measure where S_ATT looks, on the lesion masks of ``probe_dir/mask/`` (same file
            names as ``image/``): cell AUROC and mass ratio on crops shifted by up to
            ``attention_shift`` voxels per axis, for the clean pass and a noisy pass
            (:data:`ATTENTION_SERIES`; cases with an empty mask are left out).
        attention_shift: largest shift per axis, in voxels.
        attention_patch_drop: token-drop rate of the noisy pass (the run's ``teacher_patch_drop``).
        overlay_cases: with ``attention``, also draw S_ATT over this many crops (the first ones with a
            lesion, unshifted, the mask outlined) at every probe, into ``attention_overlay.png`` beside
            ``png_path``; 0: no overlay.

    Raises:
        FileNotFoundError: ``probe_dir``, its ``nodules.csv`` or its ``image/`` folder is missing
            (the message names the path and ``probe_dir``).
        ValueError: invalid settings, an unreadable table (``NoduleTableError``, prefixed with
            ``probe_dir``) or fewer than ``max(2, n_folds)`` patients of a class.

    Example (bundle config)::

        - _target_: dagman_components.handlers.probe.FrozenFeatureProbe
          probe_dir: ../shared/data/lidc_nodules
          network: "@teacher"
          interval: 50
          png_path: $os.path.join(@output_dir, 'probe_auc.png')
    """

    def __init__(
        self,
        probe_dir: str | os.PathLike,
        network: nn.Module | None = None,
        interval: int = 50,
        png_path: str | os.PathLike | None = None,
        roi_size: Sequence[int] | int = NODULE_ROI,
        spacing: Sequence[float] = NODULE_SPACING,
        hu_window: Sequence[float] = HU_WINDOW,
        n_folds: int = 3,
        classifier: str = "logistic",
        C: float = DEFAULT_C,
        n_neighbors: int = 10,
        batch_size: int = 16,
        max_cases: int | None = None,
        tokens: Sequence[str] = ("cls", "global"),
        seed: int = 0,
        device: torch.device | str | None = None,
        attention: bool = False,
        attention_shift: int = 8,
        attention_patch_drop: float = 0.7,
        overlay_cases: int = 0,
    ) -> None:
        if classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {list(CLASSIFIERS)}, got {classifier!r}.")
        if int(batch_size) < 1 or not tokens:
            raise ValueError(f"batch_size must be >= 1 and tokens non-empty, got {batch_size} and {list(tokens)}.")
        self.probe_dir = Path(probe_dir)
        self.network = network
        self.interval = int(interval)
        self.png_path = Path(png_path) if png_path is not None else None
        self.roi_size, self.spacing, self.hu_window = roi_size, spacing, hu_window
        self.n_folds = int(n_folds)
        self.classifier, self.C, self.n_neighbors = classifier, float(C), int(n_neighbors)
        self.batch_size, self.max_cases = int(batch_size), max_cases
        self.tokens = [str(t) for t in tokens]
        self.seed = int(seed)
        self.device = device
        self.attention, self.attention_shift = bool(attention), int(attention_shift)
        self.attention_patch_drop = float(attention_patch_drop)
        self.overlay_cases = int(overlay_cases) if self.attention else 0
        self.items = self._read_items()
        self._data: ProbeData | None = None
        self._clock_start: float | None = None  # perf_counter at the run's start in this process
        self._wall_offset = 0.0  # wall seconds recorded before this process (a resumed run)
        self.history = CurveHistory("iteration")  # auc_<token> and seconds per probed iteration
        #: The last probe's result (``None`` before the first).
        self.last_result: dict[str, Any] | None = None
        #: ``probe_<series> -> value`` of the probe run during the current iteration (empty otherwise).
        self.scalars: dict[str, float] = {}
        self.curves = (ProbeCurveWriter(self.png_path, self.tokens, self.history, attention=self.attention)
                       if self.png_path is not None else None)

    # -- the labelled set

    def _read_items(self) -> list[Mapping[str, Any]]:
        """The table's items (after ``max_cases``), checked for enough patients per class."""
        csv_path, image_dir = self.probe_dir / "nodules.csv", self.probe_dir / "image"
        for path, what in ((self.probe_dir, "folder"), (csv_path, "table"), (image_dir, "image folder")):
            if not path.exists():
                raise FileNotFoundError(
                    f"{_DIR_KEY}: the probe's nodule {what} '{path}' does not exist; set {_DIR_KEY} to a folder with "
                    "nodules.csv and image/ (the LIDC layout of data/lidc_nodules_sample)."
                )
        try:
            items = read_nodule_table(os.path.join(self.probe_dir, "nodules.csv"), image_dir=image_dir)
        except NoduleTableError as e:
            raise NoduleTableError(f"{_DIR_KEY} '{self.probe_dir}': {e}") from e
        if self.attention:
            mask_dir = self.probe_dir / "mask"
            if not mask_dir.is_dir():
                raise FileNotFoundError(f"{_DIR_KEY}: the attention option needs lesion masks in '{mask_dir}' (same "
                                        "file names as image/); add them or set probe_attention false.")
            items = [{**it, "mask": str(mask_dir / Path(str(it["image"])).name)} for it in items]
        items = select_cases(items, self.max_cases, self.seed)
        check_probe_classes(items, self.n_folds, str(self.probe_dir))
        return items

    def _preprocess(self) -> torch.Tensor:
        """The (N, 1, D, H, W) float32 images of :attr:`items`."""
        from monai.transforms import Compose

        transform = Compose(nodule_preprocessing(roi_size=self.roi_size, spacing=self.spacing,
                                                 hu_window=self.hu_window, track_meta=False))
        images = []
        for it in self.items:
            img = transform(dict(it))["image"]
            images.append(torch.as_tensor(img.as_tensor() if hasattr(img, "as_tensor") else img, dtype=torch.float32))
        return torch.stack(images)

    def _preprocess_masks(self) -> torch.Tensor:
        """The (N, 1, D, H, W) lesion masks of :attr:`items`, on the images' grid."""
        from monai.utils import ensure_tuple_rep

        from dagman_components.metrics.attention_in_mask import nodule_and_mask_transforms

        transform = nodule_and_mask_transforms(ensure_tuple_rep(self.roi_size, 3), self.spacing, self.hu_window)
        return torch.stack([torch.as_tensor(transform(dict(it))["mask"], dtype=torch.float32) for it in self.items])

    def attention_scores(self, engine: Engine | None = None) -> dict[str, float]:
        """S_ATT's cell AUROC and mass ratio on shifted crops, clean and noisy pass (:data:`ATTENTION_SERIES`)."""
        from dagman_components.metrics.attention_localisation import attention_localisation

        encoder = self._encoder(engine)
        d, device = self.data, self._device(engine, encoder)
        out = {}
        for suffix, drop in (("", 0.0), ("_noisy", self.attention_patch_drop)):
            report = attention_localisation(encoder, d.images, d.masks, max_shift=self.attention_shift,
                                            seed=self.seed, patch_drop=drop, batch_size=self.batch_size, device=device)
            out[f"att_cell_auroc{suffix}"] = report["s_att"]["cell_auroc"]
            out[f"att_mass_ratio{suffix}"] = report["s_att"]["mass_ratio"]
        return out

    @property
    def overlay_path(self) -> Path | None:
        """``attention_overlay.png`` beside ``png_path``."""
        return self.png_path.with_name("attention_overlay.png") if self.png_path is not None else None

    def draw_overlay(self, engine: Engine | None = None) -> None:
        """S_ATT over the first ``overlay_cases`` crops with a lesion (the encoder now), into :attr:`overlay_path`."""
        from dagman_components.visualize.attention_overlay import attention_volume
        from dagman_components.visualize.heatmap import plot_attention_slices, save_figure_atomic

        encoder = self._encoder(engine)
        d, device = self.data, self._device(engine, encoder)
        assert d.masks is not None
        chosen = [i for i in range(len(d.ids)) if bool(d.masks[i].any())][: self.overlay_cases]
        maps = [attention_volume(encoder, d.images[i : i + 1].to(device)) for i in chosen]
        iteration = int(engine.state.iteration) if engine is not None else 0
        fig = plot_attention_slices([d.images[i, 0].numpy() for i in chosen], maps,
                                    [d.masks[i, 0].numpy() for i in chosen], slices=1,
                                    title=f"[CLS] attention S_ATT at iteration {iteration} (nodule outlined)",
                                    colorbar_label="attention (case min to max)")
        save_figure_atomic(fig, self.overlay_path)

    @property
    def data(self) -> ProbeData:
        """The preprocessed labelled set and its folds (built on first use, then kept)."""
        if self._data is None:
            t0 = time.perf_counter()
            labels = np.array([int(it["label"]) for it in self.items])
            patients = np.array([str(it["patient"]) for it in self.items])
            self._data = ProbeData(
                images=self._preprocess(), labels=labels, patients=patients,
                ids=[str(it["id"]) for it in self.items],
                folds=grouped_stratified_folds(labels, patients, self.n_folds, self.seed),
                masks=self._preprocess_masks() if self.attention else None,
            )
            logger.info("probe set: %d nodules (%d malignant) of %d patients from %s, preprocessed in %.1f s",
                        len(labels), int(labels.sum()), len(set(patients.tolist())), self.probe_dir,
                        time.perf_counter() - t0)
        return self._data

    # -- probing

    def _encoder(self, engine: Engine | None) -> nn.Module:
        network = self.network if self.network is not None else getattr(engine, "teacher", None)
        if network is None:
            raise ValueError("FrozenFeatureProbe: give network, or attach it to an engine with a 'teacher' attribute.")
        network = unwrap(network)
        return network.encoder if isinstance(getattr(network, "encoder", None), nn.Module) else network

    def _device(self, engine: Engine | None, encoder: nn.Module) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        device = getattr(getattr(engine, "state", None), "device", None)
        return torch.device(device) if device is not None else module_device(encoder)

    def features(self, engine: Engine | None = None) -> dict[str, np.ndarray]:
        """The frozen features of the labelled set, ``token -> (N, C)``.

        Args:
            engine: the engine (for ``engine.teacher`` and its device); optional with ``network``.

        Returns:
            The features of every token.
        """
        encoder = self._encoder(engine)
        feats = frozen_features(encoder, image_batches(self.data.images, self.batch_size), self.tokens,
                                self._device(engine, encoder))
        return {t: f.flatten(1).numpy().astype(np.float64) for t, f in feats.items()}

    def score(self, features: Mapping[str, np.ndarray]) -> dict[str, float]:
        """The mean test AUC of each token's features over the probe's folds.

        Args:
            features: ``token -> (N, C)`` features of :attr:`data`.

        Returns:
            ``token -> AUC``.
        """
        d = self.data
        return {t: probe_auc(features[t], d.labels, d.folds, classifier=self.classifier, C=self.C,
                             n_neighbors=self.n_neighbors) for t in self.tokens}

    def run_probe(self, engine: Engine) -> dict[str, Any]:
        """Probe now, record the result and report it (files, state, scalars, log).

        Args:
            engine: the training engine.

        Returns:
            The result: ``iteration``, ``auc_<token>``, ``seconds``, ``cases``, ``folds``.
        """
        data = self.data  # first use: preprocessing is not counted in the probe's seconds
        t0 = time.perf_counter()
        values = {f"auc_{t}": auc for t, auc in self.score(self.features(engine)).items()}
        if self.attention:
            values.update(self.attention_scores(engine))
        seconds = time.perf_counter() - t0
        if self._clock_start is None:
            self._clock_start = t0
        values[WALL_SERIES] = self._wall_offset + time.perf_counter() - self._clock_start
        if self.overlay_cases and self.png_path is not None:
            self.draw_overlay(engine)
        iteration = int(engine.state.iteration)
        for name, value in values.items():
            self.history.add(name, iteration, value)
        self.history.add("seconds", iteration, seconds)
        result = {"iteration": iteration, **values, "seconds": seconds, "cases": len(data.labels),
                  "folds": len(data.folds)}
        self._report(engine, result)
        return result

    def _report(self, engine: Engine, result: Mapping[str, Any]) -> None:
        self.last_result = dict(result)
        self.scalars = {f"probe_{name}": float(result[name]) for name in self.series}
        logger.info("probe @ iteration %d: AUC %s (%d cases, %d folds, %.1f s)%s", result["iteration"],
                    ", ".join(f"{t} {result[f'auc_{t}']:.3f}" for t in self.tokens), result["cases"], result["folds"],
                    result["seconds"], "" if not self.attention else
                    "; S_ATT on shifted crops: cell AUROC {:.3f} (noisy {:.3f}), mass ratio {:.2f} (noisy {:.2f})".format(
                        *(result[k] for k in ATTENTION_SERIES[::2] + ATTENTION_SERIES[1::2])))
        useful = self.time_to_useful(self.tokens[0])
        if useful is not None and useful[0] == result["iteration"]:
            logger.info("probe: the %s probe is 0.05 AUC above its random-init value after %.1f min of wall time "
                        "(iteration %d): the time to a useful encoder", self.tokens[0], useful[1] / 60, useful[0])
        self.write()
        if DiagnosticEvents.PROBE_RESULT in getattr(engine, "_allowed_events", ()):
            engine.fire_event(DiagnosticEvents.PROBE_RESULT)

    # -- ignite

    def attach(self, engine: Engine) -> None:
        """Probe at the start of a fresh run, every ``interval`` iterations and at the end (once)."""
        if engine.has_event_handler(self._on_started, Events.STARTED):
            return
        register_diagnostic_events(engine)
        engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._forget_scalars)
        if self.interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self._on_completed)

    def __call__(self, engine: Engine) -> None:
        """Probe (rank 0 only)."""
        if is_main_process():
            self.run_probe(engine)

    def _forget_scalars(self, engine: Engine) -> None:
        self.scalars = {}

    def _on_started(self, engine: Engine) -> None:
        self._clock_start = time.perf_counter()
        if int(engine.state.iteration) == 0:
            self(engine)  # the random-init baseline
        elif not self.iterations:
            self._recover_from_csv(int(engine.state.iteration))

    def _on_completed(self, engine: Engine) -> None:
        if not self.iterations or self.iterations[-1] != int(engine.state.iteration):
            self(engine)

    # -- history and files

    @property
    def iterations(self) -> list[int]:
        """The probed iterations, in order."""
        return self.history.xs("seconds")

    @property
    def aucs(self) -> dict[str, list[float]]:
        """``token -> AUC`` at each probed iteration."""
        return {t: self.history.values(f"auc_{t}") for t in self.tokens}

    @property
    def seconds(self) -> list[float]:
        """The time each probe took."""
        return self.history.values("seconds")

    @property
    def csv_path(self) -> Path | None:
        """The CSV next to ``png_path``."""
        return self.png_path.with_suffix(".csv") if self.png_path is not None else None

    def write(self) -> None:
        """Rewrite the PNG and the CSV (rank 0, when ``png_path`` is set and there is a history)."""
        if self.curves is not None:
            self.curves.write()

    def _recover_from_csv(self, iteration: int) -> None:
        """On a resumed run without the probe in the checkpoint, read back the CSV rows up to ``iteration``."""
        path = self.csv_path
        if path is None or not path.is_file():
            return
        try:
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= iteration]
            state = {"iterations": [int(r["iteration"]) for r in rows], "seconds": [float(r["seconds"]) for r in rows],
                     **{name: [float(r[name]) for r in rows] for name in self.series}}
        except (KeyError, ValueError) as e:
            logger.warning("probe: cannot read back the history of %s (%s); it starts anew", path, e)
            return
        self.load_state_dict(state)
        logger.info("probe: %d earlier point(s) read back from %s", len(rows), path)

    @property
    def series(self) -> list[str]:
        """The recorded series besides ``seconds``: ``auc_<token>``, then :data:`ATTENTION_SERIES` with ``attention``."""
        return [f"auc_{t}" for t in self.tokens] + (list(ATTENTION_SERIES) if self.attention else []) + [WALL_SERIES]

    def time_to_useful(self, token: str = "cls", margin: float = 0.05) -> tuple[int, float] | None:
        """When the probe first exceeded its random-init value (iteration 0) by ``margin``.

        Args:
            token: the probed output.
            margin: the AUC gain over iteration 0.

        Returns:
            ``(iteration, wall seconds)`` of the first such probe, or ``None`` (not reached, or no iteration-0
            baseline in the history).
        """
        return first_useful_probe(self.iterations, self.history.values(WALL_SERIES),
                                  self.history.values(f"auc_{token}"), margin)

    def state_dict(self) -> dict[str, list]:
        """The history: ``iterations``, every series and ``seconds`` (plain lists, checkpoint-safe)."""
        return {"iterations": list(self.iterations), **{name: self.history.values(name) for name in self.series},
                "seconds": list(self.seconds)}

    def load_state_dict(self, state: Mapping[str, Sequence[Any]]) -> None:
        """Restore the history of :meth:`state_dict`.

        Args:
            state: the mapping :meth:`state_dict` returned.

        Raises:
            ValueError: when its lists differ in length or a token is missing.
        """
        missing = [k for k in ("iterations", "seconds", *self.series) if k not in state]
        lengths = {len(state[k]) for k in ("iterations", "seconds", *self.series) if k in state}
        if missing or len(lengths) > 1:
            raise ValueError(f"probe history: missing {missing} or lists of different lengths {sorted(lengths)}.")
        self.history.series.clear()
        for n, iteration in enumerate(state["iterations"]):
            for name in self.series:
                self.history.add(name, iteration, state[name][n])
            self.history.add("seconds", iteration, state["seconds"][n])
        walls = list(state[WALL_SERIES])
        self._wall_offset = float(walls[-1]) if walls else 0.0
