"""The state of a batch workflow's steps, kept in ``<workflow>.state.json`` beside the workflow file.

One JSON object: ``{"workflow": name, "steps": {step: {status, digest, started, finished, seconds, error}}}`` with
status ``pending``, ``running``, ``done``, ``failed`` or ``blocked`` (a step it needs failed). Every change is
written to a temporary file and renamed over the state file, so a killed run leaves the last complete state. A
run holds the lock ``<workflow>.state.lock`` (:class:`~znn.io.locks.RunLock`, the one lock of every output; released
by the OS when the process dies), so two runs of one workflow cannot interleave and ``znn status`` can tell a
running step from one whose run was killed.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from znn.errors import WorkflowError
from znn.io.locks import RunLock

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
