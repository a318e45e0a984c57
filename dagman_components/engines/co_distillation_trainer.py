"""The DAGMaN co-distillation trainer: noisy EMA teacher -> attention -> student masks -> losses -> step."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from functools import lru_cache

import torch
import torch.nn as nn
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch.optim import Optimizer

from dagman_components.runtime.compilation import compile_network
from dagman_components.data.resumable import derive_seed
from dagman_components.errors import DagmanError
from dagman_components.losses import DAGMaNLoss
from dagman_components.masking import AttentionGuidedMasking, PatchDropout, upsample_mask
from dagman_components.networks.outputs import EncoderOutput
from dagman_components.networks.pretrain import unwrap
from dagman_components.optim.schedules import value_at

__all__ = ["CoDistillationTrainer", "NonFiniteLossError", "MicroBatches", "optimizer_steps_per_epoch", "autocast_settings", "cpu_has_native_bf16"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(DagmanError, FloatingPointError):
    """Raised when a loss term is NaN or infinite; the step is not taken and nothing is saved."""


def _split_views(out: dict, n: int = 2) -> list[dict]:
    """Split a network output computed on ``n`` concatenated views back into one dict per view."""
    views: list[dict] = [{} for _ in range(n)]
    for key, value in out.items():
        if key == EncoderOutput.SA_GRID:
            parts = [value] * n
        elif isinstance(value, list):
            chunks = [v.chunk(n) for v in value]
            parts = [[c[i] for c in chunks] for i in range(n)]
        else:
            parts = list(value.chunk(n))
        for view, part in zip(views, parts):
            view[key] = part
    return views


def optimizer_steps_per_epoch(loader: Iterable, accumulate_steps: int = 1) -> int:
    """Optimizer steps in one epoch of ``loader``: its batches // ``accumulate_steps``.

    Raises:
        ValueError: when ``accumulate_steps < 1`` or the epoch would have no step (names the config
            keys to change).
    """
    if accumulate_steps < 1:
        raise ValueError(f"accumulate_steps must be >= 1, got {accumulate_steps}.")
    n = len(loader)  # type: ignore[arg-type]
    if n < accumulate_steps:
        raise ValueError(
            f"the training data loader has {n} batch(es) per epoch, fewer than accumulate_steps={accumulate_steps}, "
            "so an epoch would have no optimizer step: lower accumulate_steps or batch_size, or add volumes."
        )
    return n // accumulate_steps


class MicroBatches:
    """Group a data loader's batches into lists of ``accumulate_steps`` micro-batches: one list per
    optimizer step. Batches left over at the end of an epoch (fewer than ``accumulate_steps``) are
    dropped, so every step sees the same number of samples.

    Args:
        loader: the data loader (its sampler, e.g. a ``DistributedSampler``, is used as it is).
        accumulate_steps: micro-batches per optimizer step (>= 1).

    Raises:
        ValueError: when ``accumulate_steps < 1`` or the loader has fewer batches than that.
    """

    def __init__(self, loader: Iterable, accumulate_steps: int) -> None:
        optimizer_steps_per_epoch(loader, accumulate_steps)
        self.loader = loader
        self.accumulate_steps = int(accumulate_steps)

    def __len__(self) -> int:
        return optimizer_steps_per_epoch(self.loader, self.accumulate_steps)

    def __iter__(self) -> Iterator[list]:
        group: list = []
        for batch in self.loader:
            group.append(batch)
            if len(group) == self.accumulate_steps:
                yield group
                group = []


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX), where bf16
    autocast is faster than fp32; without them it would be slower."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_settings(device: torch.device, amp: bool, amp_dtype: str = "auto") -> tuple[bool, torch.dtype]:
    """Resolve the mixed-precision setting of a device.

    Args:
        device: the training device.
        amp: whether mixed precision is wanted.
        amp_dtype: ``"auto"`` (float16 on CUDA, bfloat16 on a CPU with native bf16, off on other
            CPUs), ``"bfloat16"`` or ``"float16"`` (CUDA only).

    Returns:
        ``(enabled, dtype)`` for ``torch.autocast``.

    Raises:
        ValueError: for an unknown ``amp_dtype`` or float16 on CPU.
    """
    names = {"auto": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "fp16": torch.float16}
    if amp_dtype not in names:
        raise ValueError(f"amp_dtype must be one of {sorted(names)}, got {amp_dtype!r}.")
    dtype = names[amp_dtype]
    if device.type == "cuda":
        return amp, dtype or torch.float16
    if dtype is torch.float16:
        raise ValueError("amp_dtype float16 is for CUDA; on CPU use bfloat16 (or auto).")
    if dtype is None and amp and not cpu_has_native_bf16():
        logger.info("mixed precision off: this CPU has no native bf16 (AVX512-BF16 / AMX), fp32 is faster")
        return False, torch.bfloat16
    return amp, torch.bfloat16


class CoDistillationTrainer(Trainer):
    """DAGMaN pretraining as a MONAI ``Trainer``.

    One iteration is one optimizer step. It takes ``accumulate_steps`` micro-batches (one by
    default), each holding two views (u, v) of each volume, and for each:

    1. the EMA teacher (no gradients) encodes the noisy views u_hat, v_hat (patch dropout on its
       tokens) and yields S_ATT on the semantic-attention grid (or, with
       ``clean_teacher_attention``, S_ATT from an extra pass on the clean views);
    2. ``masking`` turns S_ATT into one mask per view, upsampled to the patch grid (student input)
       and to voxels (reconstruction loss);
    3. the student encodes the masked views u_tilde, v_tilde in one pass;
    4. :class:`~dagman_components.losses.DAGMaNLoss` gives the total and its four terms; a
       non-finite value raises :class:`NonFiniteLossError` before any update;
    5. backward of ``total / accumulate_steps`` (gradients add up; under DDP only the last
       micro-batch synchronises).

    Then, once per step: optional gradient clipping, the prototype layers' gradients dropped during
    the first ``freeze_last_layer_iterations`` steps, the optimizer step, and the centre update from
    the teacher outputs of all micro-batches. So k micro-batches of size b give the update of one
    batch of k*b, and every schedule (lr, teacher momentum and temperature, last-layer freezing,
    checkpoint interval) counts optimizer steps, because each is indexed by
    ``engine.state.iteration``. The schedules are precomputed arrays
    (:mod:`dagman_components.optim.schedules`) given to the objects that use them: the teacher temperature
    to this trainer, the momentum to the EMA handler (and to this trainer, which logs it), the
    learning rate and weight decay to :class:`~dagman_components.handlers.OptimizerSchedule`.

    The teacher's EMA update is a handler (:class:`~dagman_components.handlers.TeacherEMAHandler`).
    ``engine.state.output`` holds ``loss`` (the total) and ``scalars``: every term, lr, teacher
    temperature and momentum, masked fraction and the collapse diagnostics of
    :meth:`~dagman_components.losses.DAGMaNLoss.diagnostics` (``aitd/teacher_entropy``, ...,
    ``satt/entropy``), for the stats, TensorBoard and curve handlers. ``engine.state.teacher_temp``,
    ``engine.state.teacher_momentum`` and ``engine.state.masked_fraction`` are set every iteration
    (for ``StatsHandler``'s ``state_attributes``).

    Args:
        device: device of the networks.
        max_epochs: epochs to train.
        train_data_loader: yields dicts holding both views under ``view_keys``.
        network: the student (a :class:`~dagman_components.networks.DAGMaNPretrainNetwork`, DDP-wrapped or not).
        teacher: the EMA teacher (from :func:`~dagman_components.networks.make_teacher`).
        optimizer: optimizer of the student's parameters.
        loss_function: a :class:`~dagman_components.losses.DAGMaNLoss`.
        masking: the student's mask generator.
        patch_dropout: the teacher's patch dropout (rate 0 disables the noisy teacher).
        view_keys: batch keys of the two views.
        teacher_temp: teacher temperature per optimizer step
            (:func:`~dagman_components.optim.schedules.teacher_temperature_schedule`); one value: constant.
        teacher_momentum: the EMA momentum per optimizer step that the teacher's EMA handler applies
            (:func:`~dagman_components.optim.schedules.teacher_momentum_schedule`), logged; ``None``: logged as NaN.
        clip_grad: max gradient norm, ``None`` or 0 for no clipping.
        freeze_last_layer_iterations: optimizer steps during which the prototype layers do not learn.
        clean_teacher_attention: take S_ATT from an extra clean teacher pass instead of the noisy one.
        accumulate_steps: micro-batches per optimizer step.
        epoch_length: optimizer steps per epoch (default: the loader's length // accumulate_steps).
        non_blocking: non-blocking host-to-device copies.
        train_handlers: handlers to attach.
        amp: mixed precision: float16 with a gradient scaler on CUDA, bfloat16 on a CPU with native
            bf16 (see :func:`autocast_settings`). Softmax, centring and losses stay float32.
        amp_dtype: ``auto``, ``bfloat16`` or ``float16``.
        teacher_amp: run the teacher pass (no gradients) under mixed precision even when the student
            trains in float32; resolved like ``amp`` with ``amp_dtype`` (off on a CPU without native
            bf16). Its targets are still taken in float32.
        diagnostics: compute the collapse diagnostics every step (cheap; off only for benchmarks).
        seed: with a seed, every iteration reseeds ``masking``, ``patch_dropout`` and torch's CPU and
            CUDA generators (drop path) from ``(seed, iteration)``, so a run resumed from a
            checkpoint draws what the uninterrupted run drew; the seed is saved with the trainer's
            state and a resume with another seed is refused. ``None``: leave the generators as they are.
        compile: compile the student's and the teacher's forward with ``torch.compile``
            (:func:`~dagman_components.runtime.compilation.compile_network`: state-dict keys unchanged, one
            warning line and eager execution where compilation fails). The first step of each pass
            pays the compilation.

    Raises:
        ValueError: when ``view_keys`` does not name two keys, or for a bad ``accumulate_steps``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        teacher: nn.Module,
        optimizer: Optimizer,
        loss_function: DAGMaNLoss,
        masking: AttentionGuidedMasking,
        patch_dropout: PatchDropout,
        view_keys: Sequence[str] = ("image", "image_2"),
        teacher_temp: Sequence[float] | float = (0.07,),
        teacher_momentum: Sequence[float] | None = None,
        clip_grad: float | None = None,
        freeze_last_layer_iterations: int = 0,
        clean_teacher_attention: bool = False,
        accumulate_steps: int = 1,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        amp_dtype: str = "auto",
        teacher_amp: bool = False,
        diagnostics: bool = True,
        seed: int | None = None,
        compile: bool = False,
    ) -> None:
        if len(view_keys) != 2:
            raise ValueError(f"view_keys must name the two views, got {view_keys}.")
        if isinstance(teacher_temp, (int, float)):
            teacher_temp = (float(teacher_temp),)
        if len(teacher_temp) == 0 or min(teacher_temp) <= 0:
            raise ValueError("teacher_temp needs one positive temperature per optimizer step "
                             "(dagman_components.optim.schedules.teacher_temperature_schedule).")
        device = torch.device(device)
        use_amp, self.amp_dtype = autocast_settings(device, amp, amp_dtype)
        self.teacher_amp = use_amp or autocast_settings(device, teacher_amp, amp_dtype)[0]
        grouped = MicroBatches(train_data_loader, accumulate_steps) if accumulate_steps != 1 else train_data_loader
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,  # the loader itself, so that MONAI sets a DistributedSampler's epoch
            epoch_length=epoch_length if epoch_length is not None or accumulate_steps == 1 else len(grouped),
            non_blocking=non_blocking,
            handlers=train_handlers,
            amp=use_amp,
            decollate=False,
        )
        self.data_loader = grouped
        self.accumulate_steps = int(accumulate_steps)
        self.network = compile_network(network, compile)
        self.teacher = compile_network(teacher, compile)
        self.optimizer = optimizer
        self.loss_function = loss_function
        self.masking = masking
        self.patch_dropout = patch_dropout
        self.view_keys = tuple(view_keys)
        self.teacher_temp_schedule = teacher_temp
        self.teacher_momentum_schedule = teacher_momentum
        self.clip_grad = clip_grad or None
        self.freeze_last_layer_iterations = int(freeze_last_layer_iterations)
        self.clean_teacher_attention = clean_teacher_attention
        self.compute_diagnostics = diagnostics
        self.state.teacher_temp = self.teacher_temperature(1)
        self.state.teacher_momentum = self.teacher_momentum(1)
        self.seed = seed
        if seed is not None:
            self.state.seed = int(seed)
            self.state_dict_user_keys.append("seed")

    def reseed(self, iteration: int) -> None:
        """Seed the masks, the patch dropout and torch's generators from ``(seed, iteration)``.

        Raises:
            ValueError: when the trainer's state (restored from a checkpoint) holds another seed.
        """
        if self.state.seed != self.seed:
            raise ValueError(
                f"the checkpoint was written by a run with seed {self.state.seed}, this run has seed {self.seed}: "
                "resume with the same seed, or move the checkpoint away to start from scratch."
            )
        self.masking.set_random_state(derive_seed(self.seed, iteration, 0))
        self.patch_dropout.set_random_state(derive_seed(self.seed, iteration, 1))
        torch.manual_seed(derive_seed(self.seed, iteration, 2))  # CPU and every CUDA device

    def run(self) -> None:  # type: ignore[override]
        """Train; one AMP code path, the scaler being a no-op unless float16 autocast is on."""
        use_scaler = self.amp and self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.state.device.type, enabled=use_scaler)
        super(Trainer, self).run()  # Workflow.run: Trainer.run would build a CUDA-only scaler

    def teacher_temperature(self, iteration: int) -> float:
        """Teacher temperature of a 1-based optimizer step."""
        return value_at(self.teacher_temp_schedule, iteration)

    def teacher_momentum(self, iteration: int) -> float:
        """EMA momentum of a 1-based optimizer step (NaN without a momentum schedule)."""
        return float("nan") if self.teacher_momentum_schedule is None else value_at(self.teacher_momentum_schedule,
                                                                                      iteration)

    def _last_layer_parameters(self) -> list[nn.Parameter]:
        return [p for head in unwrap(self.network).projection_heads() for p in head.last_layer_parameters()]

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.state.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def _teacher_autocast(self) -> torch.autocast:
        return torch.autocast(self.state.device.type, dtype=self.amp_dtype, enabled=self.teacher_amp)

    def _forward_micro_batch(self, batchdata: dict, tau_t: float) -> dict:
        """Teacher pass, masks, student pass and losses of one micro-batch (no backward)."""
        dev = self.state.device
        u, v = (batchdata[k].to(dev, non_blocking=self.non_blocking) for k in self.view_keys)
        u, v = (x.as_tensor() if hasattr(x, "as_tensor") else x for x in (u, v))
        encoder = unwrap(self.network).encoder
        b = u.shape[0]
        patch_grid = [s // int(encoder.patch_size[0]) for s in u.shape[2:]]
        sa_grid = [s // encoder.sa_stride for s in u.shape[2:]]
        both = torch.cat([u, v])
        with torch.no_grad(), self._teacher_autocast(), torch.profiler.record_function("dagman/teacher_pass"):
            teacher_out = _split_views(self.teacher(both, token_drop=self.patch_dropout(2 * b, patch_grid, dev)))
            if self.clean_teacher_attention and self.masking.needs_attention:
                clean = _split_views(self.teacher(both))
                attention = [clean[0][EncoderOutput.S_ATT], clean[1][EncoderOutput.S_ATT]]
            else:
                attention = [teacher_out[0][EncoderOutput.S_ATT], teacher_out[1][EncoderOutput.S_ATT]]
        cell_masks = [self.masking(att, sa_grid, b, step=int(self.state.iteration)) for att in attention]
        patch_mask = upsample_mask(torch.cat(cell_masks), sa_grid, encoder.patches_per_sa_cell)
        voxel_masks = [upsample_mask(m, sa_grid, encoder.sa_stride) for m in cell_masks]

        with self._autocast():
            student_out = _split_views(self.network(both, mask=patch_mask))
            self.fire_event(IterationEvents.FORWARD_COMPLETED)
            with torch.profiler.record_function("dagman/losses"):
                targets = self.loss_function.teacher_targets((teacher_out[0], teacher_out[1]), tau_t)
                total, parts = self.loss_function(
                    student=(student_out[0], student_out[1]),
                    teacher=(teacher_out[0], teacher_out[1]),
                    cell_masks=(cell_masks[0], cell_masks[1]),
                    voxel_masks=(voxel_masks[0], voxel_masks[1]),
                    images=(u, v),
                    teacher_temp=tau_t,
                    targets=targets,
                )
        self.fire_event(IterationEvents.LOSS_COMPLETED)
        bad = [k for k, val in parts.items() if not torch.isfinite(val)]
        if bad or not torch.isfinite(total):
            values = ", ".join(f"{k}={float(val):.4g}" for k, val in parts.items())
            raise NonFiniteLossError(
                f"non-finite loss at epoch {self.state.epoch}, iteration {self.state.iteration} "
                f"(terms {bad or ['total']}; {values}). The step was not taken and no checkpoint was written; "
                "lower the learning rate, enable clip_grad, or check the input intensities."
            )
        diagnostics = {}
        if self.compute_diagnostics:
            diagnostics = self.loss_function.diagnostics(
                (student_out[0], student_out[1]), (teacher_out[0], teacher_out[1]), (cell_masks[0], cell_masks[1]), tau_t,
                targets=targets,
            )
        teacher_logits = {k: torch.cat([teacher_out[0][k], teacher_out[1][k]]).detach()
                          for k in ("cls_logits", "patch_logits", "global_logits")}
        return {"total": total, "parts": parts, "diagnostics": diagnostics, "teacher_logits": teacher_logits,
                "masked": torch.cat(cell_masks).float().mean()}

    def _iteration(self, engine: CoDistillationTrainer, batchdata: dict | list) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        micro_batches = batchdata if engine.accumulate_steps > 1 else [batchdata]
        k = len(micro_batches)
        if engine.seed is not None:
            engine.reseed(engine.state.iteration)
        tau_t = engine.teacher_temperature(engine.state.iteration)
        engine.state.teacher_temp = tau_t
        engine.state.teacher_momentum = engine.teacher_momentum(engine.state.iteration)
        engine.network.train()
        engine.teacher.eval()
        engine.optimizer.zero_grad(set_to_none=True)
        results = []
        no_sync = getattr(engine.network, "no_sync", None)  # DDP: all-reduce only on the last micro-batch
        for i, micro_batch in enumerate(micro_batches):
            last = i == k - 1
            with nullcontext() if last or no_sync is None else no_sync():
                res = engine._forward_micro_batch(micro_batch, tau_t)
                engine.scaler.scale(res["total"] / k).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            res["total"] = res["total"].detach()
            results.append(res)
        if engine.clip_grad:
            engine.scaler.unscale_(engine.optimizer)
            torch.nn.utils.clip_grad_norm_(engine.network.parameters(), engine.clip_grad)
        if engine.state.iteration <= engine.freeze_last_layer_iterations:
            for p in engine._last_layer_parameters():
                p.grad = None
        engine.scaler.step(engine.optimizer)
        engine.scaler.update()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        engine.loss_function.update_centers_from_logits(
            {key: torch.cat([r["teacher_logits"][key] for r in results]) for key in results[0]["teacher_logits"]}
        )

        total = torch.stack([r["total"] for r in results]).mean()
        masked = float(torch.stack([r["masked"] for r in results]).mean())
        engine.state.masked_fraction = masked
        scalars = {f"loss_{name}": float(torch.stack([r["parts"][name] for r in results]).mean())
                   for name in results[0]["parts"]}
        for name in results[0]["diagnostics"]:
            scalars[name] = sum(r["diagnostics"][name] for r in results) / k
        scalars.update(
            loss=float(total),
            lr=float(engine.optimizer.param_groups[0]["lr"]),
            teacher_temp=tau_t,
            teacher_momentum=engine.state.teacher_momentum,
            masked_fraction=masked,
        )
        return {Keys.LOSS: total, "scalars": scalars}
