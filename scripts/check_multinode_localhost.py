#!/usr/bin/env python
"""Check multi-node DDP pretraining on one machine: two ``torchrun`` agents with ``--nnodes 2`` (one
process each, rendezvous on localhost, gloo on CPU) against one agent with two processes.

Both runs have the same global batch (2 processes x ``batch_size``), the same seed and the same data,
so the teacher encoder they write (``models/model.pt``) must be identical. The script prints the
largest absolute difference over all tensors and exits non-zero when it exceeds ``--atol``.

Example::

    python scripts/check_multinode_localhost.py --output /tmp/multinode
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "dagman_ct_pretraining"
TINY = ["--roi_size", "[32,32,32]", "--max_epochs", "2", "--embed_dim", "12", "--num_heads", "[3,3,3,3]",
        "--head_out_dim", "64", "--head_hidden_dim", "32", "--head_bottleneck_dim", "16", "--save_interval", "1",
        "--dataset_dir", str(BUNDLE / "configs" / "demo_datalist.json")]


def bundle_args(bundle_root: Path) -> list[str]:
    configs = [str(BUNDLE / "configs" / f) for f in ("train.yaml", "demo.yaml", "multi_gpu_train.yaml")]
    return ["-m", "monai.bundle", "run", "--config_file", str(configs), "--bundle_root", str(bundle_root), *TINY]


def run_single_node(root: Path, port: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}", *bundle_args(root)]
    subprocess.run(cmd, check=True, env=_env())


def run_two_nodes(root: Path, port: int) -> None:
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node_rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}",
               "--rdzv_id", "dagman-multinode-check", *bundle_args(root)]
        procs.append(subprocess.Popen(cmd, env=_env()))
        time.sleep(2)  # the rendezvous host (node 0) first
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a torchrun agent failed: exit codes {codes}")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def max_abs_difference(a: Path, b: Path) -> float:
    sa, sb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    if sa.keys() != sb.keys():
        raise SystemExit(f"{a} and {b} hold different tensors")
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, required=True, help="an empty or new folder for the two runs")
    p.add_argument("--port", type=int, default=29517)
    p.add_argument("--atol", type=float, default=0.0)
    args = p.parse_args(argv)
    single, multi = args.output / "one_node_two_processes", args.output / "two_nodes_one_process"
    for root in (single, multi):
        if (root / "models" / "checkpoint.pt").exists():
            raise SystemExit(f"{root} already holds a run; give an empty --output")
        root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run_single_node(single, args.port)
    t1 = time.perf_counter()
    run_two_nodes(multi, args.port + 1)
    t2 = time.perf_counter()
    diff = max_abs_difference(single / "models" / "model.pt", multi / "models" / "model.pt")
    print(f"one node x 2 processes: {t1 - t0:.0f} s; 2 nodes x 1 process: {t2 - t1:.0f} s; "
          f"max |difference| of model.pt: {diff:.3g}")
    if diff > args.atol:
        raise SystemExit(f"the two runs differ by {diff:.3g} > --atol {args.atol}")
    return diff


if __name__ == "__main__":
    main()
