#!/usr/bin/env python
"""Time a few iterations of a real pretraining config and estimate how long the whole run would take.

The pretraining bundle's config is parsed as ``monai.bundle run`` would parse it (same files, same
``--key value`` overrides, same ``initialize`` checks), then its trainer runs ``--iterations``
optimizer steps with only the handlers a step needs (teacher EMA, lr schedule): no checkpoint is read
or written, nothing is logged to ``bundle_root``, so a dry run never touches an existing run. The first
step is a discarded warm-up. Printed: median seconds per optimizer step, samples per second, peak
memory (CUDA max allocated, or the process's peak RSS), and the estimated time of ``max_epochs``
epochs on this data (optimizer steps only: caching, checkpoints, plots and probes come on top). Data
are not cached (``cache_rate`` 0) unless ``--cache_rate`` is given. The last line is one JSON object.

``--variants`` runs the same config once per named variant, each in its own process under a
``--timeout``, and prints one row per variant (then one JSON list): ``plain``, ``fused``
(``use_flash_attention``), ``compiled`` (``compile``), ``fused_compiled`` and ``checkpointing``
(``use_checkpoint``). This is the command that fills the GPU column of the pretraining README's
throughput table (bf16 AMP is the config's ``amp``, on by default)::

    python scripts/dry_run_pretraining.py --variants plain fused compiled fused_compiled checkpointing --timeout 900 \
        --iterations 3 --config_file bundles/dagman_ct_pretraining/configs/train.yaml --bundle_root /tmp/dry \
        --dataset_dir bundles/dagman_ct_pretraining/configs/demo_datalist.json --device cuda --num_workers 0 \
        --spacing "[1.0,1.0,1.0]" --roi_size "[128,128,128]"

Example::

    python scripts/dry_run_pretraining.py --iterations 5 \\
        --config_file "['bundles/dagman_ct_pretraining/configs/train.yaml','bundles/dagman_ct_pretraining/configs/small_cpu.yaml']" \\
        --bundle_root bundles/dagman_ct_pretraining --dataset_dir /data/ct_crops
"""

from __future__ import annotations

import argparse
import ast
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
STEP_HANDLERS = ("TeacherEMAHandler", "OptimizerSchedule")
#: The speed options a dry run compares (``--variants``), as config overrides.
VARIANTS = {
    "plain": {},
    "fused": {"use_flash_attention": True},
    "compiled": {"compile": True},
    "fused_compiled": {"use_flash_attention": True, "compile": True},
    "checkpointing": {"use_checkpoint": True},
}


def parse_overrides(pairs: list[str]) -> dict:
    """``--key value`` pairs as ``monai.bundle run`` takes them (values as Python literals when they parse)."""
    if len(pairs) % 2:
        raise SystemExit(f"overrides come as --key value pairs, got {pairs}")
    out = {}
    for key, value in zip(pairs[::2], pairs[1::2]):
        if not key.startswith("--"):
            raise SystemExit(f"expected --key before {value!r}, got {key!r}")
        try:
            out[key[2:]] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key[2:]] = value
    return out


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dry_run(config_files: list[str], overrides: dict, iterations: int) -> dict:
    """Run ``iterations`` timed optimizer steps (after one warm-up step) of a pretraining config.

    Args:
        config_files: the bundle config files, in order.
        overrides: config ids and values, as on the ``monai.bundle run`` command line.
        iterations: timed optimizer steps.

    Returns:
        The measured and estimated figures (see the module docstring).

    Raises:
        SystemExit: for fewer than one iteration.
    """
    if iterations < 1:
        raise SystemExit(f"--iterations must be >= 1, got {iterations}")
    parser = ConfigParser()
    parser.read_config(config_files)
    parser.update({"cache_rate": 0.0, **overrides})  # no need to cache the whole data set for a few steps
    # the checks of initialize, without the training lock: a dry run may run beside a live run
    parser["initialize"] = [step for step in parser.get("initialize", []) if "training_lock" not in str(step)]
    parser.get_parsed_content("initialize")
    handlers = [h for h in parser.get("train#common_handlers") if isinstance(h, dict)
                and str(h.get("_target_", "")).rsplit(".", 1)[-1] in STEP_HANDLERS]
    parser["train#handlers"] = handlers
    trainer = parser.get_parsed_content("train#trainer")
    device = trainer.state.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    clock = {"t": 0.0}

    @trainer.on(Events.ITERATION_STARTED)
    def _start(engine) -> None:
        clock["t"] = time.perf_counter()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _stop(engine) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - clock["t"])
        print(f"step {len(times)}/{iterations + 1}: {times[-1]:.2f} s", flush=True)
        if len(times) > iterations:
            engine.terminate()

    trainer.run()
    step_s = statistics.median(times[1:])
    steps_per_epoch = int(parser.get_parsed_content("iterations_per_epoch"))
    max_epochs = int(parser.get_parsed_content("max_epochs"))
    samples = int(parser.get_parsed_content("batch_size")) * int(parser.get_parsed_content("accumulate_steps"))
    total_s = step_s * steps_per_epoch * max_epochs
    return {
        "device": str(device), "roi_size": list(parser.get_parsed_content("roi_size")),
        "batch_size": int(parser.get_parsed_content("batch_size")), "amp": bool(trainer.amp),
        "amp_dtype": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp else "float32",
        "use_flash_attention": bool(parser.get_parsed_content("use_flash_attention", default=False)),
        "compile": bool(parser.get_parsed_content("compile", default=False)),
        "use_checkpoint": bool(parser.get_parsed_content("use_checkpoint", default=False)),
        "timed_steps": iterations, "s_per_iteration": round(step_s, 3),
        "samples_per_s": round(samples / step_s, 3), "peak_memory_mb": round(peak_memory_mb(device), 1),
        "iterations_per_epoch": steps_per_epoch, "max_epochs": max_epochs,
        "estimated_hours": round(total_s / 3600, 2),
    }


