"""One writer per run directory: ``RUN/writer.lock``.

A second ``qkv pretrain`` (or ``finetune``) on the run directory of a running one (a scheduler that requeues
a job whose old process still runs) would train beside it: both append to ``metrics.jsonl`` and both manage
the same checkpoints. The writer (process 0 of a run; only it writes the run directory's files) holds an
exclusive ``fcntl.flock`` on ``RUN/writer.lock`` for its whole life and writes its host, pid and start time
into it; a second writer finds the lock taken and is refused with one line naming the holder.

The kernel drops the lock when its holder exits however it exits (SIGKILL, OOM killer), so a lock file left
by a dead process is simply taken over; the file is removed when a run ends. ``flock`` is local to one
machine on some network file systems: two writers on two hosts may then both get it. On a file system
without ``flock`` (ENOLCK, EOPNOTSUPP) the holder's host and pid decide: a live pid on this host refuses,
anything else is taken over.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from qkv.errors import UserError

LOCK_FILE = "writer.lock"


class RunDirInUse(UserError):
    """Another live process writes this run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _holder(path: Path) -> dict:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "another qkv process (it has not written its host and pid yet)"
    return f"pid {holder['pid']} on host {holder.get('host', '?')}, since {holder.get('started', '?')}"


class RunLock:
    """The exclusive writer lock of ``run_dir`` (created if missing); :meth:`release` when the run ends."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        try:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self.fd = self._acquire()
        except OSError as err:
            raise UserError(f"train.run_dir={str(run_dir)!r}: cannot create its lock file {self.path.name} "
                            f"({err.strerror or err}): choose another train.run_dir") from None
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(me) + "\n").encode(), 0)

    def _acquire(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunDirInUse(self._refusal(_holder(self.path))) from None
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    os.close(fd)
                    raise
                holder = _holder(self.path)  # no flock here: the host and pid in the file decide
                if holder.get("host") == socket.gethostname() and holder.get("pid") not in (None, os.getpid()) \
                        and _pid_alive(int(holder["pid"])):
                    os.close(fd)
                    raise RunDirInUse(self._refusal(holder)) from None
            try:  # the file may have been removed (a run ended) between our open and our lock: lock the new one
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def _refusal(self, holder: dict) -> str:
        return (f"train.run_dir={str(self.path.parent)!r} is in use by another run ({_describe(holder)}): wait for "
                "it to finish or stop it, or choose another train.run_dir (the lock file "
                f"{self.path} is released when that process exits)")

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in that order, so no one locks a file about to vanish)."""
        if self.fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
