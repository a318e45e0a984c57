"""The one atomic-write module: unique temp names, usual permissions, old file kept on failure."""

from __future__ import annotations

import errno
import json
import os
import stat

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from dagman_components import atomic  # noqa: E402


def test_writers_write_what_they_are_given(tmp_path):
    atomic.atomic_write_bytes(b"\x00\x01", tmp_path / "a.bin")
    atomic.atomic_write_text("héllo", tmp_path / "sub" / "a.txt")  # the folder is created
    atomic.atomic_write_text(json.dumps({"k": [1, 2]}), tmp_path / "a.json")
    atomic.atomic_save({"w": torch.arange(3)}, tmp_path / "a.pt")
    fig = plt.figure(figsize=(1, 1))
    atomic.atomic_write_png(fig, tmp_path / "a.png", dpi=20, close=True)
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "sub" / "a.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "a.json").read_text()) == {"k": [1, 2]}
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["w"], torch.arange(3))
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)  # closed
    assert sorted(p.name for p in tmp_path.rglob("*") if p.name.startswith(".")) == []  # no temp file left


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic.atomic_write_text("x", tmp_path / "f.txt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o640  # not mkstemp's 0600


def test_a_failing_write_keeps_the_old_file_and_names_it(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")

    def disk_full(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="cannot write '.*checkpoint.pt'.*previous version is kept"):
        atomic.replace_atomically(target, disk_full)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    with pytest.raises(ValueError, match="bad content"):  # other errors pass through unchanged
        atomic.replace_atomically(tmp_path / "new.txt", lambda tmp: (_ for _ in ()).throw(ValueError("bad content")))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_suffix_lets_writers_pick_the_format(tmp_path):
    seen = []
    atomic.replace_atomically(tmp_path / "x.nii.gz", lambda tmp: (seen.append(tmp), open(tmp, "wb").close()),
                              suffix=".nii.gz")
    assert seen[0].endswith(".nii.gz") and os.path.basename(seen[0]).startswith(".x.nii.gz.")
