"""One lock per run folder, so that two launchers never train or evaluate one run at once.

`RunLock(run_dir).acquire()` takes an exclusive, non-blocking `flock` on `<run_dir>/run.lock`
and writes who holds it (pid, host, time) into the file; a second launcher, on this machine or
on another one sharing the folder (where the file system supports flock), fails to take it
and is told who holds it.  The lock belongs to the open file: the runner passes the file
descriptor to the processes it starts (`pass_fds`), so a trainer that outlives its launcher
(a killed launcher) still holds the lock until it exits, and no second trainer can start on
its save directory.  The operating system releases the lock when the last holder exits: a
crash never leaves a stale lock behind.
"""

import datetime
import errno
import fcntl
import os
import socket
import time
from typing import Optional

LOCK_NAME = "run.lock"
# How long acquire() waits out a shared hold: lock_holder's probe holds one for microseconds, and
# a launcher starting at that moment must not take the probe for a launcher and skip its run.
PROBE_GRACE_SECONDS = 1.0
PROBE_RETRY_SECONDS = 0.05


class RunLocked(Exception):
    """The run folder is locked by another launcher (or by a trainer one of them started)."""


def _holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
    except OSError:
        text = ""
    return text or "another process"


class RunLock:
    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Takes the lock or raises RunLocked naming its holder."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + PROBE_GRACE_SECONDS
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as error:
                    if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                if _held_exclusively(self.path):
                    raise RunLocked(f"locked by {_holder(self.path)} ({self.path})")
                if time.monotonic() >= deadline:
                    raise RunLocked(
                        f"busy: probed by other processes for over {PROBE_GRACE_SECONDS:g} s "
                        f"({self.path})"
                    )
                time.sleep(PROBE_RETRY_SECONDS)
            stamp = datetime.datetime.now().isoformat(timespec="seconds")
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode())
        except BaseException:  # RunLocked, an OS error, Ctrl-C while waiting: no fd left open
            os.close(fd)  # (and no lock held: it goes with the descriptor)
            raise
        self.fd = fd
        return self

    def release(self) -> None:
        """Closes this process's descriptor.  No LOCK_UN: that would also unlock it for a child
        that still holds the descriptor; the lock goes when the last holder closes it."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _held_exclusively(path: str) -> bool:
    """Whether a launcher (or its trainer) holds the lock: a shared probe then fails too.  A
    shared hold only (another probe) is not a launcher's."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)  # closing drops the probe's shared hold, if it got one
    return False


def lock_holder(run_dir: str) -> Optional[str]:
    """Who holds the run's lock right now, or None if nobody does.  The probe takes a shared
    lock for an instant and writes nothing: the holder's record is left as it is, and a launcher
    acquiring meanwhile waits the instant out (PROBE_GRACE_SECONDS) instead of skipping."""
    path = os.path.join(run_dir, LOCK_NAME)
    return _holder(path) if _held_exclusively(path) else None
