#!/usr/bin/env bash
# Create a SEPARATE virtual environment for the MONAI Label test (tests/test_monailabel_bundle.py).
#
# Why separate: monailabel 0.8.5 imports torchvision at module level, and PyPI's torchvision does not
# load beside the CPU torch 2.13.0 wheel used by the main environment ("operator torchvision::nms
# does not exist"). torch 2.14.1 + torchvision 0.29.1 (both on local disk here) do load, and
# monailabel 0.8.5 then installs beside MONAI 1.6.1. About 8 GB; the main venv stays untouched.
#
# Usage: .ci/monailabel_env.sh [VENV_DIR]   (default: $MONAILABEL_VENV, else ~/.cache/dagman-monailabel-venv)
# Idempotent: an existing environment in which monailabel, torchvision and dagman_components
# import is reused as it is. Run from anywhere; the package installed is this repository.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${MONAILABEL_VENV:-${XDG_CACHE_HOME:-${HOME}/.cache}/dagman-monailabel-venv}}"
PYTHON="${PYTHON:-python3}"

check() {
    # run from / so that the checkout itself is not on sys.path: only the installed package counts
    (cd / && REPO_ROOT="${REPO_ROOT}" "${VENV}/bin/python" - <<'PY' >/dev/null 2>&1
import os
import monailabel, torchvision, monai, dagman_components  # noqa: F401
from monailabel.tasks.infer.bundle import BundleInferTask  # noqa: F401
import pydicom_seg  # noqa: F401  (the server imports it; fails with pydicom 3)
# the components must be this checkout's (editable install), not a stale copy
assert os.path.samefile(os.path.dirname(dagman_components.__file__), os.path.join(os.environ["REPO_ROOT"], "dagman_components"))
PY
    )
}

if [ -x "${VENV}/bin/python" ] && check; then
    echo "monailabel env ready: ${VENV}"
    exit 0
fi

echo "creating monailabel env in ${VENV} (about 8 GB, several minutes)"
"${PYTHON}" -m venv "${VENV}"
PIP=("${VENV}/bin/python" -m pip install --no-input --progress-bar off)
# 1. torch + torchvision that load together on CPU (local wheels; order matters: torch first).
"${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1"
# 2. MONAI as tested for the bundles, then MONAI Label (keeps the torch chosen above).
"${PIP[@]}" "monai[einops,fire,ignite,itk,nibabel,tqdm]==1.6.1" "pytorch-ignite==0.5.5"
"${PIP[@]}" "monailabel==0.8.5" "torch==2.14.1" "torchvision==0.29.1" "monai==1.6.1"
# monailabel's server imports pydicom-seg 0.4.1, which fails with pydicom 3 ("No module named
# pydicom._storage_sopclass_uids"); pydicom 2.4 needs the pynetdicom / dicomweb-client releases made for it.
"${PIP[@]}" "pydicom>=2.4,<3" "pynetdicom<3" "dicomweb-client<0.60"
# 3. This repository, editable (the test then always sees the checkout's code), and pytest.
"${PIP[@]}" -e "${REPO_ROOT}" "pytest>=8,<10" "pydicom>=2.4,<3"

check || { echo "monailabel env in ${VENV} does not import monailabel/torchvision/dagman_components" >&2; exit 1; }
echo "monailabel env ready: ${VENV}"
