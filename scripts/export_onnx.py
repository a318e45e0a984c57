"""Export a bundle's network to ONNX (``monai.bundle onnx_export``, trace mode), check it against eager PyTorch
with onnxruntime, and time both on the CPU.

Usage (from any working directory; needs the deploy extra, ``pip install -e .[deploy]``)::

    python scripts/export_onnx.py bundles/<name> [--filepath models/model.onnx] [--input_shape "[1,1,32,32,32]"] \
        [--image <CT file> --repeats 5] [--threads 1]

Writes ``<bundle>/models/model.onnx`` (an output: packaging leaves it out) and prints one JSON line: the file,
the largest difference between the two networks' outputs on ``--checks`` seeded random inputs of the export
shape, and the median seconds per call of each (interleaved, ``--repeats`` rounds). With ``--image``, one case
also runs through the bundle's own preprocessing and inferer (the segmentation bundle's sliding window) with
both networks: the seconds per case, the largest output difference and, for a segmentation, the voxels whose
argmax mask differs and how many of them sit where the eager foreground probability is 0.5 +/- 1e-3.
Exit status 1 with one line on a bad request (a missing extra, a shape the Swin grid cannot take, no weights).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

if importlib.util.find_spec("dagman_components") is None:  # not installed: use the repository this script is in
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dagman_components.bundle_tools import deploy  # noqa: E402
from dagman_components.errors import ConfigValueError  # noqa: E402


def _interleaved(calls: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each call, the calls alternating within every round (noisy shared machines)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(t), 4) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="the bundle folder, with models/model.pt")
    parser.add_argument("--filepath", type=Path, default=None, help="the ONNX file (default: models/model.onnx)")
    parser.add_argument("--input_shape", type=json.loads, default=None,
                        help='export shape, e.g. "[1,1,32,32,32]" (default: the metadata input shape)')
    parser.add_argument("--checks", type=int, default=3, help="seeded random inputs compared (default 3)")
    parser.add_argument("--image", type=Path, default=None, help="one case through the bundle's preprocessing and inferer")
    parser.add_argument("--repeats", type=int, default=5, help="timing rounds (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of both torch and onnxruntime (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        path = deploy.export_onnx(args.bundle, args.filepath, args.input_shape)
    except (deploy.DeployExtraMissingError, ConfigValueError, FileNotFoundError) as err:
        print(f"{args.bundle}: {err}", file=sys.stderr)
        return 1
    eager, exported = deploy.bundle_network(args.bundle), deploy.OnnxNetwork(path, threads=args.threads)
    shape = exported.input_shape
    inputs = [torch.rand(shape, generator=torch.Generator().manual_seed(i)) for i in range(args.checks)]
    with torch.no_grad():
        difference = max(float((eager(x) - exported(x)).abs().max()) for x in inputs)
        result = {"onnx": str(path), "input_shape": shape, "max_abs_difference": difference,
                  "seconds_per_call": _interleaved({"eager": lambda: eager(inputs[0]), "onnxruntime": lambda: exported(inputs[0])},
                                                   args.repeats),
                  "threads": args.threads}
        if args.image is not None:
            image, inferer = deploy.bundle_case(args.bundle, args.image)
            out_eager, out_onnx = inferer(image, eager), inferer(image, exported)
            result["case"] = {"image": str(args.image), "shape": list(image.shape),
                              "max_abs_difference": float((out_eager - out_onnx).abs().max())}
            if out_eager.ndim == 5 and out_eager.shape[1] > 1:  # segmentation logits: compare the masks
                p_eager = torch.softmax(out_eager, 1)
                differ = out_eager.argmax(1) != out_onnx.argmax(1)
                near_half = (p_eager[:, 1:].max(1).values - 0.5).abs() <= 1e-3
                result["case"].update(mask_voxels=int(differ.numel()), mask_voxels_differing=int(differ.sum()),
                                      differing_outside_0_5_band=int((differ & ~near_half).sum()))
            result["case"]["seconds_per_case"] = _interleaved(
                {"eager": lambda: inferer(image, eager), "onnxruntime": lambda: inferer(image, exported)}, args.repeats)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