def run_variants(variants: list[str], config_file: str, iterations: int, rest: list[str], timeout: float) -> list[dict]:
    """Dry-run the config once per variant, each in a fresh process with a time limit.

    Args:
        variants: names of :data:`VARIANTS`.
        config_file: as ``--config_file``.
        iterations: timed steps of each variant.
        rest: the ``--key value`` overrides shared by all variants.
        timeout: seconds each variant may take (compilation included); a variant over it is reported as such.

    Returns:
        One dict per variant: its name and the dry run's result, or ``error`` (the reason it has none).

    Raises:
        SystemExit: for an unknown variant.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown --variants {unknown}; known: {sorted(VARIANTS)}")
    rows = []
    for name in variants:
        overrides = [item for key, value in VARIANTS[name].items() for item in (f"--{key}", str(value))]
        command = [sys.executable, __file__, "--config_file", config_file, "--iterations", str(iterations), *rest,
                   *overrides]
        print(f"variant {name}: {' '.join(overrides) or 'config as it is'}", flush=True)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            rows.append({"variant": name, "error": f"over the {timeout:g} s timeout"})
            continue
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            last = [line.strip() for line in done.stderr.splitlines() if line.strip()][-2:] or ["no output"]
            rows.append({"variant": name, "error": f"exit {done.returncode}: {' | '.join(last)}"})
            continue
        rows.append({"variant": name, **json.loads(lines[-1])})
    for row in rows:
        print(f"{row['variant']:<15} " + (row["error"] if "error" in row else
              f"{row['s_per_iteration']} s/iteration, {row['samples_per_s']} samples/s, "
              f"peak {row['peak_memory_mb']} MB ({row['device']}, {row['amp_dtype']})"))
    print(json.dumps(rows))
    return rows


def main(argv: list[str] | None = None) -> dict | list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_file", required=True, help="a config file or a Python-style list of them")
    p.add_argument("--iterations", type=int, default=5, help="timed optimizer steps after one warm-up step")
    p.add_argument("--variants", nargs="+", default=None, help=f"run once per variant: {', '.join(VARIANTS)}")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds each variant may take (with --variants)")
    args, rest = p.parse_known_args(argv)
    if args.variants:
        return run_variants(args.variants, args.config_file, args.iterations, rest, args.timeout)
    files = ast.literal_eval(args.config_file) if args.config_file.startswith("[") else [args.config_file]
    result = dry_run(list(files), parse_overrides(rest), args.iterations)
    print(f"{result['s_per_iteration']} s per iteration, {result['samples_per_s']} samples/s, "
          f"peak memory {result['peak_memory_mb']} MB; {result['max_epochs']} epochs of "
          f"{result['iterations_per_epoch']} iterations would take about {result['estimated_hours']} h")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
