#!/usr/bin/env python
"""Benchmark a DAGMaN training step against a plain masked-image-modelling step and the bare backbone.

Arms, all on the same Swin backbone, input size and batch (two views of ``--batch`` volumes):

- ``backbone``: MONAI's ``SwinTransformer`` forward and backward only (no heads, no optimizer);
- ``mim``: a SimMIM-like step (random masks on the same grid and ratio, L1 reconstruction, AdamW);
- ``dagman``: one full DAGMaN step (noisy teacher pass, attention-guided masks, student, four
  losses, AdamW, EMA);
- ``dagman_bf16_teacher`` (fp32 only): the DAGMaN step with only the teacher pass in bf16;
- ``dagman_fused``: the DAGMaN step with fused attention (``use_flash_attention``: the window and
  semantic attention through ``scaled_dot_product_attention`` where a fused kernel takes the pass);
- ``dagman_compiled``: the DAGMaN step with the student and teacher compiled (``compile``: inductor);
- ``dagman_fused_compiled``: both;
- ``dagman_adamw_fused``: the DAGMaN step with AdamW's fused kernel (``fused_optimizer``, the bundles'
  default) instead of its foreach kernel (the other arms, the step before the fused optimizer);
- ``dagman_compiled_adamw_fused``: compiled, with AdamW's fused kernel (``compile: true`` in a bundle);
- ``matmul``: a square matmul of the same dtype, the machine's practical peak.

The fused and compiled arms do the DAGMaN step's work, so their GFLOP/s use its FLOP count (the
counter cannot see inside compiled code); a compiled arm compiles during its warm-up steps (not
timed) and has no peak-memory figure (its first step is the compilation). ``--arms`` keeps only the
named arms (the backbone and matmul arms of each dtype are always kept: every rate is relative to them).

Each arm runs in fp32 and, where the device computes bf16 natively (AMX / AVX512-BF16 CPUs, CUDA),
in bf16 autocast. After discarded warm-up steps the arms are timed **interleaved**, one step of each
per round, and medians over the rounds are reported, so that load from other jobs on a shared
machine hits every arm alike. Reported per arm: median seconds per step, GFLOP/s (FLOPs from
``torch.utils.flop_counter``), that rate as a fraction of the bare backbone's of the same dtype and
of the matmul peak, and peak memory (the first step of the arm alone in a fresh process: CUDA max
allocated, or CPU RSS above the built arm's, sampled every 2 ms); then the DAGMaN / MIM time and FLOP ratios side by side,
the bf16 speed-up, and the share of the fp32 DAGMaN step in the teacher pass, the semantic-attention
block, the projection heads and the losses (forward ranges of ``torch.profiler``). The last line
printed is one JSON object.

Example::

    python scripts/benchmark_pretraining.py --roi 64 --batch 2 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from monai.networks.nets.swin_unetr import SwinTransformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dagman_components.engines import CoDistillationTrainer  # noqa: E402
from dagman_components.engines.co_distillation_trainer import autocast_settings, cpu_has_native_bf16  # noqa: E402
from dagman_components.handlers import ema_update  # noqa: E402
from dagman_components.losses import DAGMaNLoss, masked_l1  # noqa: E402
from dagman_components.masking import AttentionGuidedMasking, PatchDropout, upsample_mask  # noqa: E402
from dagman_components.networks import (  # noqa: E402
    DAGMaNPretrainNetwork,
    MaskedReconstructionNetwork,
    SwinDAGMaN,
    make_teacher,
)
from dagman_components.optim.optimizers import adamw  # noqa: E402
from dagman_components.optim.param_groups import param_groups_weight_decay  # noqa: E402

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


def encoder_kwargs(args, fused: bool = False) -> dict:
    return {"embed_dim": args.embed_dim, "depths": (2, 2, 8, 2), "num_heads": tuple(args.heads), "window_size": 4,
            "patch_size": 2, "drop_path_rate": 0.1, "use_flash_attention": fused}



Step = Callable[[dict], None]
#: The DAGMaN step's speed-up arms: (name, fused attention, compiled, AdamW's fused kernel).
VARIANTS = (("fused", True, False, False), ("compiled", False, True, False), ("fused_compiled", True, True, False),
            ("adamw_fused", False, False, True), ("compiled_adamw_fused", False, True, True))


def build_dagman(args, device: torch.device, amp: bool, teacher_amp: bool = False, fused: bool = False,
                 compile: bool = False, fused_optimizer: bool = False) -> Step:
    """One DAGMaN optimizer step (teacher pass, masks, student, losses, AdamW, EMA)."""
    student = DAGMaNPretrainNetwork(SwinDAGMaN(**encoder_kwargs(args, fused)), out_dim=args.out_dim).to(device)
    teacher = make_teacher(student)
    opt = adamw(param_groups_weight_decay(student), lr=1e-4, fused=fused_optimizer)
    trainer = CoDistillationTrainer(
        device=device, max_epochs=1, train_data_loader=[None], network=student, teacher=teacher, optimizer=opt,
        loss_function=DAGMaNLoss(args.out_dim).to(device), masking=AttentionGuidedMasking(),
        patch_dropout=PatchDropout(0.7), freeze_last_layer_iterations=0, amp=amp, amp_dtype="bfloat16"
        if device.type == "cpu" else "auto", teacher_amp=teacher_amp, diagnostics=False, seed=0, compile=compile,
    )
    trainer.scaler = torch.amp.GradScaler(device.type, enabled=trainer.amp and trainer.amp_dtype == torch.float16)
    trainer.state.epoch, trainer.state.iteration = 1, 1

    def step(batch: dict) -> None:
        trainer._iteration(trainer, batch)
        ema_update(teacher, student, 0.996)

    return step


def build_mim(args, device: torch.device, amp: bool) -> Step:
    """One SimMIM-like step: random masks on the SA grid, L1 reconstruction, AdamW."""
    net = MaskedReconstructionNetwork(SwinDAGMaN(**encoder_kwargs(args), sa_stage=None)).to(device)
    opt = adamw(param_groups_weight_decay(net), lr=1e-4, fused=False)  # the step before the fused optimizer
    masking = AttentionGuidedMasking("random").set_random_state(0)
    enc = net.encoder
    enabled, dtype = autocast_settings(device, amp, "bfloat16" if device.type == "cpu" else "auto")
    scaler = torch.amp.GradScaler(device.type, enabled=enabled and dtype == torch.float16)

    def step(batch: dict) -> None:
        x = torch.cat([batch["image"], batch["image_2"]])
        grid = [s // enc.sa_stride for s in x.shape[2:]]
        cells = masking(None, grid, batch_size=x.shape[0]).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=enabled):
            recon = net(x, mask=upsample_mask(cells, grid, enc.patches_per_sa_cell))
            loss = masked_l1(recon.float(), x, upsample_mask(cells, grid, enc.sa_stride))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def build_backbone(args, device: torch.device, amp: bool) -> Step:
    """Forward and backward of MONAI's bare ``SwinTransformer`` on both views (no optimizer)."""
    kwargs = encoder_kwargs(args)
    net = SwinTransformer(in_chans=1, embed_dim=kwargs["embed_dim"], window_size=(4, 4, 4), patch_size=(2, 2, 2),
                          depths=kwargs["depths"], num_heads=kwargs["num_heads"], drop_path_rate=0.1,
                          spatial_dims=3).to(device)
    enabled, dtype = autocast_settings(device, amp, "bfloat16" if device.type == "cpu" else "auto")

    def step(batch: dict) -> None:
        x = torch.cat([batch["image"], batch["image_2"]])
        with torch.autocast(device.type, dtype=dtype, enabled=enabled):
            loss = net(x)[-1].float().mean()
        net.zero_grad(set_to_none=True)
        loss.backward()

    return step


