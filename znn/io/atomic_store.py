"""A zarr ``LocalStore`` whose writes are atomic: a reader, or a rerun after a crash, sees a key's old bytes or its new
bytes, never part of a write.

Every ``set`` writes the value to a temporary file under ``<root>/.znn-partial/``, flushes it to disk (fsync), then
renames it onto the key's path with :func:`os.replace` (atomic within one file system). A process or dask worker
killed mid-write (SIGKILL, out of memory, a lost node) therefore leaves at most an orphan temporary file, which
:func:`clear_partial` removes before the next run writes; the chunk it was writing keeps its previous content (or
stays absent, i.e. reads as the fill value), and the block's manifest marker, written only after the chunk, is
absent too, so the rerun redoes that block.

This does not rely on the installed zarr's own write path (recent zarr releases also rename into place, older ones
wrote in place), and it keeps temporary files out of the chunk directories, so a crash never leaves stray files
next to chunks.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from zarr.storage import LocalStore

__all__ = ["AtomicLocalStore", "PARTIAL_DIR", "atomic_write_bytes", "clear_partial"]

PARTIAL_DIR = ".znn-partial"


def _write_all(path: Path, data: Any, fsync: bool) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def atomic_write_bytes(root: Path, path: Path, data: Any, exclusive: bool = False, fsync: bool = True) -> None:
    """Write ``data`` (any buffer) to ``path`` so that ``path`` holds either its old content or all of ``data``.

    The temporary file lives in ``root/.znn-partial`` (the same file system as ``path``; next to ``path`` if the
    rename crosses file systems). ``exclusive``: fail with FileExistsError if ``path`` exists (the check and the
    move are one atomic ``link``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = root / PARTIAL_DIR
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{uuid.uuid4().hex}.tmp"
    try:
        _write_all(tmp, data, fsync)
        try:
            _move(tmp, path, exclusive)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # the key's directory is on another file system (a mount inside the store): stage next to it
            near = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            shutil.copyfile(tmp, near)
            tmp.unlink()
            tmp = near
            _move(tmp, path, exclusive)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _move(tmp: Path, path: Path, exclusive: bool) -> None:
    if exclusive:
        os.link(tmp, path)  # FileExistsError if the key exists: nothing written
        tmp.unlink()
    else:
        os.replace(tmp, path)


def clear_partial(root: str | os.PathLike[str]) -> None:
    """Remove temporary files left by writers that died mid-write (call before a run writes into the store)."""
    shutil.rmtree(Path(root) / PARTIAL_DIR, ignore_errors=True)


class AtomicLocalStore(LocalStore):
    """A :class:`zarr.storage.LocalStore` whose ``set`` writes to a temporary file and renames it into place.

    ``fsync`` (default on): flush each value to disk before the rename, so that after a power loss a key holds old
    or new bytes too (not only after a process dies).
    """

    def __init__(self, root: Path | str, *, read_only: bool = False, fsync: bool = True) -> None:
        super().__init__(root, read_only=read_only)
        self.fsync = fsync

    def with_read_only(self, read_only: bool = False) -> "AtomicLocalStore":
        return type(self)(self.root, read_only=read_only, fsync=self.fsync)

    def _put(self, key: str, value: Any, exclusive: bool = False) -> None:
        self._check_writable()
        view = value.as_buffer_like() if hasattr(value, "as_buffer_like") else value.as_numpy_array()
        atomic_write_bytes(self.root, self.root / key, view, exclusive, self.fsync)

    async def set(self, key: str, value: Any) -> None:
        if not self._is_open:
            await self._open()
        await asyncio.to_thread(self._put, key, value)

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        if not self._is_open:
            await self._open()
        try:
            await asyncio.to_thread(self._put, key, value, True)
        except FileExistsError:
            pass

    def set_sync(self, key: str, value: Any) -> None:
        self._ensure_open_sync()
        self._put(key, value)
