"""Check a MONAI bundle as the model zoo's pull-request checks do, and package it as a zip.

Usage (from any working directory)::

    python scripts/package_bundle.py bundles/<name> [--out dist] [--max-file-mb 25] [--overwrite] \
        [--large-file-url models/model.pt=https://...]
    python scripts/package_bundle.py bundles/<name> --check-only [--allow-missing-weights]

Prints the problems and exits 1 when the bundle fails the checks (or the zip exists already);
prints the zip's path on success. See dagman_components/bundle_tools/package.py and docs/sharing_bundles.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

if importlib.util.find_spec("dagman_components") is None:  # not installed: use the repository this script is in
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dagman_components.bundle_tools import package as bundle_tools  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle_dir", type=Path, help="the bundle folder, e.g. bundles/<name>")
    parser.add_argument("--out", type=Path, default=Path("dist"), help="folder for the zip (default: dist)")
    parser.add_argument(
        "--max-file-mb", type=float, default=25.0, help="larger files go to large_files.yml (default: 25, as the zoo)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing zip")
    parser.add_argument("--check-only", action="store_true", help="run the checks, write nothing")
    parser.add_argument(
        "--allow-missing-weights",
        action="store_true",
        help="do not require models/model.pt for an inference config (weights come from a training run)",
    )
    parser.add_argument(
        "--large-file-url",
        action="append",
        default=[],
        metavar="PATH=URL",
        help="download url of a file over --max-file-mb (repeatable); one left without a url stops the packaging",
    )
    parser.add_argument("--schema", type=Path, default=None, help="metadata schema (default: the repository copy)")
    parser.add_argument(
        "--with-wheel",
        action="store_true",
        help="ship the dagman_components wheel in <bundle>/wheels/ (pip install it where this repository is absent)",
    )
    args = parser.parse_args(argv)
    if not args.max_file_mb > 0:
        parser.error(f"--max-file-mb must be positive, got {args.max_file_mb}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    require_weights = not args.allow_missing_weights
    urls = dict(item.split("=", 1) for item in args.large_file_url if "=" in item)
    if len(urls) != len(args.large_file_url):
        parser.error(f"--large-file-url takes PATH=URL, got {args.large_file_url}")

    if args.check_only:
        problems = bundle_tools.check_bundle(args.bundle_dir, schema_path=args.schema, require_weights=require_weights)
        if problems:
            print(f"{args.bundle_dir}: {len(problems)} problem(s)", file=sys.stderr)
            for problem in problems:
                print(f"  - {problem}", file=sys.stderr)
            return 1
        print(f"{args.bundle_dir}: OK")
        return 0
    try:
        zip_path = bundle_tools.package_bundle(
            args.bundle_dir,
            args.out,
            args.max_file_mb,
            overwrite=args.overwrite,
            require_weights=require_weights,
            schema_path=args.schema,
            large_file_urls=urls,
            with_wheel=args.with_wheel,
        )
    except bundle_tools.BundleCheckError as e:
        print(f"{args.bundle_dir}: {len(e.problems)} problem(s)", file=sys.stderr)
        for problem in e.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    except (FileExistsError, FileNotFoundError, RuntimeError, bundle_tools.LargeFileUrlError) as e:
        print(e, file=sys.stderr)
        return 1
    print(zip_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
