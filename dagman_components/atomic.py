"""The one way this project writes a file: atomically.

Every writer renders into a temporary file beside the target (a unique hidden name from
:func:`tempfile.mkstemp`), flushes it to disk with ``fsync``, gives it the permissions a plain ``open``
would (``0o666`` less the umask) and renames it over the target with :func:`os.replace`. A kill or a
full disk at any moment leaves either the previous file or the new one, never a truncated one, and
no temporary file behind.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "replace_atomically",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_save",
    "atomic_write_png",
    "save_nifti_atomic",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def replace_atomically(path: str | os.PathLike, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    Args:
        path: the target file; its folder is created when missing.
        write: writes the whole content to the file name it is given.
        suffix: the temporary file's suffix, for writers that pick the format by extension
            (``".png"``, ``".nii.gz"``).

    Raises:
        OSError: when the file cannot be written (full disk, no permission); the message names ``path``
            and says whether an earlier version is kept. Any error of ``write`` is re-raised after the
            temporary file is removed.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        write(tmp)
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError) and err.filename is None:  # e.g. a full disk: name the file and what is kept
            kept = "the previous version is kept" if path.exists() else "nothing was written"
            raise OSError(err.errno, f"cannot write '{path}' ({err.strerror or err}); {kept}") from err
        raise


def _write_bytes_to(data: bytes) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return write


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` atomically."""
    replace_atomically(path, _write_bytes_to(data))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write UTF-8 text to ``path`` atomically."""
    replace_atomically(path, _write_bytes_to(text.encode("utf-8")))


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically."""
    import torch

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    replace_atomically(path, write)


def atomic_write_png(fig: Any, path: str | os.PathLike, dpi: float | None = None, close: bool = False) -> None:
    """Render a matplotlib figure to ``path`` as a PNG atomically.

    Args:
        fig: a matplotlib ``Figure``.
        path: the PNG file.
        dpi: resolution (default: the figure's).
        close: close the figure afterwards (also when writing fails), for pyplot figures.
    """
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", **({} if dpi is None else {"dpi": dpi}))
        replace_atomically(path, _write_bytes_to(buf.getvalue()))
    finally:
        if close:
            import matplotlib.pyplot as plt

            plt.close(fig)


def save_nifti_atomic(array: Any, affine: Any, path: str | os.PathLike) -> None:
    """Write a 3D array as NIfTI (float32) with ``affine`` (4 x 4) to ``path`` atomically."""
    import nibabel as nib
    import numpy as np

    image = nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    replace_atomically(path, lambda tmp: nib.save(image, tmp), suffix=".nii.gz")
