"""Where outputs may go, checked before a job writes anything.

Two checks every job makes on its outputs first:

- :func:`check_writable`: the output's place can take it: a file is not where a folder is needed (or the reverse),
  no parent is a file, and the folder it goes into accepts a new file (tried by creating and removing one, which
  is what counts: permission bits, a read-only mount, root's rights and ACLs all answer the same way);
- :func:`check_apart`: no output resolves to an input of the same job: not the same file, not the same zarr store,
  not one inside the other (symlinks and relative paths resolved; volume paths reduced to their file or store, so
  ``in.h5:/raw``, ``in.zarr/group/array`` and ``in.tif[0:10]`` all name the file they live in).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from znn.errors import OutputError, VolumeError
from znn.io.volume import parse_volume_path

__all__ = ["check_writable", "check_apart", "volume_file"]

#: a labelled path: (what it is for the user, e.g. "--json", the path as given)
Labelled = tuple[str, "str | os.PathLike[str]"]


def check_writable(path: str | os.PathLike[str], what: str, folder: bool, fix: str = "") -> Path:
    """``path`` as a Path when an output ``what`` (a file, or with ``folder`` a folder) can be created or replaced
    there; otherwise :class:`OutputError` naming ``what``, the path, the cause and ``fix``."""
    if not folder and str(path).endswith(("/", os.sep)):  # Path() would drop the slash and take the file there
        raise OutputError(f"{what} {path}: ends in a slash, so it names a folder; {fix or 'name a file'}")
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise OutputError(f"{what} {path}: is a file, but a folder goes there; {fix or 'name a folder'}")
        if not folder and path.is_dir():
            raise OutputError(f"{what} {path}: is a folder; {fix or 'name a file'}")
        _probe(path if folder else path.parent, path, what, fix)
        return path
    parent = _nearest_existing(path)
    if not parent.is_dir():
        raise OutputError(f"{what} {path}: {parent} is a file, not a folder; {fix or 'name a path in a folder'}")
    _probe(parent, path, what, fix)
    return path


def _nearest_existing(path: Path) -> Path:
    for parent in Path(os.path.abspath(path)).parents:
        if parent.exists():
            return parent
    return Path("/")


def _probe(folder: Path, path: Path, what: str, fix: str) -> None:
    """Create and remove a file in ``folder``: the one test of writability every platform and user agrees with."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".znn-write-probe-", dir=folder)
    except OSError as exc:
        raise OutputError(f"{what} {path}: cannot write in {folder} ({exc.strerror}); "
                          f"{fix or 'make it writable or name another place'}") from None
    os.close(fd)
    os.unlink(probe)


def volume_file(path: str | os.PathLike[str]) -> Path:
    """The file or zarr store that ``path`` (a volume path with its ``:/dataset``, ``/group/array`` or ``[z0:z1]``,
    or a plain path) lives in, absolute with symlinks resolved."""
    try:
        file = parse_volume_path(path).file
    except VolumeError:
        file = Path(path)
    return Path(os.path.abspath(file)).resolve()


def _overlap(output: Path, source: Path) -> str | None:
    """How ``output`` and ``source`` (resolved) share bytes: None when they do not."""
    if output == source or (output.exists() and source.exists() and os.path.samefile(output, source)):
        return "the same file or store"
    if source in output.parents:
        return f"inside {source}"
    if output in source.parents:
        return f"a folder holding {source}"
    return None


def check_apart(outputs: Iterable[Labelled], inputs: Iterable[Labelled], fix: str) -> None:
    """:class:`OutputError` naming both paths when an output resolves to an input (the same file or store, or one
    inside the other); ``fix`` says what to change."""
    sources = [(label, str(path), volume_file(path)) for label, path in inputs if "://" not in str(path)]
    for out_label, out_path in outputs:
        output = volume_file(out_path)
        for in_label, in_path, source in sources:
            how = _overlap(output, source)
            if how is not None:
                raise OutputError(f"{out_label} {out_path} would write over {in_label} {in_path} ({how}); "
                                  f"{fix}")
