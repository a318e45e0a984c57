"""One training run per ``bundle_root``: a lock file taken when training starts."""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import socket
from pathlib import Path

from ignite.engine import Engine, Events

from dagman_components.runtime.distributed import rank
from dagman_components.errors import DagmanError

__all__ = ["TrainingLock", "TrainingLockedError"]

logger = logging.getLogger(__name__)

#: Locks held by this process, by resolved path: a new run in the same process releases the old one.
_HELD: dict[Path, "TrainingLock"] = {}


class TrainingLockedError(DagmanError, RuntimeError):
    """Another live process trains in the same ``bundle_root``."""


class TrainingLock:
    """Hold ``lock_path`` (e.g. ``<bundle_root>/models/.train.lock``) while an engine trains.

    Call :meth:`acquire` before building the trainer (a bundle's ``initialize``), so that a second
    run stops before it loads data or touches ``models/``; attached to the engine, it also acquires
    when the engine starts (a no-op when held) and releases when training completes. The lock file is opened and locked with ``flock`` (which the kernel
    releases when the process dies, SIGKILL included) and the process id and host name are written
    into it. A second process that starts training with the same lock file stops at once with
    :class:`TrainingLockedError`, naming the running process and the lock file. A lock file left by a
    process that died is taken over, with a log line. Under DDP only rank 0 takes the lock: the ranks
    of one ``torchrun`` share it. The lock is released when training completes or the
    process exits: the file is then emptied (not removed, so that no other process can lock a
    removed file), and an empty file means "free".

    Args:
        lock_path: the lock file.

    Note:
        ``flock`` is local to a machine on some network file systems; a lock file naming another host
        is therefore always refused (remove it by hand when that run is known to be dead).
    """

    def __init__(self, lock_path: str | os.PathLike) -> None:
        self.lock_path = Path(lock_path)
        self._fd: int | None = None

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self.acquire, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self.acquire)
            engine.add_event_handler(Events.COMPLETED, self.release)

    def _holder(self) -> str:
        try:
            return self.lock_path.read_text(encoding="utf-8").strip()
        except OSError:
            return ""

    def acquire(self, engine: Engine | None = None) -> None:
        """Take the lock (rank 0 only).

        Raises:
            TrainingLockedError: another live process holds it.
        """
        if rank() != 0 or self._fd is not None:
            return
        key = self.lock_path.resolve()
        if key in _HELD:  # this process holds it already (config's initialize, or a run that did not complete)
            self._fd, _HELD[key]._fd = _HELD[key]._fd, None
            _HELD[key] = self
            atexit.register(self.release)
            return
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        holder = self._holder()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TrainingLockedError(
                f"another training run is active in this bundle_root ({holder or 'process unknown'}); "
                f"lock file '{self.lock_path}'. Wait for it to finish or stop it, or use another bundle_root."
            ) from None
        host = socket.gethostname()
        if holder and not holder.endswith(f"on {host}"):
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise TrainingLockedError(
                f"the lock file '{self.lock_path}' names a training run on another machine ({holder}); "
                "if that run is dead, remove the lock file and start again."
            )
        if holder:
            logger.warning("taking over the lock file %s left by a process that is no longer running (%s)",
                           self.lock_path, holder)
        os.ftruncate(fd, 0)
        os.write(fd, f"PID {os.getpid()} on {host}\n".encode())
        os.fsync(fd)
        self._fd = fd
        _HELD[key] = self
        atexit.register(self.release)

    def release(self, engine: Engine | None = None) -> None:
        """Empty the lock file and release the lock (no-op when not held)."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        _HELD.pop(self.lock_path.resolve(), None)
