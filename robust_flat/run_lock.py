"""One writer per run directory: ``RUN/.lock``, held while a training job writes the run.

The lock is an advisory ``flock`` on the file, so the kernel releases it when the holder exits in any way (a crash
or SIGKILL included) and the next job takes it over at once; the file names the holder (host, PID, start time) for
the message a second job gets. Where the file system has no ``flock`` (some network file systems), the file's
content decides: a holder on this host whose PID is gone is taken over, a holder on another host is reported.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from typing import Optional

LOCK_NAME = ".lock"


class RunLocked(RuntimeError):
    """Another live process writes this run directory."""


def _read_holder(path: str) -> dict:
    try:
        with open(path) as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``with RunLock(run_dir): ...`` or :meth:`acquire` / :meth:`release`. Raises :class:`RunLocked`."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self._fd: Optional[int] = None

    def _refuse(self, holder: dict) -> None:
        who = (f"PID {holder['pid']} on {holder.get('host', '?')} (since {holder.get('since', '?')})"
               if holder.get("pid") else "another process")
        raise RunLocked(f"run directory {self.run_dir} is being written by {who}; wait for that job to end or stop "
                        "it, or pass another --run-dir")

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                self._refuse(_read_holder(self.path))
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            holder = _read_holder(self.path)  # no flock here: the content decides
            if holder.get("pid") and (holder.get("host") != socket.gethostname() or _alive(int(holder["pid"]))):
                os.close(fd)
                self._refuse(holder)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
