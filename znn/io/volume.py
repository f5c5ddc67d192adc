"""One interface to tif, h5 and zarr volumes: path parsing, validation and a registry of format modules.

A volume is a 2D to 4D array ``(channels, z, y, x)`` (leading axes optional) of an integer or float dtype.
Paths name the file and, where the format has them, the dataset inside it:

- ``file.tif`` / ``file.tiff``
- ``file.h5`` / ``file.hdf5`` / ``file.hdf`` (its only dataset) or ``file.h5:/group/dataset``
- ``store.zarr`` (an array at the root) or ``store.zarr/group/array``

Any of them may end in ``[start:stop]``: only those z slices (0-based, stop excluded, as Python slicing; either
bound may be left out), e.g. ``train-volume.tif[0:15]`` for the first 15 sections. Reading, opening lazily and
shapes honour it; writing to such a path is refused.

Each format lives in its own module (``tif``, ``hdf5``, ``zarrvol``) exposing the functions of
:class:`VolumeBackend`; this module validates arguments and dispatches to them.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeGuard, cast

import dask.array as da
import numpy as np
from dask.base import compute, tokenize

from znn.errors import VolumeError, ZnnFileNotFoundError
from znn.io.ngff import Resolution

if TYPE_CHECKING:
    import zarr

__all__ = [
    "Chunks",
    "VolumeFormat",
    "VolumePath",
    "parse_volume_path",
    "read_volume",
    "open_volume",
    "write_volume",
    "volume_shape_dtype",
    "volume_resolution",
    "create_volume",
]

VolumeFormat = Literal["tif", "h5", "zarr"]
Chunks = tuple[int, ...] | tuple[tuple[int, ...], ...] | int | str | None

MIN_NDIM, MAX_NDIM = 2, 4
PATH_SYNTAX = ("file.tif, file.tiff, file.h5[:/group/dataset] (.hdf5, .hdf), store.zarr[/group/array], each "
               "optionally followed by a z range [start:stop]")
_ZRANGE_RE = re.compile(r"^(?P<path>.+)\[(?P<start>[^:\]]*):(?P<stop>[^:\]]*)\]$")
_H5_RE = re.compile(r"^(?P<file>.+\.(?:h5|hdf5|hdf))(?::(?P<key>.*))?$", re.IGNORECASE)
_TIF_SUFFIXES = (".tif", ".tiff")
_BACKENDS: dict[str, str] = {"tif": "znn.io.tif", "h5": "znn.io.hdf5", "zarr": "znn.io.zarrvol"}


@dataclass(frozen=True)
class VolumePath:
    """A parsed volume path: the format, the file (or zarr store directory) and the dataset key inside it."""

    format: VolumeFormat
    file: Path
    key: str | None = None  # h5 dataset or zarr array path without leading '/'; None: the file's only one
    zrange: tuple[int | None, int | None] | None = None  # z slices [start:stop] to use; None: all

    def __str__(self) -> str:
        text = str(self.file) if self.key is None else (
            f"{self.file}:/{self.key}" if self.format == "h5" else f"{self.file}/{self.key}")
        if self.zrange is None:
            return text
        start, stop = ("" if v is None else str(v) for v in self.zrange)
        return f"{text}[{start}:{stop}]"

    def z_slice(self, shape: tuple[int, ...]) -> slice:
        """The z slice of a volume of ``shape``; VolumeError if the volume has no z axis or the range is empty."""
        assert self.zrange is not None
        if len(shape) < 3:
            raise VolumeError(f"{self}: a z range needs a volume with a z axis, this one is 2D {shape}; drop "
                              f"[{self.zrange[0] or ''}:{self.zrange[1] or ''}]")
        z = shape[-3]
        low, high = self.zrange
        # slicing would clip a range past the end to the slices there are: the user asked for others
        if (low is not None and low >= z) or (high is not None and high > z):
            raise VolumeError(f"{self}: the z range goes past the end of the volume's {z} z slices (shape "
                              f"{shape}); give [start:stop] with 0 <= start < stop <= {z}")
        start, stop, _ = slice(*self.zrange).indices(z)
        if stop <= start:
            raise VolumeError(f"{self}: the z range selects no slice of the {z} z slices in the volume; give "
                              f"[start:stop] with 0 <= start < stop <= {z}")
        return slice(start, stop)


class VolumeBackend(Protocol):
    """What each format module provides; ``vp.file`` exists when a reader is called."""

    def read(self, vp: VolumePath) -> np.ndarray: ...
    def open(self, vp: VolumePath, chunks: Chunks) -> da.Array: ...
    def shape_dtype(self, vp: VolumePath) -> tuple[tuple[int, ...], np.dtype[Any]]: ...
    def write(self, vp: VolumePath, array: np.ndarray | da.Array, chunks: Chunks, overwrite: bool,
              compression: str | None) -> None: ...
    def resolution(self, vp: VolumePath) -> Resolution | None: ...


class ZarrBackend(VolumeBackend, Protocol):
    """The zarr backend also creates empty arrays to be filled chunk by chunk."""

    def create(self, vp: VolumePath, shape: tuple[int, ...], dtype: np.dtype[Any], chunks: tuple[int, ...] | None,
               overwrite: bool) -> zarr.Array[Any]: ...
    def origin(self, vp: VolumePath) -> tuple[float, float, float]: ...


def parse_volume_path(path: str | os.PathLike[str] | VolumePath) -> VolumePath:
    """Split ``path`` into format, file and dataset key; raise :class:`VolumeError` on an unknown syntax."""
    if isinstance(path, VolumePath):
        return path
    text = os.fspath(path)
    zrange = None
    ranged = _ZRANGE_RE.match(text)
    if ranged:
        text, zrange = ranged.group("path"), _parse_zrange(ranged.group("start"), ranged.group("stop"),
                                                           ranged.group("path"))
    h5 = _H5_RE.match(text)
    if h5:
        key = (h5.group("key") or "").strip("/")
        return VolumePath("h5", Path(h5.group("file")), key or None, zrange)
    parts = Path(text).parts
    for i, part in enumerate(parts):
        if part.lower().endswith(".zarr"):
            return VolumePath("zarr", Path(*parts[: i + 1]), "/".join(parts[i + 1 :]) or None, zrange)
    if text.lower().endswith(_TIF_SUFFIXES):
        return VolumePath("tif", Path(text), None, zrange)
    raise VolumeError(f"{text}: cannot tell the volume format from the path; valid forms: {PATH_SYNTAX}")


def _parse_zrange(start: str, stop: str, path: str) -> tuple[int | None, int | None]:
    try:
        low, high = (int(v) if v.strip() else None for v in (start, stop))
    except ValueError:
        raise VolumeError(f"{path}[{start}:{stop}]: the z range must be [start:stop] with integers, e.g. "
                          f"{path}[0:15]") from None
    if any(b is not None and b < 0 for b in (low, high)):
        raise VolumeError(f"{path}[{start}:{stop}]: z range bounds count from 0; give non-negative integers")
    return low, high


def _backend(fmt: str) -> VolumeBackend:
    """The format module registered for ``fmt`` (imported on first use, so h5py loads only when needed)."""
    return cast(VolumeBackend, importlib.import_module(_BACKENDS[fmt]))


def _existing(path: str | os.PathLike[str] | VolumePath) -> VolumePath:
    vp = parse_volume_path(path)
    if not vp.file.exists():
        raise ZnnFileNotFoundError(f"{vp.file}: no such file or directory (volume {vp})")
    if vp.file.is_dir() != (vp.format == "zarr"):
        what = "a file, but a zarr store is a folder" if vp.format == "zarr" else "a folder, not a file"
        raise VolumeError(f"{vp.file}: is {what}; check the path and its suffix ({PATH_SYNTAX})")
    return vp


def read_volume(path: str | os.PathLike[str] | VolumePath) -> np.ndarray:
    """Read a whole volume into memory: an array of 2 to 4 dims ``([c,] [z,] y, x)`` in the file's dtype."""
    vp = _existing(path)
    if vp.zrange is None:
        return _backend(vp.format).read(vp)
    shape, _ = _backend(vp.format).shape_dtype(vp)
    z = vp.z_slice(shape)
    lazy = _backend(vp.format).open(vp, None)[(..., z, slice(None), slice(None))]
    slices: np.ndarray = lazy.compute(scheduler="sync")
    return slices


