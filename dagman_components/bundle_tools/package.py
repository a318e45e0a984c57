"""Check a MONAI bundle the way the model zoo's pull-request checks do, and package it as a zip.

The checks follow what ``Project-MONAI/model-zoo`` verifies for a bundle (``ci/verify_bundle.py``
and its contributing guide): a non-empty ``LICENSE``; ``configs/metadata.json`` that is valid JSON
and valid against the bundle metadata schema; ``version`` listed in ``changelog``; a
``docs/README.md``; config files that parse; the weights an inference config needs; and a
``large_files.yml`` (``.yaml``/``.json``) whose entries say where each large file is downloaded from.

``package_bundle`` writes ``<out_dir>/<bundle_name>_v<version>.zip`` (the zoo's release naming) with
the bundle folder as its single top-level folder. What it leaves out, and why:

* ``__pycache__`` and hidden folders anywhere; ``eval/``, ``runs/``, ``logs/``, ``log/``,
  ``mlruns/`` at the bundle root (training and evaluation outputs);
* hidden files (``.*``), ``*.tmp``, ``*.log``, ``*.pyc``/``*.pyo`` and editor backups ``*~``;
* everything under ``models/`` except the shipped weights, ``models/model.pt`` and
  ``models/model.ts``, the classifier's ``models/threshold.json`` (``keep_models``), and the ``model_card.json`` beside a kept ``.pt`` (the card
  :mod:`dagman_components.weights.encoder_io` builds the encoder from travels with its weights): training writes its checkpoints there
  (``checkpoint_*.pt``, ``model_key_metric=*.pt``, optimiser states) and they are not part of a release;
* any file larger than ``max_file_mb`` (the zoo's limit is 25 MB per file), except the files
  the checks require (``LICENSE``, ``configs/*``, ``docs/README.md``): it is listed in
  ``large_files.yml`` with its sha256 and its download ``url`` (given to :func:`package_bundle`, or kept
  from the bundle's own ``large_files.*`` while the hash matches). An empty ``url`` is refused
  (:class:`LargeFileUrlError`), since the zoo's downloader fails on it (``unknown url type: ''``). The
  list is written inside the zip (``<bundle_name>/large_files.yml``, where
  ``monai.bundle.download_large_files`` looks for it) and next to the zip as
  ``<bundle_name>_v<version>_large_files.yml`` (prefixed so several bundles can share ``out_dir``).

Symbolic links to folders are not followed; symbolic links to files are packaged by content.

Example::

    from dagman_components.bundle_tools.package import check_bundle, package_bundle

    problems = check_bundle("bundles/dagman_pretrain", require_weights=False)
    zip_path = package_bundle("bundles/dagman_pretrain", "dist")
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import jsonschema
import yaml

from dagman_components.atomic import atomic_write_bytes, replace_atomically
from dagman_components.errors import DagmanError
from dagman_components.runtime.progress import progress
from dagman_components.weights.state_dict import file_hash

__all__ = [
    "DEFAULT_SCHEMA_PATH",
    "SCHEMA_URL",
    "BundleCheckError",
    "LargeFileUrlError",
    "bundle_files",
    "check_bundle",
    "package_bundle",
]

logger = logging.getLogger(__name__)

SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)
DEFAULT_SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "meta_schema_20240725.json"

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
INFERENCE_CONFIGS = tuple(f"configs/inference{suffix}" for suffix in CONFIG_SUFFIXES)
LARGE_FILES_NAMES = ("large_files.yml", "large_files.yaml", "large_files.json")
HASH_TYPES = ("md5", "sha1", "sha256", "sha512")  # what monai.apps.utils.check_hash accepts
KEEP_MODELS = ("model.pt", "model.ts", "threshold.json")  # threshold.json: the classifier's validation threshold
WHEELS_DIR = "wheels"  # the zip's folder for the dagman_components wheel (package_bundle(with_wheel=True))
MODEL_CARD_NAME = "model_card.json"  # dagman_components.weights.encoder_io.MODEL_CARD_NAME (not imported: it pulls in torch)
EXCLUDED_ROOT_DIRS = frozenset({"eval", "runs", "logs", "log", "mlruns"})
EXCLUDED_DIRS = frozenset({"__pycache__"})
EXCLUDED_FILE_PATTERNS = (".*", "*.tmp", "*.log", "*.pyc", "*.pyo", "*~")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_SNAKE_CASE = re.compile(r"^[a-z0-9]+(_[a-z0-9]+)*$")
_SAFE_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_CHUNK = 1 << 20
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed time stamps: the same bundle gives the same zip bytes


class BundleCheckError(DagmanError, ValueError):
    """A bundle failed :func:`check_bundle`; ``problems`` lists what is wrong, one string each."""

    def __init__(self, bundle_dir: str | os.PathLike, problems: Sequence[str]):
        self.bundle_dir = Path(bundle_dir)
        self.problems = list(problems)
        super().__init__(f"bundle {self.bundle_dir} has {len(self.problems)} problem(s):\n- " + "\n- ".join(problems))


class LargeFileUrlError(DagmanError, ValueError):
    """A file left out of the zip (over ``max_file_mb``) has no download url; ``paths`` names them."""

    def __init__(self, bundle_dir: str | os.PathLike, paths: Sequence[str], max_file_mb: float):
        self.paths = list(paths)
        super().__init__(
            f"{Path(bundle_dir).name}: {', '.join(self.paths)} over {max_file_mb:g} MB would be left out of the zip "
            f"without a download url, and the zoo's downloader rejects an empty url. Host the file(s) and pass "
            f"--large-file-url {self.paths[0]}=https://... (large_file_urls), or list them with their url in the "
            f"bundle's large_files.yml, or raise --max-file-mb to ship them in the zip."
        )


def _load_config(path: Path) -> object:
    with path.open(encoding="utf-8") as f:
        if path.suffix == ".json":
            return json.load(f)
        return yaml.safe_load(f)


def _check_metadata(metadata: object, schema_file: Path, problems: list[str]) -> None:
    where = "configs/metadata.json"
    if not isinstance(metadata, dict):
        problems.append(f"{where}: must hold a JSON object, got {type(metadata).__name__}")
        return
    schema = json.loads(schema_file.read_text(encoding="utf-8"))
    validator = jsonschema.validators.validator_for(schema)(schema)
    for error in sorted(validator.iter_errors(metadata), key=lambda e: [str(p) for p in e.absolute_path]):
        at = "/".join(str(p) for p in error.absolute_path) or "<top level>"
        problems.append(f"{where}: schema: {error.message} (at {at})")
    version = metadata.get("version")
    changelog = metadata.get("changelog")
    if not isinstance(changelog, dict):
        problems.append(f"{where}: 'changelog' is missing (the zoo requires it, keyed by version)")
    elif isinstance(version, str) and version not in changelog:
        problems.append(f"{where}: version {version!r} is not a key of 'changelog'")
    if isinstance(version, str) and not _SAFE_VERSION.match(version):
        problems.append(f"{where}: version {version!r} cannot be used in the zip name <name>_v<version>.zip")
    url = metadata.get("schema")
    if isinstance(url, str) and url.rsplit("/", 1)[-1] != schema_file.name:
        logger.warning("%s: 'schema' names %s but was checked against %s", where, url, schema_file)


def _read_large_files(bundle: Path, problems: list[str]) -> dict[str, dict]:
    """Entries of the bundle's large_files.* keyed by path; malformed content goes to ``problems``."""
    entries: dict[str, dict] = {}
    for name in LARGE_FILES_NAMES:
        path = bundle / name
        if not path.is_file():
            continue
        try:
            content = _load_config(path)
        except (ValueError, yaml.YAMLError) as e:
            problems.append(f"{name}: does not parse: {e}")
            continue
        items = content.get("large_files") if isinstance(content, dict) else None
        if not isinstance(items, list):
            problems.append(f"{name}: must hold a list under 'large_files'")
            continue
        for i, item in enumerate(items):
            rel = item.get("path") if isinstance(item, dict) else None
            if not isinstance(rel, str) or not rel:
                problems.append(f"{name}: entry {i} has no 'path'")
                continue
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                problems.append(f"{name}: path {rel!r} must be relative and inside the bundle")
            if not item.get("url"):
                problems.append(f"{name}: {rel} has no 'url' (host the file and fill it in)")
            if item.get("hash_type") and item["hash_type"] not in HASH_TYPES:
                problems.append(f"{name}: {rel} has hash_type {item['hash_type']!r}, expected one of {HASH_TYPES}")
            entries[rel] = item
    return entries


