#!/usr/bin/env python
"""Benchmark one DAGMaN training step against a SimMIM-like masked-reconstruction step.

Both use the same Swin backbone, input size and batch (two views of ``--batch`` volumes), the same
mask grid and ratio, AdamW, and one process. Reported: median step time of each, their ratio, the
share of the DAGMaN step spent in the teacher pass, the semantic-attention block, the projection
heads and the losses (forward time from ``torch.profiler`` ranges; backward time is not attributed
to them), the peak memory of each step (CUDA: max allocated; CPU: peak RSS above the idle process,
sampled every 2 ms), and achieved GFLOP/s (``torch.utils.flop_counter``). The last line printed is
one JSON object.

Example::

    python scripts/benchmark_pretraining.py --roi 64 --batch 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dagman_components.engines import CoDistillationTrainer  # noqa: E402
from dagman_components.handlers import ema_update  # noqa: E402
from dagman_components.losses import DAGMaNLoss, masked_l1  # noqa: E402
from dagman_components.masking import AttentionGuidedMasking, PatchDropout, upsample_mask  # noqa: E402
from dagman_components.networks import (  # noqa: E402
    DAGMaNPretrainNetwork,
    MaskedReconstructionNetwork,
    SwinDAGMaN,
    make_teacher,
)
from dagman_components.optim import param_groups_weight_decay  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


class PeakMemory:
    """Peak memory of a block: CUDA max allocated, or sampled RSS above the RSS at entry."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0.0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.base = rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_mb() - self.base)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encoder_kwargs(args) -> dict:
    return {"embed_dim": args.embed_dim, "depths": (2, 2, 8, 2), "num_heads": tuple(args.heads), "window_size": 4,
            "patch_size": 2, "drop_path_rate": 0.1}


def build_dagman(args, device):
    student = DAGMaNPretrainNetwork(SwinDAGMaN(**encoder_kwargs(args)), out_dim=args.out_dim).to(device)
    teacher = make_teacher(student)
    opt = torch.optim.AdamW(param_groups_weight_decay(student), lr=1e-4, foreach=True)
    trainer = CoDistillationTrainer(
        device=device, max_epochs=1, train_data_loader=[None], network=student, teacher=teacher, optimizer=opt,
        loss_function=DAGMaNLoss(args.out_dim).to(device), masking=AttentionGuidedMasking(),
        patch_dropout=PatchDropout(0.7), freeze_last_layer_iterations=0, amp=args.amp, diagnostics=False, seed=0,
    )
    trainer.scaler = torch.amp.GradScaler(device.type, enabled=trainer.amp and trainer.amp_dtype == torch.float16)
    trainer.state.epoch, trainer.state.iteration = 1, 1

    def step(batch):
        trainer._iteration(trainer, batch)
        ema_update(teacher, student, 0.996)

    return step


def build_baseline(args, device):
    net = MaskedReconstructionNetwork(SwinDAGMaN(**encoder_kwargs(args), sa_stage=None)).to(device)
    opt = torch.optim.AdamW(param_groups_weight_decay(net), lr=1e-4, foreach=True)
    masking = AttentionGuidedMasking("random").set_random_state(0)
    enc = net.encoder
    amp = args.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    def step(batch):
        x = torch.cat([batch["image"], batch["image_2"]]).to(device)
        grid = [s // enc.sa_stride for s in x.shape[2:]]
        cells = masking(None, grid, batch_size=x.shape[0]).to(device)
        with torch.autocast(device.type, enabled=amp):
            recon = net(x, mask=upsample_mask(cells, grid, enc.patches_per_sa_cell))
            loss = masked_l1(recon, x, upsample_mask(cells, grid, enc.sa_stride))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def time_steps(step, batch, device, warmup: int, steps: int) -> tuple[float, float]:
    for _ in range(warmup):
        step(batch)
    sync(device)
    times = []
    with PeakMemory(device) as mem:
        for _ in range(steps):
            t0 = time.perf_counter()
            step(batch)
            sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), mem.peak


def flops_of(step, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(batch)
    return float(counter.get_total_flops())


def component_shares(step, batch, device) -> dict[str, float]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step(batch)
        sync(device)
        wall_us = (time.perf_counter() - t0) * 1e6
    totals = {}
    for evt in prof.key_averages():
        if evt.key.startswith("dagman/"):
            dev_time = getattr(evt, "device_time_total", 0.0) if device.type == "cuda" else 0.0
            totals[evt.key[len("dagman/"):]] = max(evt.cpu_time_total, dev_time) / wall_us
    return totals


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--roi", type=int, default=64, help="cubic view size, divisible by 32")
    p.add_argument("--batch", type=int, default=2, help="volumes per step (two views each)")
    p.add_argument("--embed-dim", type=int, default=48)
    p.add_argument("--heads", type=int, nargs=4, default=(4, 4, 8, 16))
    p.add_argument("--out-dim", type=int, default=8192, help="prototypes K of the projection heads")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.roi % 32:
        p.error(f"--roi {args.roi} is not divisible by 32")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    shape = (args.batch, 1, args.roi, args.roi, args.roi)
    batch = {"image": torch.rand(shape, device=device), "image_2": torch.rand(shape, device=device)}

    base_step = build_baseline(args, device)
    baseline_s, baseline_mem = time_steps(base_step, batch, device, args.warmup, args.steps)
    baseline_flops = flops_of(base_step, batch)
    dag_step = build_dagman(args, device)
    dagman_s, dagman_mem = time_steps(dag_step, batch, device, args.warmup, args.steps)
    dagman_flops = flops_of(dag_step, batch)
    shares = component_shares(dag_step, batch, device)

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "roi": args.roi, "batch": args.batch, "embed_dim": args.embed_dim, "out_dim": args.out_dim, "amp": args.amp,
        "torch": torch.__version__,
        "dagman_step_s": round(dagman_s, 4),
        "baseline_step_s": round(baseline_s, 4),
        "ratio": round(dagman_s / baseline_s, 3),
        "share_teacher_pass": round(shares.get("teacher_pass", 0.0), 3),
        "share_semantic_attention": round(shares.get("semantic_attention", 0.0), 3),
        "share_projection_heads": round(shares.get("projection_heads", 0.0), 3),
        "share_losses": round(shares.get("losses", 0.0), 3),
        "dagman_peak_mb": round(dagman_mem, 1),
        "baseline_peak_mb": round(baseline_mem, 1),
        "memory_ratio": round(dagman_mem / baseline_mem, 3) if baseline_mem > 0 else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "dagman_gflop": round(dagman_flops / 1e9, 2),
        "baseline_gflop": round(baseline_flops / 1e9, 2),
        "gflop_per_s": round(dagman_flops / 1e9 / dagman_s, 2),
        "baseline_gflop_per_s": round(baseline_flops / 1e9 / baseline_s, 2),
    }
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
