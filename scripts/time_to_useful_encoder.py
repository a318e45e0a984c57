#!/usr/bin/env python
# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Time to a useful encoder: when did each pretraining run's in-loop probe first beat random init by a margin?

Reads the probe history (``runs/probe_auc.csv``, written by the pretraining bundle with ``configs/probe.yaml``)
of each run and reports, per run, the wall time (``wall_s``: training, data loading and earlier probes
included) and the iteration at which the [CLS] probe first exceeded its iteration-0 value (the
random-initialised encoder) by ``--margin``. Writes a PNG (probe AUC against wall minutes, one line per run,
each run's threshold dashed) and a Markdown table.

Example::

    python scripts/time_to_useful_encoder.py --run recipe=/scratch/recipe --run smit=/scratch/smit \\
        --output docs/results_data/time_to_useful
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from dagman_components.atomic import atomic_write_text
from dagman_components.handlers.probe import first_useful_probe
from dagman_components.visualize.backend import pyplot
from dagman_components.visualize.heatmap import save_figure_atomic


def read_history(run_dir: Path, token: str) -> tuple[list[int], list[float], list[float]]:
    """Iterations, wall seconds and AUCs of one run's probe CSV.

    Raises:
        SystemExit: the CSV is missing or has no ``wall_s`` column (the message names the file).
    """
    path = run_dir / "runs" / "probe_auc.csv"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: run the pretraining bundle with configs/probe.yaml into {run_dir}.")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "wall_s" not in rows[0] or f"auc_{token}" not in rows[0]:
        raise SystemExit(f"{path} has no wall_s or auc_{token} column (a run made before the probe recorded wall time).")
    return ([int(r["iteration"]) for r in rows], [float(r["wall_s"]) for r in rows],
            [float(r[f"auc_{token}"]) for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, metavar="NAME=BUNDLE_ROOT",
                        help="a pretraining run (its bundle_root); repeat")
    parser.add_argument("--output", required=True, type=Path, help="folder for time_to_useful.png and .md")
    parser.add_argument("--token", default="cls", choices=["cls", "global"])
    parser.add_argument("--margin", type=float, default=0.05, help="AUC above the iteration-0 probe")
    args = parser.parse_args(argv)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    lines = ["| run | probe AUC at init | final | first +{:.2f} at iteration | wall time |".format(args.margin),
             "|---|---|---|---|---|"]
    for n, spec in enumerate(args.run):
        name, sep, root = spec.partition("=")
        if not sep:
            parser.error(f"--run expects NAME=BUNDLE_ROOT, got {spec!r}")
        its, walls, aucs = read_history(Path(root), args.token)
        useful = first_useful_probe(its, walls, aucs, args.margin)
        colour = f"C{n}"
        ax.plot([w / 60 for w in walls], aucs, marker="o", ms=3, color=colour, label=name)
        ax.axhline(aucs[0] + args.margin, color=colour, ls="--", lw=0.8, alpha=0.7)
        if useful is not None:
            ax.axvline(useful[1] / 60, color=colour, ls=":", lw=0.8)
        when = f"{useful[0]}" if useful else "not reached"
        wall = f"{useful[1] / 60:.1f} min" if useful else f"> {walls[-1] / 60:.1f} min"
        lines.append(f"| {name} | {aucs[0]:.3f} | {aucs[-1]:.3f} | {when} | {wall} |")
    ax.set_xlabel("wall time (min)")
    ax.set_ylabel(f"in-loop probe ROC AUC ({args.token})")
    ax.set_title(f"Time to a useful encoder: first probe {args.margin:+.2f} above random init (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.output.mkdir(parents=True, exist_ok=True)
    save_figure_atomic(fig, args.output / "time_to_useful.png")
    atomic_write_text("\n".join(lines) + "\n", args.output / "time_to_useful.md")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