def open_volume(path: str | os.PathLike[str] | VolumePath, chunks: Chunks = None) -> da.Array:
    """Open a volume lazily as a dask array of the file's shape and dtype.

    ``chunks`` defaults to the store's chunks for zarr and to multiples of the stored chunks (h5) or pages
    (tif) near dask's ``array.chunk-size``. The graph holds paths, never open file handles, so it runs on
    dask.distributed too.
    """
    vp = _existing(path)
    if vp.zrange is None:
        return _backend(vp.format).open(vp, chunks)
    shape, _ = _backend(vp.format).shape_dtype(vp)
    z = vp.z_slice(shape)
    whole: da.Array = _backend(vp.format).open(vp, None)[(..., z, slice(None), slice(None))]
    if chunks is None:
        return whole
    rechunked: da.Array = whole.rechunk(chunks)
    return rechunked


def volume_shape_dtype(path: str | os.PathLike[str] | VolumePath) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """The volume's shape and dtype, read from metadata only."""
    vp = _existing(path)
    shape, dtype = _backend(vp.format).shape_dtype(vp)
    if vp.zrange is not None:
        z = vp.z_slice(shape)
        shape = (*shape[:-3], z.stop - z.start, *shape[-2:])
    return shape, dtype


def volume_origin(path: str | os.PathLike[str] | VolumePath) -> tuple[float, float, float]:
    """Where the volume's voxel 0 lies along z, y, x, in its voxels: an OME-Zarr image's translation over its scale
    (:func:`znn.io.ngff.origin_of`), plus the first slice of a z range; 0 for tif and h5, which record none here.
    A volume derived voxel for voxel (a segmentation of a prediction) takes it, so viewers overlay the two."""
    vp = _existing(path)
    origin = cast(ZarrBackend, _backend("zarr")).origin(vp) if vp.format == "zarr" else (0.0, 0.0, 0.0)
    if vp.zrange is None:
        return origin
    start = vp.z_slice(volume_shape_dtype(replace(vp, zrange=None))[0]).start
    return origin[0] + start, origin[1], origin[2]


