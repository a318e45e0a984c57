"""The DAGMaN co-distillation trainer: noisy EMA teacher -> attention -> student masks -> losses -> step."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch.optim import Optimizer

from dagman_components.losses import DAGMaNLoss
from dagman_components.masking import AttentionGuidedMasking, PatchDropout, upsample_mask
from dagman_components.networks.pretrain import unwrap
from dagman_components.schedules import teacher_temperature_schedule

__all__ = ["CoDistillationTrainer", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """Raised when a loss term is NaN or infinite; the step is not taken and nothing is saved."""


def _split_views(out: dict, n: int = 2) -> list[dict]:
    """Split a network output computed on ``n`` concatenated views back into one dict per view."""
    views: list[dict] = [{} for _ in range(n)]
    for key, value in out.items():
        if key == "sa_grid":
            parts = [value] * n
        elif isinstance(value, list):
            chunks = [v.chunk(n) for v in value]
            parts = [[c[i] for c in chunks] for i in range(n)]
        else:
            parts = list(value.chunk(n))
        for view, part in zip(views, parts):
            view[key] = part
    return views


class CoDistillationTrainer(Trainer):
    """DAGMaN pretraining as a MONAI ``Trainer``.

    One iteration, for a batch of two views (u, v) of each volume:

    1. the EMA teacher (no gradients) encodes the noisy views u_hat, v_hat (patch dropout on its
       tokens) and yields S_ATT on the semantic-attention grid (or, with
       ``clean_teacher_attention``, S_ATT from an extra pass on the clean views);
    2. ``masking`` turns S_ATT into one mask per view, upsampled to the patch grid (student input)
       and to voxels (reconstruction loss);
    3. the student encodes the masked views u_tilde, v_tilde in one pass;
    4. :class:`~dagman_components.losses.DAGMaNLoss` gives the total and its four terms; a
       non-finite value raises :class:`NonFiniteLossError` before any update;
    5. backward (AMP scaler on GPU), optional gradient clipping, the prototype layers' gradients
       dropped during the first ``freeze_last_layer_epochs`` epochs, optimizer step, centre update.

    The teacher's EMA update is a handler (:class:`~dagman_components.handlers.TeacherEMAHandler`).
    ``engine.state.output`` holds ``loss`` (the total) and ``scalars`` (every term, lr, teacher
    temperature and momentum) for the stats and TensorBoard handlers. ``engine.state.teacher_temp``
    and ``engine.state.masked_fraction`` are set every iteration.

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
        teacher_temp: final teacher temperature.
        warmup_teacher_temp: first-epoch teacher temperature.
        warmup_teacher_temp_epochs: epochs of the linear temperature warm-up.
        clip_grad: max gradient norm, ``None`` or 0 for no clipping.
        freeze_last_layer_epochs: epochs during which the prototype layers do not learn.
        clean_teacher_attention: take S_ATT from an extra clean teacher pass instead of the noisy one.
        epoch_length: iterations per epoch (default: the loader's length).
        non_blocking: non-blocking host-to-device copies.
        train_handlers: handlers to attach.
        amp: mixed precision (used on CUDA; ignored on CPU).
        seed: seeds ``masking`` and ``patch_dropout`` (``None``: leave them as they are).

    Raises:
        ValueError: when ``view_keys`` does not name two keys.
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
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 30,
        clip_grad: float | None = None,
        freeze_last_layer_epochs: int = 1,
        clean_teacher_attention: bool = False,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        seed: int | None = None,
    ) -> None:
        if len(view_keys) != 2:
            raise ValueError(f"view_keys must name the two views, got {view_keys}.")
        device = torch.device(device)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            handlers=train_handlers,
            amp=amp and device.type == "cuda",
            decollate=False,
        )
        self.network = network
        self.teacher = teacher
        self.optimizer = optimizer
        self.loss_function = loss_function
        self.masking = masking
        self.patch_dropout = patch_dropout
        self.view_keys = tuple(view_keys)
        self.teacher_temps = teacher_temperature_schedule(
            teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs, max(max_epochs, 1)
        )
        self.clip_grad = clip_grad or None
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        self.clean_teacher_attention = clean_teacher_attention
        self.state.teacher_temp = float(self.teacher_temps[0])
        self.state.teacher_momentum = float("nan")
        if seed is not None:
            masking.set_random_state(seed)
            patch_dropout.set_random_state(seed + 1)

    def run(self) -> None:  # type: ignore[override]
        """Train; one AMP code path, the scaler being a no-op when AMP is off."""
        self.scaler = torch.amp.GradScaler(self.state.device.type, enabled=self.amp)
        super(Trainer, self).run()  # Workflow.run: Trainer.run would build a CUDA-only scaler

    def teacher_temperature(self, epoch: int) -> float:
        """Teacher temperature of a 1-based epoch (constant after the schedule)."""
        return float(self.teacher_temps[min(max(epoch - 1, 0), len(self.teacher_temps) - 1)])

    def _last_layer_parameters(self) -> list[nn.Parameter]:
        return [p for head in unwrap(self.network).projection_heads() for p in head.last_layer_parameters()]

    def _iteration(self, engine: CoDistillationTrainer, batchdata: dict) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        dev = engine.state.device
        u, v = (batchdata[k].to(dev, non_blocking=engine.non_blocking) for k in engine.view_keys)
        u, v = (x.as_tensor() if hasattr(x, "as_tensor") else x for x in (u, v))
        encoder = unwrap(engine.network).encoder
        b = u.shape[0]
        patch_grid = [s // int(encoder.patch_size[0]) for s in u.shape[2:]]
        sa_grid = [s // encoder.sa_stride for s in u.shape[2:]]
        both = torch.cat([u, v])
        tau_t = engine.teacher_temperature(engine.state.epoch)
        engine.state.teacher_temp = tau_t
        autocast = torch.autocast(dev.type, enabled=engine.amp)

        engine.network.train()
        engine.teacher.eval()
        with torch.no_grad(), autocast, torch.profiler.record_function("dagman/teacher_pass"):
            teacher_out = _split_views(engine.teacher(both, token_drop=engine.patch_dropout(2 * b, patch_grid, dev)))
            if engine.clean_teacher_attention and engine.masking.needs_attention:
                clean = _split_views(engine.teacher(both))
                attention = [clean[0]["s_att"], clean[1]["s_att"]]
            else:
                attention = [teacher_out[0]["s_att"], teacher_out[1]["s_att"]]
        cell_masks = [engine.masking(att, sa_grid, b) for att in attention]
        patch_mask = upsample_mask(torch.cat(cell_masks), sa_grid, encoder.patches_per_sa_cell)
        voxel_masks = [upsample_mask(m, sa_grid, encoder.sa_stride) for m in cell_masks]

        with autocast:
            student_out = _split_views(engine.network(both, mask=patch_mask))
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            with torch.profiler.record_function("dagman/losses"):
                total, parts = engine.loss_function(
                    student=(student_out[0], student_out[1]),
                    teacher=(teacher_out[0], teacher_out[1]),
                    cell_masks=(cell_masks[0], cell_masks[1]),
                    voxel_masks=(voxel_masks[0], voxel_masks[1]),
                    images=(u, v),
                    teacher_temp=tau_t,
                )
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        bad = [k for k, val in parts.items() if not torch.isfinite(val)]
        if bad or not torch.isfinite(total):
            values = ", ".join(f"{k}={float(val):.4g}" for k, val in parts.items())
            raise NonFiniteLossError(
                f"non-finite loss at epoch {engine.state.epoch}, iteration {engine.state.iteration} "
                f"(terms {bad or ['total']}; {values}). The step was not taken and no checkpoint was written; "
                "lower the learning rate, enable clip_grad, or check the input intensities."
            )

        engine.optimizer.zero_grad(set_to_none=True)
        engine.scaler.scale(total).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if engine.clip_grad:
            engine.scaler.unscale_(engine.optimizer)
            torch.nn.utils.clip_grad_norm_(engine.network.parameters(), engine.clip_grad)
        if engine.state.epoch <= engine.freeze_last_layer_epochs:
            for p in engine._last_layer_parameters():
                p.grad = None
        engine.scaler.step(engine.optimizer)
        engine.scaler.update()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        engine.loss_function.update_centers((teacher_out[0], teacher_out[1]))

        masked = torch.cat(cell_masks).float().mean()
        engine.state.masked_fraction = float(masked)
        scalars = {f"loss_{k}": float(val) for k, val in parts.items()}
        scalars.update(
            loss=float(total.detach()),
            lr=float(engine.optimizer.param_groups[0]["lr"]),
            teacher_temp=tau_t,
            teacher_momentum=float(getattr(engine.state, "teacher_momentum", float("nan"))),
            masked_fraction=float(masked),
        )
        return {Keys.LOSS: total.detach(), "scalars": scalars}
