"""The names of a Table 4 grid's files (experiments.runner writes them, cluster and report read
them), and the lock of a run folder.

    <out>/grid.json, <out>/runs/<run>/, <out>/report/
    <out>/runs/<run>/: command.txt, training.json, train.log, checkpoints/, failure.json,
                       job.json (the job last submitted for it), run.lock, run.holder

A launcher holds a run folder's lock (`run_lock`, a `filelock` on run.lock) while it trains,
evaluates or measures that run, so two launchers never work on one run at once; the operating
system drops the lock when its process ends, so a crashed launcher leaves no run locked.
run.holder names the holder (pid, host, since when) for the one refused and for the report.
"""

import contextlib
import datetime
import importlib.util
import os
import socket
from typing import Iterator, Optional

import filelock

from .files import write_text

RUNS_FOLDER, REPORT_FOLDER = "runs", "report"


def plugin_dir() -> str:
    """The plugin's folder for fairseq's `--user-dir`, found without importing it (torch)."""
    return importlib.util.find_spec("fairseq_asam").submodule_search_locations[0]


GRID_RECORD = "grid.json"
CHECKPOINTS_FOLDER = "checkpoints"
TRAIN_LOG = "train.log"
COMMAND_FILE = "command.txt"
TRAINING_RECORD = "training.json"
FAILURE_RECORD = "failure.json"
JOB_RECORD = "job.json"  # experiments.cluster's
LOCK_FILE, HOLDER_FILE = "run.lock", "run.holder"
# lock_holder takes the lock for an instant: a launcher that asks for it at that moment waits
# this long (filelock's polling) rather than skip a run nobody works on.
LOCK_WAIT_SECONDS = 1.0


class RunLocked(Exception):
    """Another launcher (or job) works on this run."""


def _holder(run_dir: str) -> str:
    try:
        with open(os.path.join(run_dir, HOLDER_FILE), encoding="utf-8") as f:
            return f.read().strip() or "another process"
    except OSError:
        return "another process"


@contextlib.contextmanager
def run_lock(run_dir: str) -> Iterator[None]:
    """Holds the run folder's lock for the block; RunLocked, naming the holder, if another
    process or thread holds it."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_FILE)
    lock = filelock.FileLock(path)
    try:
        lock.acquire(timeout=LOCK_WAIT_SECONDS)
    except filelock.Timeout:
        raise RunLocked(f"locked by {_holder(run_dir)} ({path})") from None
    holder = os.path.join(run_dir, HOLDER_FILE)
    try:
        since = datetime.datetime.now().isoformat(timespec="seconds")
        write_text(holder, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n")
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(holder)
        lock.release()


def lock_holder(run_dir: str) -> Optional[str]:
    """Who holds the run's lock now (run.holder's line), or None; writes and creates nothing."""
    path = os.path.join(run_dir, LOCK_FILE)
    if not os.path.isfile(path):
        return None
    lock = filelock.FileLock(path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return _holder(run_dir)
    lock.release()
    return None