def volume_resolution(path: str | os.PathLike[str] | VolumePath) -> Resolution | None:
    """The voxel size the volume's own metadata gives (None: it gives none): an OME-Zarr image's scale and units
    (:mod:`znn.io.ngff`), an h5 dataset's ``resolution`` (nm) or ``element_size_um`` attribute; tif: none."""
    vp = _existing(path)
    return _backend(vp.format).resolution(vp)


def write_volume(
    path: str | os.PathLike[str] | VolumePath,
    array: np.ndarray | da.Array,
    chunks: Chunks = None,
    overwrite: bool = False,
    *,
    compression: str | None = None,
) -> None:
    """Write a 2D to 4D NumPy or dask array; dask arrays are computed and written block by block.

    ``chunks`` is the on-disk chunking (zarr, h5). ``compression`` is an h5 filter (``"gzip"``, ``"lzf"``);
    zarr always compresses with its default codec, tif is written uncompressed. A file that exists is
    replaced only with ``overwrite=True``; a failed write leaves no partial file behind.
    """
    vp = _writable(parse_volume_path(path))
    if not isinstance(array, da.Array):
        array = np.asarray(array)
    check_volume(array.shape, array.dtype, vp)
    if compression is not None and vp.format != "h5":
        raise VolumeError(f"{vp}: compression={compression!r} applies to h5 volumes only; leave it None")
    _backend(vp.format).write(vp, array, chunks, overwrite, compression)


def create_volume(
    path: str | os.PathLike[str] | VolumePath,
    shape: tuple[int, ...],
    dtype: np.typing.DTypeLike,
    chunks: tuple[int, ...],
    overwrite: bool = False,
) -> zarr.Array[Any]:
    """Create an empty (zero-filled) zarr array of ``shape`` to be filled chunk by chunk; zarr only."""
    vp = _writable(parse_volume_path(path))
    if vp.format != "zarr":
        raise VolumeError(f"{vp}: create_volume writes zarr only; name a store such as out.zarr or "
                          f"out.zarr/group/array")
    check_volume(tuple(shape), np.dtype(dtype), vp)
    zarr_backend = cast(ZarrBackend, _backend("zarr"))  # through the registry: zarrvol imports this module
    return zarr_backend.create(vp, tuple(shape), np.dtype(dtype), tuple(chunks), overwrite)


def _writable(vp: VolumePath) -> VolumePath:
    if vp.zrange is not None:
        raise VolumeError(f"{vp}: a z range selects slices to read; write to the path without it")
    return vp


# ---- helpers shared by the format modules ----------------------------------------------------------------


def check_volume(shape: tuple[int, ...], dtype: np.dtype[Any], vp: VolumePath) -> None:
    """Raise :class:`VolumeError` unless ``shape`` has 2 to 4 dims and ``dtype`` is an integer or float."""
    if not MIN_NDIM <= len(shape) <= MAX_NDIM:
        raise VolumeError(f"{vp}: a {len(shape)}D array of shape {shape}; volumes are 2D to 4D "
                          f"(channels, z, y, x)")
    if dtype.kind not in "iuf":
        raise VolumeError(f"{vp}: dtype {dtype} is not supported; use an integer or float dtype such as "
                          f"uint8, uint16, int32, float32 or float64")