def build_matmul(args, device: torch.device, amp: bool) -> tuple[Step, float]:
    """A square matmul of the arm's dtype, and its FLOPs (2 n^3)."""
    n = args.matmul_size
    dtype = torch.bfloat16 if amp else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))

    def step(batch: dict) -> None:
        torch.mm(a, b)

    return step, 2.0 * n**3


def time_once(step: Step, batch: dict, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    step(batch)
    sync(device)
    return time.perf_counter() - t0


def interleaved_times(steps: dict[str, Step], batch: dict, device: torch.device, warmup: int,
                      rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each arm in every round, the arms timed one step each per round, in turn."""
    for _ in range(warmup):
        for step in steps.values():
            step(batch)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        for name, step in steps.items():
            times[name].append(time_once(step, batch, device))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), flush=True)
    return times


def build_arms(args, device: torch.device, dtypes: list[str], only: str | None = None) -> tuple[dict[str, Step], dict[str, float]]:
    """The benchmark's arms (or only the one named ``only``) and the matmul FLOPs."""
    builders: dict[str, Callable[[], Step]] = {}
    for d in dtypes:
        amp = d == "bf16"
        builders[f"backbone_{d}"] = lambda amp=amp: build_backbone(args, device, amp)
        builders[f"mim_{d}"] = lambda amp=amp: build_mim(args, device, amp)
        builders[f"dagman_{d}"] = lambda amp=amp: build_dagman(args, device, amp)
        if d == "fp32" and bf16_available(device):
            builders["dagman_fp32_bf16_teacher"] = lambda: build_dagman(args, device, False, teacher_amp=True)
        for variant, fused, compile, fused_optimizer in VARIANTS:
            builders[f"dagman_{variant}_{d}"] = lambda amp=amp, f=fused, c=compile, o=fused_optimizer: build_dagman(
                args, device, amp, fused=f, compile=c, fused_optimizer=o)
        builders[f"matmul_{d}"] = lambda amp=amp: build_matmul(args, device, amp)
    steps, flops = {}, {}
    for name, build in builders.items():
        if only is not None and name != only:
            continue
        if only is None and args.arms and name not in args.arms and not name.startswith(("backbone_", "matmul_")):
            continue
        built = build()
        if name.startswith("matmul"):
            steps[name], flops[name] = built
        else:
            steps[name] = built
    return steps, flops


def peak_memory_mb(arm: str, argv: list[str]) -> float:
    """Peak memory of one step of ``arm``, measured in a fresh process (CPU RSS cannot be told apart
    between arms that share a process)."""
    out = subprocess.run([sys.executable, __file__, *argv, "--memory-of", arm], check=True, capture_output=True,
                         text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["peak_mb"])


def flops_of(step: Step, batch: dict) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(batch)
    return float(counter.get_total_flops())


def component_shares(step: Step, batch: dict, device: torch.device) -> dict[str, float]:
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


def base_arm(name: str) -> str:
    """The arm whose FLOPs an arm does: ``dagman_<dtype>`` for the speed-up arms, else the arm itself."""
    for variant, *_ in VARIANTS:
        if name.startswith(f"dagman_{variant}_"):
            return "dagman_" + name.rsplit("_", 1)[1]
    return name


def top_ops(step: Step, batch: dict, device: torch.device, n: int) -> list[list]:
    """The ``n`` operators with the most self time in one step, as ``[name, share of the summed self time]``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step(batch)
        sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if not e.key.startswith(("dagman/", "ProfilerStep"))]
    total = sum(getattr(e, attr) for e in events) or 1.0
    ranked = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:n]
    return [[e.key, round(getattr(e, attr) / total, 3)] for e in ranked]


def bf16_available(device: torch.device) -> bool:
    return device.type == "cuda" or cpu_has_native_bf16()


def plot_step_times(result: dict, path: Path) -> None:
    """Draw each arm's median s/step (bars; the range over the rounds where the result has it), one
    panel per dtype, each bar labelled with its speed-up over today's DAGMaN step of that dtype."""
    from dagman_components.visualize.backend import pyplot
    from dagman_components.visualize.heatmap import save_figure_atomic

    arms = [k[: -len("_step_s")] for k in result if k.endswith("_step_s") and not k.startswith("matmul")]
    dtypes = [d for d in ("fp32", "bf16") if any(a.endswith(d) for a in arms)]
    if not dtypes:
        raise SystemExit("the result has no timed arms to draw")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.0 * len(dtypes), 4.2), dpi=120, squeeze=False)
    for ax, d in zip(axes[0], dtypes):
        names = [a for a in arms if a.endswith(d)]
        medians = [result[f"{a}_step_s"] for a in names]
        rounds = [result.get(f"{a}_rounds_s") for a in names]
        low = [m - min(r) if r else 0.0 for m, r in zip(medians, rounds)]
        high = [max(r) - m if r else 0.0 for m, r in zip(medians, rounds)]
        colours = ["0.6" if a.startswith("backbone") else "tab:blue" if a == f"dagman_{d}" else "tab:orange" for a in names]
        ax.barh(range(len(names)), medians, xerr=[low, high], color=colours, capsize=3)
        base = result.get(f"dagman_{d}_step_s")
        for i, (a, m) in enumerate(zip(names, medians)):
            if base and a.startswith("dagman_"):
                ax.text(m, i, f"  {base / m:.2f}x", va="bottom", fontsize=8)
        ax.set_yticks(range(len(names)), [a[: -len(d) - 1] for a in names], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("s / step (median; bars: range over rounds)")
        ax.set_title(f"{d}: speed-up over today's DAGMaN step")
    fig.suptitle(f"{result.get('device', '')}, ROI {result.get('roi')}, batch {result.get('batch')}, "
                 f"embed {result.get('embed_dim')}, {result.get('rounds')} interleaved rounds", fontsize=9)
    fig.tight_layout()
    save_figure_atomic(fig, path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--roi", type=int, default=64, help="cubic view size, divisible by 32")
    p.add_argument("--batch", type=int, default=2, help="volumes per step (two views each)")
    p.add_argument("--embed-dim", type=int, default=48)
    p.add_argument("--heads", type=int, nargs=4, default=(3, 6, 12, 24))
    p.add_argument("--out-dim", type=int, default=8192, help="prototypes K of the projection heads")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (one step of every arm each)")
    p.add_argument("--warmup", type=int, default=1, help="discarded steps of every arm before timing")
    p.add_argument("--dtypes", nargs="+", default=("fp32", "bf16"), choices=("fp32", "bf16"),
                   help="bf16 is skipped where the device has no native bf16")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--arms", nargs="+", default=None,
                   help="keep only these arms (e.g. dagman_bf16 dagman_fused_bf16); backbone and matmul always run")
    p.add_argument("--top-ops", type=int, default=8, help="profile every DAGMaN arm once: its N heaviest operators")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the per-arm peak memory processes")
    p.add_argument("--figure", type=Path, default=None, help="write a PNG of each arm's s/step to this path")
    p.add_argument("--plot-only", type=Path, default=None, metavar="JSON",
                   help="only draw --figure from a saved result (the last line this script printed)")
    p.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # internal: one arm's peak memory
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if args.plot_only:
        if args.figure is None:
            p.error("--plot-only needs --figure")
        try:
            saved = json.loads(args.plot_only.read_text().strip().splitlines()[-1])
        except (OSError, ValueError, IndexError) as err:
            raise SystemExit(f"--plot-only {args.plot_only}: not a result of this script ({err})") from err
        plot_step_times(saved, args.figure)
        return saved
    if args.roi % 32:
        p.error(f"--roi {args.roi} is not divisible by 32")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    shape = (args.batch, 1, args.roi, args.roi, args.roi)
    batch = {"image": torch.rand(shape, device=device), "image_2": torch.rand(shape, device=device)}
    dtypes = [d for d in args.dtypes if d == "fp32" or bf16_available(device)]

    if args.memory_of:
        steps, _ = build_arms(args, device, dtypes, only=args.memory_of)
        with PeakMemory(device) as mem:
            steps[args.memory_of](batch)
        print(json.dumps({"peak_mb": mem.peak}))
        return {"peak_mb": mem.peak}
    steps, flops = build_arms(args, device, dtypes)
    for name, step in steps.items():
        if not name.startswith("matmul") and base_arm(name) == name:
            flops[name] = flops_of(step, batch)
    for name in steps:  # a speed-up arm does the DAGMaN step's work (FLOPs cannot be counted in compiled code)
        if base_arm(name) != name:
            flops[name] = flops[base_arm(name)] if base_arm(name) in flops else flops_of(
                build_arms(args, device, dtypes, only=base_arm(name))[0][base_arm(name)], batch)
    round_times = interleaved_times(steps, batch, device, args.warmup, args.rounds)
    seconds = {name: statistics.median(t) for name, t in round_times.items()}
    memory = {name: peak_memory_mb(name, argv) if args.memory and "compiled" not in name else float("nan")
              for name in steps if not name.startswith("matmul")}
    shares = component_shares(steps["dagman_fp32"], batch, device) if "dagman_fp32" in steps else {}
    profiled = [name for name in steps if name.startswith("dagman_") and name.endswith(tuple(dtypes))
                and name != "dagman_fp32_bf16_teacher"]
    top = {name: top_ops(steps[name], batch, device, args.top_ops) for name in profiled} if args.top_ops else {}

    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "roi": args.roi, "batch": args.batch, "embed_dim": args.embed_dim, "out_dim": args.out_dim,
        "rounds": args.rounds, "torch": torch.__version__, "timing": "interleaved medians",
    }
    for name in steps:
        d = "bf16" if name.endswith("bf16") else "fp32"
        gflops = flops[name] / 1e9 / seconds[name]
        result[f"{name}_step_s"] = round(seconds[name], 4)
        result[f"{name}_rounds_s"] = [round(t, 4) for t in round_times[name]]
        result[f"{name}_gflop_per_s"] = round(gflops, 2)
        if not name.startswith("matmul"):
            result[f"{name}_gflop"] = round(flops[name] / 1e9, 2)
            result[f"{name}_peak_mb"] = round(memory[name], 1)
            result[f"{name}_of_backbone"] = round(gflops / (flops[f"backbone_{d}"] / 1e9 / seconds[f"backbone_{d}"]), 3)
            result[f"{name}_of_matmul_peak"] = round(gflops / (flops[f"matmul_{d}"] / 1e9 / seconds[f"matmul_{d}"]), 3)
    for d in (d for d in dtypes if f"mim_{d}" in steps and f"dagman_{d}" in steps):
        result[f"time_ratio_dagman_mim_{d}"] = round(seconds[f"dagman_{d}"] / seconds[f"mim_{d}"], 3)
        result[f"flop_ratio_dagman_mim_{d}"] = round(flops[f"dagman_{d}"] / flops[f"mim_{d}"], 3)
    if "dagman_fp32_bf16_teacher" in steps and "mim_fp32" in steps:
        result["time_ratio_dagman_bf16_teacher_mim_fp32"] = round(seconds["dagman_fp32_bf16_teacher"] / seconds["mim_fp32"], 3)
    if "dagman_bf16" in steps and "dagman_fp32" in steps:
        result["bf16_speedup_dagman"] = round(seconds["dagman_fp32"] / seconds["dagman_bf16"], 3)
    for d in dtypes:
        for variant, *_ in VARIANTS:
            if f"dagman_{variant}_{d}" in steps:
                result[f"speedup_{variant}_{d}"] = round(seconds[f"dagman_{d}"] / seconds[f"dagman_{variant}_{d}"], 3) \
                    if f"dagman_{d}" in steps else None
    result.update({f"share_{k}": round(shares.get(k, 0.0), 3)
                   for k in ("teacher_pass", "semantic_attention", "projection_heads", "losses")})
    for name, ops in top.items():
        result[f"top_ops_{name}"] = ops
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")
    print(json.dumps(result))
    if args.figure:
        plot_step_times(result, args.figure)
    return result


if __name__ == "__main__":
    main()
