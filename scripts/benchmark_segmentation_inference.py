#!/usr/bin/env python
"""Sliding-window inference speed of the segmentation bundle's network on a CT: window batch size and
bf16 on CPU.

The inference config (``inference.yaml``, with ``--key value`` overrides as on the ``monai.bundle run``
command line) gives the network (random weights: speed does not depend on them), the preprocessing
and the window settings. The CT is preprocessed once; its number of windows follows from MONAI's scan
(``roi_size``, ``sw_overlap``). Each arm (``sw_batch_size`` 1 and the config's, fp32 and, on a CPU with
native bf16 or on CUDA, bf16 autocast) then runs window batches of random windows, interleaved one
batch per arm per round after a warm-up, and the median seconds per window gives the network time of
the whole case (windows x seconds per window; the blending of overlapping windows, the
post-processing and the writing of the mask come on top). With ``--full_case`` the config's arm also
infers the whole case once through the bundle's inferer, for the measured total.
The last line printed is one JSON object.

Example::

    python scripts/benchmark_segmentation_inference.py --image data/totalseg_example/example_ct_sm.nii.gz
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.inferers.utils import _get_scan_interval

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from dry_run_pretraining import parse_overrides  # noqa: E402

from dagman_components.engines.co_distillation_trainer import cpu_has_native_bf16  # noqa: E402

CONFIG = REPO / "bundles" / "dagman_lung_tumor_ct_segmentation" / "configs" / "inference.yaml"


def number_of_windows(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    """Windows MONAI's sliding window visits on an image of spatial ``shape`` (padded up to ``roi``)."""
    padded = [max(s, r) for s, r in zip(shape, roi)]
    interval = _get_scan_interval(padded, roi, len(roi), (overlap,) * len(roi))
    return math.prod(int(math.ceil((s - r) / i)) + 1 if i > 0 else 1 for s, r, i in zip(padded, roi, interval))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default=str(REPO / "data" / "totalseg_example" / "example_ct_sm.nii.gz"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--full_case", action="store_true", help="also infer the whole case once with the config's arm")
    args, rest = p.parse_known_args(argv)
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser.update({"bundle_root": str(CONFIG.parents[1]), "dataset_dir": args.image, **parse_overrides(rest)})
    device = torch.device(parser.get_parsed_content("device"))
    roi = tuple(int(r) for r in parser.get_parsed_content("roi_size"))
    overlap = float(parser.get_parsed_content("sw_overlap"))
    sw = int(parser.get_parsed_content("sw_batch_size"))
    network = parser.get_parsed_content("network_def").to(device).eval()
    item = parser.get_parsed_content("preprocessing")({"image": args.image})
    image = item["image"].as_tensor().unsqueeze(0).to(device) if hasattr(item["image"], "as_tensor") \
        else item["image"].unsqueeze(0).to(device)
    windows = number_of_windows(tuple(image.shape[2:]), roi, overlap)
    bf16 = device.type == "cuda" or cpu_has_native_bf16()
    arms = {"sw1_fp32": (1, False), f"sw{sw}_fp32": (sw, False)}
    if bf16:
        arms[f"sw{sw}_bf16"] = (sw, True)
    batches = {name: torch.rand(n, 1, *roi, device=device) for name, (n, _) in arms.items()}

    @torch.inference_mode()
    def run(name: str) -> float:
        n, use_bf16 = arms[name]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            network(batches[name])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / n

    for name in arms:
        run(name)  # warm-up
    per_window: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(args.rounds):
        for name in arms:
            per_window[name].append(run(name))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.3f} s/window" for k, v in per_window.items()),
              flush=True)
    result: dict = {"image": Path(args.image).name, "device": str(device), "preprocessed_shape": list(image.shape[2:]),
                    "roi_size": list(roi), "overlap": overlap, "windows": windows, "rounds": args.rounds}
    base = statistics.median(per_window["sw1_fp32"])
    for name, times in per_window.items():
        s = statistics.median(times)
        result[f"{name}_s_per_window"] = round(s, 4)
        result[f"{name}_network_s_per_case"] = round(s * windows, 1)
        result[f"{name}_speedup"] = round(base / s, 2)
    if args.full_case:
        inferer = parser.get_parsed_content("inferer")
        t0 = time.perf_counter()
        with torch.inference_mode():
            inferer(image, network)
        result["full_case_s"] = round(time.perf_counter() - t0, 1)
        result["full_case_bf16"] = bool(getattr(inferer, "active_for", lambda x: False)(image))
    for k, v in result.items():
        print(f"{k:<28} {v}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
