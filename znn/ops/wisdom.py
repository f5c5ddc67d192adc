"""FFTW wisdom: what FFTW learnt by timing plans (``FFTW_MEASURE``), in files, and carried from one process to the
next by a per-user cache.

* :func:`save_wisdom` / :func:`load_wisdom`: an explicit file (``znn bench ops --wisdom``).
* The cache: one JSON file per key in ``<cache_dir>/fftw-wisdom/`` (:func:`znn.environment.cache_dir`:
  ``$ZNN_CACHE_DIR``, else ``~/.cache/znn`` on Linux). The key (:func:`cache_key`) names the machine (architecture,
  CPU model, a digest of its instruction-set flags), the libraries (FFTW, pyfftw, NumPy) and the planner effort, so
  a home folder shared by the machines of a cluster holds one file per kind of machine. :mod:`znn.ops.fft` loads it
  once per process right before its first plan (:func:`ensure_cache_loaded`: the driver and every dask worker
  process alike), and :func:`save_cache` writes back what the process planned since: after each dense block and
  training run, and at exit. Saving merges what other processes wrote meanwhile (this process's own entries win a
  conflict) and replaces the file atomically (temp file + rename) under a file lock.
* ``ZNN_FFTW_WISDOM=off`` (or ``0``, ``no``, ``false``) turns the cache off; ``ZNN_CACHE_DIR`` moves it.

A cache file that cannot be read, is not valid, or was written for another key is ignored with a warning (and
replaced at the next save); a cache that cannot be written costs only the planning time of the next run.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import platform
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pyfftw

from znn.environment import cache_dir, cpu_flags, cpu_model

__all__ = [
    "PLANNER_LOCK",
    "save_wisdom",
    "load_wisdom",
    "cache_enabled",
    "cache_key",
    "cache_file",
    "ensure_cache_loaded",
    "note_planned",
    "planning",
    "save_cache",
]

PLANNER_LOCK = threading.Lock()  # FFTW's planner (planning, wisdom import and export) is not thread-safe
CACHE_VERSION = 1
_OFF = ("off", "0", "no", "false")
_LOCK_TIMEOUT_S = 30.0


def save_wisdom(path: str | Path) -> None:
    """Write FFTW's accumulated wisdom (all precisions) to ``path`` as JSON, so later runs skip planning."""
    with PLANNER_LOCK:
        blobs = pyfftw.export_wisdom()
    Path(path).write_text(json.dumps({"fftw_wisdom": [b.decode("ascii") for b in blobs]}))


def load_wisdom(path: str | Path) -> tuple[bool, ...]:
    """Import wisdom written by :func:`save_wisdom`; returns, per precision, whether FFTW accepted it.

    A missing file is not an error (first run): it returns all ``False``.
    """
    p = Path(path)
    if not p.exists():
        return (False, False, False)
    blobs = json.loads(p.read_text())["fftw_wisdom"]
    with PLANNER_LOCK:
        return tuple(bool(ok) for ok in pyfftw.import_wisdom(tuple(b.encode("ascii") for b in blobs)))


# ----------------------------------------------------------------------------------------------- the cache


def cache_enabled() -> bool:
    """False when ``ZNN_FFTW_WISDOM`` says off."""
    return os.environ.get("ZNN_FFTW_WISDOM", "on").strip().lower() not in _OFF


def _fftw_version() -> str:
    """The FFTW library's version, from the header of its (possibly empty) wisdom: ``fftw-3.3.5``."""
    with PLANNER_LOCK:
        head: bytes = pyfftw.export_wisdom()[0]
    return head.decode("ascii", "replace").lstrip("(").split(" ", 1)[0]


def _pyfftw_version() -> str:
    try:
        return version("pyfftw")
    except PackageNotFoundError:
        return str(getattr(pyfftw, "__version__", "unknown"))


def cache_key(effort: str) -> dict[str, Any]:
    """What wisdom is only valid for: the machine, the libraries and the planner effort ``effort``."""
    return {"version": CACHE_VERSION, "machine": platform.machine(), "cpu": cpu_model(), "cpu_flags": cpu_flags(),
            "fftw": _fftw_version(), "pyfftw": _pyfftw_version(), "numpy": np.__version__, "planner": effort}


