"""Write (or check) each bundle's ``configs/inference.json`` from its YAML configs.

The YAML files are the one source (they carry the comments); ``monai.bundle.load`` reads only
``configs/<workflow_type>.json``, so each bundle also ships ``inference.json``: the content of its
inference YAML merged as ``monai.bundle run`` merges a list of config files (for the classification
bundle, ``infer.yaml`` onto ``train.yaml``: its inference config). ``--check`` fails when a
shipped JSON differs from what its YAML gives (the test suite runs it).

Usage (from any working directory)::

    python scripts/export_json_configs.py            # write bundles/*/configs/inference.json
    python scripts/export_json_configs.py --check    # exit 1, naming the stale files, when one differs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
#: The JSON configs each bundle ships, and the YAML files (in ``configs/``) each is merged from, in order.
DEFAULT_SOURCES: dict[str, list[str]] = {"inference.json": ["inference.yaml"]}
SOURCES: dict[str, dict[str, list[str]]] = {
    "dagman_lung_nodule_ct_classification": {"inference.json": ["train.yaml", "infer.yaml"]},
}


def json_sources(bundle: Path) -> dict[str, list[str]]:
    """The JSON configs of ``bundle`` and their YAML sources."""
    return SOURCES.get(bundle.name, DEFAULT_SOURCES)


def merged_config(bundle: Path, sources: list[str]) -> dict:
    """The content of the YAML files merged as ``monai.bundle run --config_file "[...]"`` merges them."""
    return ConfigParser.load_config_files([str(bundle / "configs" / name) for name in sources])


def render(config: dict) -> str:
    """The JSON text written for ``config`` (4-space indent, key order kept, final newline)."""
    return json.dumps(config, indent=4) + "\n"


def export(bundles: list[Path], check: bool) -> list[str]:
    """Write, or with ``check`` compare, every bundle's JSON configs.

    Returns:
        The stale or missing JSON files (``check``), or those written.
    """
    changed = []
    for bundle in bundles:
        for json_name, sources in json_sources(bundle).items():
            target = bundle / "configs" / json_name
            text = render(merged_config(bundle, sources))
            current = target.read_text(encoding="utf-8") if target.is_file() else None
            if current == text:
                continue
            changed.append(str(target))
            if not check:
                target.write_text(text, encoding="utf-8")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="*", type=Path, help="bundle folders (default: every folder in bundles/)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a JSON config is stale")
    args = parser.parse_args(argv)
    bundles = args.bundles or sorted(p for p in BUNDLES.iterdir() if (p / "configs" / "metadata.json").is_file())
    changed = export(bundles, args.check)
    if args.check and changed:
        print("stale JSON configs (run python scripts/export_json_configs.py):", *changed, sep="\n  ", file=sys.stderr)
        return 1
    for path in changed:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
