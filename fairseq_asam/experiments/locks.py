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
from typing import Optional

LOCK_NAME = "run.lock"


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
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLocked(f"locked by {_holder(self.path)} ({self.path})") from None
            raise
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode())
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


def lock_holder(run_dir: str) -> Optional[str]:
    """Who holds the run's lock right now, or None if nobody does (nothing is left locked)."""
    path = os.path.join(run_dir, LOCK_NAME)
    if not os.path.exists(path):
        return None
    try:
        RunLock(run_dir).acquire().release()
    except RunLocked:
        return _holder(path)
    return None
