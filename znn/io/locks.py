"""One run per output: an exclusive lock taken before a run writes anything, its holder recorded beside it.

The lock is :class:`filelock.FileLock` (``flock`` on POSIX), tried without waiting: a second run is refused at once
with an :class:`~znn.errors.OutputBusyError` naming the holder. The operating system releases the lock when its
process ends however it ends (also SIGKILL or out of memory), so the lock of a dead run is taken over by the next
run without anyone deleting a file. The lock file itself stays in place (removing it would let two runs lock two
different files of one name); the holder's pid, host and start time go to ``<lock>.json`` beside it, written when
the lock is taken and removed when it is released.

Within one thread the lock is re-entrant (a job that locks its output store and then calls the dense run, which
locks it too, holds it once); two threads of one process, like two processes, exclude each other.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

from znn.errors import OutputBusyError

__all__ = ["RunLock", "lock_beside"]


def lock_beside(target: str | os.PathLike[str]) -> Path:
    """The lock file of an output ``target`` (a file, a store, a prefix): ``<target>.lock`` in the same folder."""
    target = Path(target)
    return target.parent / f"{target.name}.lock"


class RunLock:
    """Hold the lock at ``path`` for a run writing ``what`` (named in the refusal); a context manager."""

    def __init__(self, path: str | os.PathLike[str], what: str) -> None:
        self.path = Path(path)
        self.what = what
        self.holder_path = self.path.with_name(self.path.name + ".json")
        self._lock: FileLock | None = None
        self._outermost = False

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path), timeout=0, is_singleton=True)
        self._outermost = not lock.is_locked  # this thread does not hold it yet
        try:
            lock.acquire()
        except Timeout:
            raise OutputBusyError(f"{self.what} is in use by another run ({self.holder()}; lock file {self.path}): "
                                  "wait for it to finish or stop it") from None
        self._lock = lock
        if self._outermost:
            self._record_holder()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._lock is None:
            return
        if self._outermost:
            self.holder_path.unlink(missing_ok=True)
        self._lock.release()
        self._lock = None

    def _record_holder(self) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        tmp = self.holder_path.with_name(f".{self.holder_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, self.holder_path)  # a reader sees the previous holder's record or this one, never half

    def holder(self) -> str:
        """The holder as recorded (``pid 12 on host h since ...``), or a sentence saying it is not recorded."""
        try:
            record = json.loads(self.holder_path.read_text())
            return f"pid {record['pid']} on host {record['host']} since {record['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "its holder has not recorded itself yet"

    @staticmethod
    def held(path: str | os.PathLike[str]) -> bool:
        """Whether some run holds the lock at ``path`` now (a lock file nobody can open counts as not held)."""
        if not Path(path).exists():
            return False
        probe = FileLock(str(path), timeout=0)
        try:
            probe.acquire()
        except Timeout:
            return True
        except OSError:
            return False
        probe.release()
        return False