def exists_error(vp: VolumePath, what: str = "file") -> VolumeError:
    """The error for a write that would replace existing data without ``overwrite=True``."""
    return VolumeError(f"{vp}: the {what} exists; pass overwrite=True to replace it")


def not_found(vp: VolumePath, kind: str, names: list[str], example: Callable[[str], str]) -> VolumeError:
    """The error for a dataset/array that is missing or ambiguous, listing what the file holds."""
    if not names:
        return VolumeError(f"{vp.file} holds no {kind}s")
    listing = f"{len(names)} {kind}{'s' if len(names) > 1 else ''} ({', '.join(names)})"
    if vp.key is None:
        return VolumeError(f"{vp.file} holds {listing}; name one as {example(names[0])}")
    return VolumeError(f"{vp.file} has no {kind} {vp.key!r}; it holds {listing}, e.g. {example(names[0])}")


def default_chunks(shape: tuple[int, ...], dtype: np.dtype[Any], stored: tuple[int, ...] | None,
                   chunks: Chunks) -> tuple[tuple[int, ...], ...]:
    """Dask chunks: ``chunks`` if given, else multiples of the ``stored`` chunks near ``array.chunk-size``."""
    normalized: tuple[tuple[int, ...], ...]
    if chunks is None:
        normalized = da.core.normalize_chunks("auto", shape, dtype=dtype, previous_chunks=stored)
    else:
        normalized = da.core.normalize_chunks(chunks, shape, dtype=dtype)
    return normalized


def lazy_array(reader: Any, vp: VolumePath, chunks: tuple[tuple[int, ...], ...]) -> da.Array:
    """Wrap a picklable ``reader`` (``shape``, ``dtype``, ``__getitem__`` opening the file per call).

    The key token includes the file's size and modification time so a rewritten file gets new keys.
    """
    stat = vp.file.stat()
    name = f"from-{vp.format}-" + tokenize(str(vp.file.resolve()), vp.key, stat.st_size, stat.st_mtime_ns,
                                           chunks)
    meta = np.empty((0,) * len(reader.shape), dtype=reader.dtype)
    lazy: da.Array = da.from_array(reader, chunks=chunks, name=name, meta=meta, asarray=True, fancy=False)
    return lazy


def storage_chunks(chunks: Chunks, shape: tuple[int, ...], vp: VolumePath) -> tuple[int, ...] | None:
    """On-disk chunk shape from ``chunks`` (None, an int, or one int per axis), clipped to ``shape``."""
    if chunks is None:
        return None
    if isinstance(chunks, int):
        chunks = (chunks,) * len(shape)
    if not _is_chunk_shape(chunks, len(shape)):
        raise VolumeError(f"{vp}: chunks={chunks!r} is not a chunk shape for an array of shape {shape}; "
                          f"give one positive int per axis, e.g. {tuple(min(s, 64) for s in shape)}")
    return tuple(max(1, min(c, s)) for c, s in zip(chunks, shape))


def _is_chunk_shape(chunks: Chunks, ndim: int) -> TypeGuard[tuple[int, ...]]:
    """Whether ``chunks`` is one positive int per axis of an ``ndim``-dimensional array."""
    return (isinstance(chunks, tuple) and len(chunks) == ndim
            and all(isinstance(c, int) and c > 0 for c in chunks))


def iter_blocks(array: da.Array, batch: int | None = None) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
    """Yield ``(slices, block)`` for each block of ``array`` in C order.

    Blocks are computed ``batch`` at a time (default: one per core) with the current scheduler, so at most
    ``batch`` blocks are in memory.
    """
    batch = batch or os.cpu_count() or 1
    starts = [np.cumsum((0,) + c[:-1]) for c in array.chunks]
    indices = list(np.ndindex(*array.numblocks))
    for first in range(0, len(indices), batch):
        group = indices[first : first + batch]
        blocks = compute(*[array.blocks[index] for index in group])
        for index, block in zip(group, blocks):
            sl = tuple(slice(int(s[i]), int(s[i]) + c[i]) for s, c, i in zip(starts, array.chunks, index))
            yield sl, np.asarray(block)


def temp_sibling(path: Path) -> Path:
    """A unique hidden name in ``path``'s directory, keeping its suffix (so format sniffing still works)."""
    return path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:12]}{path.suffix}")


@contextmanager
def atomic_file(path: Path, overwrite: bool, vp: VolumePath, copy_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; rename it over ``path`` only if the block succeeds.

    With ``copy_existing`` the temporary starts as a copy of ``path`` (to add a dataset to an h5 file).
    """
    if path.exists() and not overwrite and not copy_existing:
        raise exists_error(vp)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        if copy_existing and path.exists():
            shutil.copy2(path, tmp)
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