def check_bundle(
    bundle_dir: str | os.PathLike, schema_path: str | os.PathLike | None = None, require_weights: bool = True
) -> list[str]:
    """Check a bundle folder as the MONAI model zoo's pull-request checks would.

    Args:
        bundle_dir: the bundle folder (its name is the bundle name).
        schema_path: the metadata JSON schema; defaults to the repository copy of
            ``meta_schema_20240725.json`` (:data:`DEFAULT_SCHEMA_PATH`).
        require_weights: when True, a bundle with ``configs/inference.{json,yaml,yml}`` needs
            ``models/model.pt``, present or listed in ``large_files.yml``. Pass False for a bundle
            whose weights a training run produces.

    Returns:
        the problems found, each ``"<file>: <what is wrong>"``; empty when the bundle passes.
        Naming issues that the zoo tolerates (a folder name not in lower snake_case, or not
        matching ``metadata["name"]``) are logged as warnings, not returned.

    Example::

        >>> check_bundle("bundles/does_not_exist")
        ['bundles/does_not_exist: not a folder']
    """
    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        return [f"{bundle_dir}: not a folder"]
    problems: list[str] = []
    name = bundle.resolve().name
    if not _SAFE_NAME.match(name):
        problems.append(f"{name}: the bundle folder name may only hold letters, digits and '_'")
    elif not _SNAKE_CASE.match(name):
        logger.warning("%s: the zoo names bundles in lower snake_case", name)

    license_file = bundle / "LICENSE"
    if not license_file.is_file():
        problems.append("LICENSE: missing")
    elif not license_file.read_text(encoding="utf-8", errors="replace").strip():
        problems.append("LICENSE: empty")
    readme = bundle / "docs" / "README.md"
    if not readme.is_file():
        problems.append("docs/README.md: missing")

    configs = bundle / "configs"
    meta_path = configs / "metadata.json"
    if not meta_path.is_file():
        problems.append("configs/metadata.json: missing")
    for path in sorted(configs.rglob("*")) if configs.is_dir() else []:
        if path.suffix not in CONFIG_SUFFIXES or not path.is_file():
            continue
        rel = path.relative_to(bundle).as_posix()
        try:
            content = _load_config(path)
        except (ValueError, yaml.YAMLError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            problems.append(f"{rel}: does not parse: {e}")
            continue
        if path == meta_path:
            _check_metadata(content, Path(schema_path or DEFAULT_SCHEMA_PATH), problems)
            meta_name = content.get("name") if isinstance(content, dict) else None
            if not isinstance(meta_name, str):
                logger.warning("configs/metadata.json: no 'name' (the zoo's model browser shows it)")
            elif meta_name.lower().replace(" ", "_") != name:
                logger.warning("%s: folder name differs from metadata name %r", name, meta_name)

    large_files = _read_large_files(bundle, problems)
    inference = [c for c in INFERENCE_CONFIGS if (bundle / c).is_file()]
    if require_weights and inference and not (bundle / "models" / "model.pt").is_file():
        if "models/model.pt" not in large_files:
            problems.append(f"models/model.pt: missing ({inference[0]} needs weights; or list it in large_files.yml)")
    return problems


def _with_cards(keep_models: Sequence[str]) -> set[str]:
    """``keep_models`` plus the model card beside each kept ``.pt`` (its settings travel with the weights)."""
    cards = {Path(m).with_name(MODEL_CARD_NAME).as_posix() for m in keep_models if m.endswith(".pt")}
    return set(keep_models) | cards


def _excluded(rel: Path, keep_models: Sequence[str]) -> bool:
    parts = rel.parts
    if parts[0] in EXCLUDED_ROOT_DIRS and len(parts) > 1:
        return True
    if any(p in EXCLUDED_DIRS or p.startswith(".") for p in parts[:-1]):
        return True
    if any(fnmatch.fnmatch(parts[-1], pattern) for pattern in EXCLUDED_FILE_PATTERNS):
        return True
    return parts[0] == "models" and len(parts) > 1 and Path(*parts[1:]).as_posix() not in _with_cards(keep_models)


def bundle_files(
    bundle_dir: str | os.PathLike, keep_models: Sequence[str] = KEEP_MODELS, skip: str | os.PathLike | None = None
) -> list[Path]:
    """The files :func:`package_bundle` takes from a bundle, relative to it, sorted.

    Args:
        bundle_dir: the bundle folder.
        keep_models: paths under ``models/`` to ship, each ``.pt`` with the ``model_card.json`` beside
            it; every other file there is left out.
        skip: a folder to leave out entirely (the output folder when it lies inside the bundle).
    """
    bundle = Path(bundle_dir).resolve()
    skip_dir = Path(skip).resolve() if skip is not None else None
    files = []
    for root, dirs, names in os.walk(bundle):
        # prune what is left out anyway, so a large runs/ or eval/ tree is not walked
        dirs[:] = [
            d
            for d in dirs
            if not (d in EXCLUDED_DIRS or d.startswith(".") or (Path(root) == bundle and d in EXCLUDED_ROOT_DIRS))
            and (skip_dir is None or Path(root, d) != skip_dir)
        ]
        for n in names:
            rel = (Path(root) / n).relative_to(bundle)
            if (Path(root) / n).is_file() and not _excluded(rel, keep_models):
                files.append(rel)
    return sorted(files)


def _is_required(rel: Path) -> bool:
    """Files the bundle is not a bundle without; they stay in the zip whatever their size."""
    return rel.parts[0] == "configs" or rel.as_posix() in ("LICENSE", "docs/README.md", *LARGE_FILES_NAMES)


def _large_file_entry(bundle: Path, rel: Path, listed: dict | None, url: str = "") -> dict:
    """A large_files entry for ``rel``: ``url``, else the url of an existing entry whose hash still matches."""
    sha = file_hash(bundle / rel)
    if url:
        return {"path": rel.as_posix(), "url": url, "hash_val": sha, "hash_type": "sha256"}
    if listed and listed.get("url") and listed.get("hash_val"):
        hash_type = listed.get("hash_type") or "sha256"  # monai.apps.utils.download_url's default
        if hash_type in HASH_TYPES and file_hash(bundle / rel, hash_type) == str(listed["hash_val"]).lower():
            url = listed["url"]
    return {"path": rel.as_posix(), "url": url, "hash_val": sha, "hash_type": "sha256"}


def _zip_info(arcname: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(arcname, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    return info


def build_components_wheel(out_dir: str | os.PathLike) -> Path:
    """Build the wheel of ``dagman_components`` from the project it is installed from.

    The wheel's version is the one ``setup.cfg`` gives, which the bundles' metadata pins under
    ``required_packages_version``.

    Args:
        out_dir: an existing folder for the wheel.

    Returns:
        The path of ``dagman_components-<version>-py3-none-any.whl``.

    Raises:
        FileNotFoundError: when the package was not installed from its source tree (no ``setup.cfg``
            beside it): install this repository with ``pip install -e .`` first.
        RuntimeError: when ``pip wheel`` fails; the message holds the end of its output.
    """
    project = Path(__file__).resolve().parents[2]
    if not (project / "setup.cfg").is_file():
        raise FileNotFoundError(f"no setup.cfg in {project}: the wheel of dagman_components is built from its "
                                "source tree; run this from a checkout installed with `pip install -e .`.")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "--wheel-dir", str(out_dir), str(project)], capture_output=True, text=True)
    wheels = sorted(Path(out_dir).glob("dagman_components-*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(f"building the dagman_components wheel failed (exit {done.returncode}):\n"
                           f"{(done.stdout + done.stderr)[-2000:]}")
    return wheels[0]


METADATA_PATH = "configs/metadata.json"


def _metadata_following_weights(bundle: Path, files: Sequence[Path]) -> bytes | None:
    """``configs/metadata.json`` with its output channels measured from the shipped weights' model card.

    The inference configs build the network from ``models/model_card.json``, so the channels the metadata
    declares (e.g. the paper-size encoder's 384 features) can differ from the shipped weights' (192 for the
    ``make demo`` encoder, embed 24); the zoo's ``verify_data_shape`` would then fail on the zip.

    Args:
        bundle: the bundle folder.
        files: the files going into the zip (relative paths).

    Returns:
        the metadata to ship when its single output's ``num_channels`` differs from the measured one (a
        warning names both); ``None`` when it agrees, or no card or no inference config ships.

    Raises:
        BundleCheckError: the network of the card cannot be built or run; the problem names the metadata value,
            the card and the error.
    """
    shipped = {rel.as_posix() for rel in files}
    card = f"models/{MODEL_CARD_NAME}"
    if card not in shipped or "models/model.pt" not in shipped or not any((bundle / c).is_file() for c in INFERENCE_CONFIGS):
        return None
    metadata = json.loads((bundle / METADATA_PATH).read_text(encoding="utf-8"))
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    if len(outputs) != 1 or "num_channels" not in next(iter(outputs.values())):
        return None
    key, output = next(iter(outputs.items()))
    declared = output["num_channels"]
    from dagman_components.bundle_tools.zoo_checks import measured_output_channels  # imports torch: only when weights ship

    try:
        measured = measured_output_channels(bundle)
    except Exception as err:  # any failure to build or run the network: refuse, naming both sides
        root = err
        while root.__cause__ is not None:  # MONAI wraps the error in the config expression's text
            root = root.__cause__
        reason = (str(root).strip().splitlines() or [""])[0]
        raise BundleCheckError(bundle, [
            f"{METADATA_PATH}: declares {declared} output channels ('{key}'), and the network of {card} could not "
            f"be built to check it ({type(root).__name__}: {reason}); fix the card or the inference config"]) from err
    if measured == declared:
        return None
    logger.warning("%s declares %s output channels ('%s'); the shipped weights' %s gives %d: the zip's metadata says %d",
                   METADATA_PATH, declared, key, card, measured, measured)
    output["num_channels"] = measured
    return (json.dumps(metadata, indent=4) + "\n").encode()


def package_bundle(
    bundle_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    max_file_mb: float = 25.0,
    *,
    overwrite: bool = False,
    require_weights: bool = True,
    keep_models: Sequence[str] = KEEP_MODELS,
    schema_path: str | os.PathLike | None = None,
    large_file_urls: Mapping[str, str] | None = None,
    with_wheel: bool = False,
) -> Path:
    """Check a bundle, then write ``<out_dir>/<bundle_name>_v<version>.zip``.

    Files over ``max_file_mb`` are left out of the zip and listed (path, url, sha256) in
    ``large_files.yml`` inside the zip and in ``<bundle_name>_v<version>_large_files.yml`` next to
    it; entries of a ``large_files.*`` the bundle already has are kept. Both files are written to a
    temporary name and renamed into place, so a failure leaves no partial zip.

    Args:
        bundle_dir: the bundle folder; its name is the bundle name and the zip's top-level folder.
        out_dir: where to write the zip (created if missing).
        max_file_mb: the largest file, in MiB, that goes into the zip.
        overwrite: replace an existing zip of the same name.
        require_weights: passed to :func:`check_bundle`.
        keep_models: paths under ``models/`` to ship (see :func:`bundle_files`).
        schema_path: passed to :func:`check_bundle`.
        large_file_urls: download url of each file left out, by its path in the bundle
            (``{"models/model.pt": "https://..."}``); without one, the url of the bundle's own
            ``large_files.*`` entry is kept while the file's hash matches.
        with_wheel: also ship the wheel of ``dagman_components`` (:func:`build_components_wheel`) as
            ``<bundle_name>/wheels/<wheel>``, so that the unzipped bundle installs on a machine without
            this repository (``pip install <bundle_name>/wheels/*.whl``).

    Returns:
        the path of the zip.

    Raises:
        ValueError: when ``max_file_mb`` is not positive.
        BundleCheckError: when :func:`check_bundle` finds problems; nothing is written.
        FileExistsError: when the zip exists and ``overwrite`` is False.
        LargeFileUrlError: when a file left out has no url; nothing is written.
    """
    if not max_file_mb > 0:
        raise ValueError(f"max_file_mb must be positive, got {max_file_mb}.")
    problems = check_bundle(bundle_dir, schema_path=schema_path, require_weights=require_weights)
    if problems:
        raise BundleCheckError(bundle_dir, problems)
    bundle = Path(bundle_dir).resolve()
    name = bundle.name
    version = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))["version"]
    out = Path(out_dir)
    if out.resolve() == bundle:
        raise ValueError(f"out_dir must not be the bundle folder itself, got {out_dir}.")
    zip_path = out / f"{name}_v{version}.zip"
    sidecar = out / f"{name}_v{version}_large_files.yml"
    if zip_path.exists() and not overwrite:
        raise FileExistsError(f"{zip_path} exists; pass overwrite=True to replace it.")

    limit = int(max_file_mb * 1024 * 1024)
    files = bundle_files(bundle, keep_models=keep_models, skip=out)
    metadata_bytes = _metadata_following_weights(bundle, files)
    large = [rel for rel in files if (bundle / rel).stat().st_size > limit and not _is_required(rel)]
    listed = {}
    if large:
        listed = _read_large_files(bundle, [])  # the bundle's own entries (check_bundle found them valid)
        urls = dict(large_file_urls or {})
        for rel in large:
            listed[rel.as_posix()] = _large_file_entry(bundle, rel, listed.get(rel.as_posix()), urls.get(rel.as_posix(), ""))
        missing = [rel.as_posix() for rel in large if not listed[rel.as_posix()]["url"]]
        if missing:
            raise LargeFileUrlError(bundle, missing, max_file_mb)
        files = [rel for rel in files if rel not in large and rel.as_posix() not in LARGE_FILES_NAMES]
    large_yaml = yaml.safe_dump({"large_files": list(listed.values())}, sort_keys=False).encode() if large else None

    out.mkdir(parents=True, exist_ok=True)
    wheel_dir = tempfile.TemporaryDirectory(prefix="dagman_wheel_") if with_wheel else None
    wheel = build_components_wheel(wheel_dir.name) if wheel_dir is not None else None

    def write_zip(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            for rel in progress(files, f"packaging {name}", unit="file"):
                info = _zip_info(f"{name}/{rel.as_posix()}")
                if rel.as_posix() == METADATA_PATH and metadata_bytes is not None:
                    zf.writestr(info, metadata_bytes)
                    continue
                with (bundle / rel).open("rb") as src, zf.open(info, "w", force_zip64=True) as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
            if large_yaml is not None:
                zf.writestr(_zip_info(f"{name}/large_files.yml"), large_yaml)
            if wheel is not None:
                zf.writestr(_zip_info(f"{name}/{WHEELS_DIR}/{wheel.name}"), wheel.read_bytes())

    try:
        replace_atomically(zip_path, write_zip, suffix=".zip")
    finally:
        if wheel_dir is not None:
            wheel_dir.cleanup()
    if large_yaml is not None:
        atomic_write_bytes(large_yaml, sidecar)
    else:
        sidecar.unlink(missing_ok=True)  # a stale list from an earlier package would mislead
    if large:
        logger.warning(
            "%d file(s) over %s MB left out of %s and listed with their url in %s",
            len(large), max_file_mb, zip_path.name, sidecar.name,
        )
    return zip_path
