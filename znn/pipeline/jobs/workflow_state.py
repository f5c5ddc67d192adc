"""The state of a batch workflow's steps, kept in ``<workflow>.state.json`` beside the workflow file.

One JSON object: ``{"workflow": name, "steps": {step: {status, digest, started, finished, seconds, error}}}`` with
status ``pending``, ``running``, ``done``, ``failed`` or ``blocked`` (a step it needs failed). Every change is
written to a temporary file and renamed over the state file, so a killed run leaves the last complete state. A
run holds an exclusive lock on ``<workflow>.state.lock`` (released by the OS when the process dies), so two runs
of one workflow cannot interleave and ``znn status`` can tell a running step from one whose run was killed.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from znn.errors import WorkflowError

__all__ = ["StepState", "WorkflowState", "RunLock", "STATUSES", "now"]

STATUSES = ("pending", "running", "done", "failed", "blocked")


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


@dataclass
class StepState:
    status: str = "pending"
    digest: str | None = None
    started: str | None = None
    finished: str | None = None
    seconds: float | None = None
    error: str | None = None


class WorkflowState:
    """The step records of one workflow; :meth:`update` saves at once (thread-safe)."""

    def __init__(self, path: Path, workflow: str):
        self.path = path
        self.workflow = workflow
        self.steps: dict[str, StepState] = _read(path)
        self._lock = threading.Lock()

    def get(self, name: str) -> StepState:
        return self.steps.get(name) or StepState()

    def update(self, name: str, **fields: Any) -> None:
        with self._lock:
            record = asdict(self.get(name))
            record.update(fields)
            self.steps[name] = StepState(**record)
            self._save()

    def _save(self) -> None:
        text = json.dumps({"workflow": self.workflow, "steps": {n: asdict(s) for n, s in self.steps.items()}},
                          indent=1) + "\n"
        tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)


def _read(path: Path) -> dict[str, StepState]:
    if not path.exists():
        return {}
    fix = "delete it to start the workflow over"
    try:
        doc = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WorkflowError(f"{path}: not a workflow state file ({exc}); {fix}") from None
    steps = doc.get("steps") if isinstance(doc, dict) else None
    if not isinstance(steps, dict):
        raise WorkflowError(f"{path}: not a workflow state file (no `steps` object); {fix}")
    result = {}
    for name, record in steps.items():
        try:
            state = StepState(**record)
        except TypeError:
            raise WorkflowError(f"{path}: step {name!r}: not a step record ({record!r}); {fix}") from None
        if state.status not in STATUSES:
            raise WorkflowError(f"{path}: step {name!r}: status {state.status!r} is not one of "
                                f"{', '.join(STATUSES)}; {fix}")
        result[name] = state
    return result


class RunLock:
    """An exclusive lock on ``path`` for the duration of a run; WorkflowError if another process holds it."""

    def __init__(self, path: Path, what: str):
        self.path = path
        self.what = what
        self._file: IO[str] | None = None

    def __enter__(self) -> "RunLock":
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise WorkflowError(f"{self.what}: another `znn run` of this workflow is running (pid {holder}); "
                                "wait for it to finish or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the lock
            self._file = None

    @staticmethod
    def held(path: Path) -> bool:
        """Whether a run holds the lock at ``path`` now."""
        if not path.exists():
            return False
        with open(path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
        return False
