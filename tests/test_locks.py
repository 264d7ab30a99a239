"""Run locks: a probe (the report's, the cluster planner's "who holds it?") never makes a
launcher that starts at the same moment skip its run, and never rewrites who holds the lock."""

import fcntl
import os
import threading
import time

import pytest

from fairseq_asam.experiments.locks import LOCK_NAME, RunLock, RunLocked, lock_holder


def test_a_lock_held_elsewhere_is_refused_and_named_at_once(tmp_path, monkeypatch):
    # A launcher's hold is refused at once, not after the grace a probe gets.
    monkeypatch.setattr("fairseq_asam.experiments.locks.PROBE_GRACE_SECONDS", 30.0)
    with RunLock(str(tmp_path)):
        started = time.monotonic()
        with pytest.raises(RunLocked, match=rf"locked by pid {os.getpid()} on "):
            RunLock(str(tmp_path)).acquire()
        assert time.monotonic() - started < 5.0
        assert lock_holder(str(tmp_path)).startswith(f"pid {os.getpid()} on ")
    assert lock_holder(str(tmp_path)) is None
    RunLock(str(tmp_path)).acquire().release()  # free again


def test_a_probe_does_not_rewrite_the_holder(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text("pid 1 on elsewhere since then\n")  # a holder's record, lock free now
    assert lock_holder(str(tmp_path)) is None
    assert path.read_text() == "pid 1 on elsewhere since then\n"


def test_a_launcher_starting_during_a_probe_still_takes_the_lock(tmp_path):
    # The probe's hold, stretched to 0.3 s (a real one lasts microseconds): a launcher
    # acquiring meanwhile must wait it out, not skip the run as "locked".
    path = tmp_path / LOCK_NAME
    path.touch()
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # what lock_holder takes
    threading.Timer(0.3, os.close, (fd,)).start()
    lock = RunLock(str(tmp_path)).acquire()
    assert path.read_text().startswith(f"pid {os.getpid()} on ")
    lock.release()


def test_a_shared_hold_longer_than_the_grace_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("fairseq_asam.experiments.locks.PROBE_GRACE_SECONDS", 0.2)
    path = tmp_path / LOCK_NAME
    path.touch()
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    try:
        with pytest.raises(RunLocked, match="busy: probed by other processes for over 0.2 s"):
            RunLock(str(tmp_path)).acquire()
    finally:
        os.close(fd)
