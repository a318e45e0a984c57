"""One training run per bundle_root: TrainingLock between processes, stale locks, DDP ranks."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys

import pytest
from conftest import REPO
from ignite.engine import Engine

from dagman_components.handlers import TrainingLock, TrainingLockedError

HOLD = """
import sys, time
from dagman_components.handlers import TrainingLock
TrainingLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def hold_in_subprocess(path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_process_is_refused_then_takes_over_the_dead_ones_lock(tmp_path, caplog):
    path = tmp_path / "models" / ".train.lock"
    proc = hold_in_subprocess(path)
    try:
        with pytest.raises(TrainingLockedError) as info:
            TrainingLock(path).acquire()
        assert f"PID {proc.pid} on {socket.gethostname()}" in str(info.value) and str(path) in str(info.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert path.read_text().strip() == f"PID {proc.pid} on {socket.gethostname()}"  # left behind by the dead run
    lock = TrainingLock(path)
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    assert "taking over" in caplog.text and f"PID {proc.pid}" in caplog.text
    assert path.read_text().strip() == f"PID {os.getpid()} on {socket.gethostname()}"
    lock.release()
    assert path.read_text() == ""


def test_lock_is_held_while_the_engine_runs_and_released_when_it_completes(tmp_path, caplog):
    path = tmp_path / ".train.lock"
    seen = []
    engine = Engine(lambda e, b: seen.append(path.read_text().strip()))
    TrainingLock(path).attach(engine)
    with caplog.at_level(logging.WARNING):
        engine.run([0, 1], max_epochs=1)
    assert seen == [f"PID {os.getpid()} on {socket.gethostname()}"] * 2
    assert path.read_text() == "" and "taking over" not in caplog.text  # a released lock is free, not stale
    TrainingLock(path).acquire()  # free again


def test_lock_naming_another_host_is_refused(tmp_path):
    path = tmp_path / ".train.lock"
    path.write_text("PID 12345 on some-other-node\n")
    with pytest.raises(TrainingLockedError, match="another machine"):
        TrainingLock(path).acquire()
    assert path.read_text() == "PID 12345 on some-other-node\n"


def test_only_rank_zero_takes_the_lock(tmp_path, monkeypatch):
    """Before the process group exists (a bundle's initialize), torchrun's RANK decides."""
    path = tmp_path / ".train.lock"
    monkeypatch.setenv("RANK", "1")
    TrainingLock(path).acquire()
    assert not path.exists()
    monkeypatch.setenv("RANK", "0")
    lock = TrainingLock(path)
    lock.acquire()
    assert path.read_text().startswith(f"PID {os.getpid()} ")
    lock.release()


def test_engine_handler_adopts_the_lock_taken_in_initialize(tmp_path):
    """A bundle takes the lock in initialize (one object) and its handler list releases it (another)."""
    path = tmp_path / ".train.lock"
    TrainingLock(path).acquire()  # initialize
    engine = Engine(lambda e, b: None)
    TrainingLock(path).attach(engine)
    engine.run([0], max_epochs=1)
    assert path.read_text() == ""
    proc = hold_in_subprocess(path)  # free for another process now
    proc.kill()
    proc.wait()


def test_lock_is_released_when_the_process_exits(tmp_path):
    """A run that ends without COMPLETED (an exception) frees the lock at exit: no stale-lock warning later."""
    path = tmp_path / ".train.lock"
    code = "import sys\nfrom dagman_components.handlers import TrainingLock\nTrainingLock(sys.argv[1]).acquire()\nraise SystemExit(3)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    assert subprocess.run([sys.executable, "-c", code, str(path)], env=env).returncode == 3
    assert path.read_text() == ""