def cache_file(key: dict[str, Any]) -> Path:
    """The cache file of ``key``: ``<cache_dir>/fftw-wisdom/<digest of the key>.json``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "fftw-wisdom" / f"{digest}.json"


def _read(path: Path, key: dict[str, Any], warn: bool) -> tuple[bytes, ...] | None:
    """The wisdom blobs stored at ``path`` for ``key``; None when missing, unreadable, corrupt or foreign (with a
    warning when ``warn``)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        problem = f"cannot be read ({exc})"
    else:
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or not isinstance(data.get("fftw_wisdom"), list):
                raise ValueError("no fftw_wisdom list")
            if data.get("key") != key:
                problem = (f"was written for another machine, library version or planner effort "
                           f"({data.get('key')!r}, this process: {key!r})")
            else:
                return tuple(str(b).encode("ascii") for b in data["fftw_wisdom"])
        except (ValueError, UnicodeEncodeError) as exc:
            problem = f"is not a wisdom cache ({exc})"
    if warn:
        warnings.warn(f"{path}: the FFTW wisdom cache {problem}; ignoring it (FFTW plans again and the next save "
                      "replaces it; ZNN_FFTW_WISDOM=off turns the cache off)", RuntimeWarning, stacklevel=4)
    return None


@dataclass
class _State:
    """This process's cache: whether it was looked at, its file and key, plans made and plans saved so far."""

    loaded: bool = False
    path: Path | None = None
    key: dict[str, Any] = field(default_factory=dict)
    planned: int = 0
    planning_s: float = 0.0
    saved: int = 0


_STATE = _State()
_STATE_LOCK = threading.Lock()


def ensure_cache_loaded(effort: str) -> Path | None:
    """Import the cache of key ``effort`` into FFTW, once per process (later calls return at once); the file, or
    None when the cache is off. Registers :func:`save_cache` to run at exit."""
    if _STATE.loaded:
        return _STATE.path
    with _STATE_LOCK:
        if _STATE.loaded:
            return _STATE.path
        _STATE.loaded = True
        if not cache_enabled():
            return None
        key = cache_key(effort)
        path = cache_file(key)
        _STATE.path, _STATE.key = path, key
        blobs = _read(path, key, warn=True)
        if blobs is not None:
            with PLANNER_LOCK:
                accepted = pyfftw.import_wisdom(blobs)
            if not any(accepted):
                warnings.warn(f"{path}: FFTW refused the wisdom cache; ignoring it (the next save replaces it)",
                              RuntimeWarning, stacklevel=3)
        atexit.register(save_cache)
        return path


def note_planned(seconds: float) -> None:
    """Record that FFTW measured a new plan in ``seconds`` (so :func:`save_cache` has something to save). Called
    by :mod:`znn.ops.fft` with :data:`PLANNER_LOCK` held."""
    _STATE.planned += 1
    _STATE.planning_s += seconds


def planning() -> tuple[int, float]:
    """(plans FFTW measured, seconds it took) in this process so far: what the cache saves the next process."""
    return _STATE.planned, _STATE.planning_s


def save_cache() -> Path | None:
    """Write this process's wisdom into its cache file when it planned anything since the last save, merged with
    what the file holds now; returns the file when written. Cheap when there is nothing new (a dense run calls it
    after every block)."""
    if _STATE.path is None or _STATE.planned == _STATE.saved:
        return None
    with _STATE_LOCK:
        planned, path = _STATE.planned, _STATE.path
        if planned == _STATE.saved:
            return None
        _STATE.saved = planned  # a cache that cannot be written is not retried after every block
        try:
            _merge_and_write(path, _STATE.key)
        except (OSError, TimeoutError) as exc:
            warnings.warn(f"{path}: cannot write the FFTW wisdom cache ({exc}); set ZNN_CACHE_DIR to a writable "
                          "folder or ZNN_FFTW_WISDOM=off", RuntimeWarning, stacklevel=2)
            return None
        return path


def _merge_and_write(path: Path, key: dict[str, Any]) -> None:
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=_LOCK_TIMEOUT_S):
        theirs = _read(path, key, warn=False)
        with PLANNER_LOCK:
            mine = pyfftw.export_wisdom()
            if theirs is not None:
                pyfftw.import_wisdom(theirs)  # the union of both ...
                pyfftw.import_wisdom(mine)  # ... with this process's plans winning a conflict
            blobs = pyfftw.export_wisdom()
        text = json.dumps({"key": key, "fftw_wisdom": [b.decode("ascii") for b in blobs]}, indent=1)
        fd, tmp = tempfile.mkstemp(prefix=".wisdom-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
