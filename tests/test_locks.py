"""The run lock (experiments.layout): one launcher per run folder, named to the one refused; a
crashed launcher leaves no lock; the report's probe never makes a launcher skip a free run and
never writes."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import filelock
import pytest

from fairseq_asam_experiments import layout
from fairseq_asam_experiments.layout import RunLocked, lock_holder, run_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_holder(run_dir):
    """Another launcher: a process holding the run's lock until it is killed."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from fairseq_asam_experiments.layout import run_lock
                with run_lock({str(run_dir)!r}):
                    print("held", flush=True)
                    time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_held_lock_is_refused_naming_its_holder_and_a_killed_holder_frees_it(tmp_path):
    holder = start_holder(tmp_path)
    try:
        named = f"pid {holder.pid} on {socket.gethostname()} since "
        with pytest.raises(RunLocked, match=f"locked by {named}"):
            with run_lock(str(tmp_path)):
                pass
        assert lock_holder(str(tmp_path)).startswith(named)
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: no cleanup runs
        holder.wait()
    assert (tmp_path / layout.HOLDER_FILE).exists()  # the dead holder's line stays...
    assert lock_holder(str(tmp_path)) is None  # ...but the lock went with its process
    with run_lock(str(tmp_path)):
        mine = f"pid {os.getpid()} on {socket.gethostname()} since "
        assert (tmp_path / layout.HOLDER_FILE).read_text().startswith(mine)
    assert not (tmp_path / layout.HOLDER_FILE).exists()


def test_the_probe_creates_and_writes_nothing(tmp_path):
    assert lock_holder(str(tmp_path / "not-started")) is None
    assert not (tmp_path / "not-started").exists()
    (tmp_path / layout.LOCK_FILE).touch()
    (tmp_path / layout.HOLDER_FILE).write_text("pid 1 on elsewhere since then\n")  # stale
    assert lock_holder(str(tmp_path)) is None
    assert (tmp_path / layout.HOLDER_FILE).read_text() == "pid 1 on elsewhere since then\n"


def test_a_launcher_starting_during_a_probe_still_takes_the_lock(tmp_path):
    # The probe's hold, stretched to 0.3 s (a real one lasts an instant): a launcher asking
    # meanwhile waits it out instead of skipping the run as locked.
    held = threading.Event()

    def probe():
        with filelock.FileLock(str(tmp_path / layout.LOCK_FILE), timeout=0):  # lock_holder's
            held.set()
            time.sleep(0.3)

    thread = threading.Thread(target=probe)
    thread.start()
    assert held.wait(timeout=10)
    with run_lock(str(tmp_path)):
        assert (tmp_path / layout.HOLDER_FILE).read_text().startswith(f"pid {os.getpid()} ")
    thread.join()
