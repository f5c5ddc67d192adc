"""HDF5 volumes (``file.h5``, ``.hdf5``, ``.hdf``): one dataset, named as ``file.h5:/group/dataset``.

Without a dataset name a file must hold exactly one dataset. Lazy reads open the file inside each dask task
(the graph holds the path, never an h5py handle), so they run on dask.distributed too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask.array as da
import h5py
import numpy as np

from znn.errors import VolumeError, ZnnError
from znn.io.ngff import Resolution, resolution_of_h5
from znn.io.volume import (
    Chunks,
    VolumePath,
    atomic_file,
    check_volume,
    default_chunks,
    exists_error,
    iter_blocks,
    lazy_array,
    not_found,
    storage_chunks,
)

__all__ = ["read", "open", "shape_dtype", "write", "resolution", "H5BlockReader", "DEFAULT_KEY", "COMPRESSIONS",
           "H5_ERRORS"]

DEFAULT_KEY = "main"  # dataset written for a path without ":/dataset"
COMPRESSIONS = ("gzip", "lzf", "szip")
# What h5py raises for a damaged or foreign file: HDF5's error codes mapped onto builtins (h5py/_errors.pyx), so
# the class depends on where the damage is rather than on what is wrong. Readers treat them alike.
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, NotImplementedError)


def _h5file(path: Path, vp: VolumePath, mode: str = "r") -> h5py.File:
    try:
        return h5py.File(path, mode)
    except OSError as err:
        raise VolumeError(f"{vp}: not a readable HDF5 file ({err})") from err


@contextmanager
def _reading(vp: VolumePath) -> Iterator[h5py.File]:
    """The file open to read; whatever h5py raises while it is used becomes a VolumeError naming it."""
    try:
        with h5py.File(vp.file, "r") as f:
            yield f
    except ZnnError:
        raise
    except H5_ERRORS as err:
        raise VolumeError(f"{vp}: not a readable HDF5 file ({type(err).__name__}: {err})") from err


def _datasets(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return sorted(names)


def _dataset(f: h5py.File, vp: VolumePath) -> h5py.Dataset:
    """The dataset ``vp`` names, or the file's only one; errors list the datasets there are."""
    names = _datasets(f)
    if vp.key is None and len(names) == 1:
        return f[names[0]]
    node = f.get(vp.key) if vp.key is not None else None
    if isinstance(node, h5py.Dataset):
        return node
    raise not_found(vp, "dataset", names, lambda name: f"{vp.file}:/{name}")


def _checked(dset: h5py.Dataset, vp: VolumePath) -> tuple[tuple[int, ...], np.dtype[Any]]:
    shape, dtype = tuple(int(n) for n in dset.shape), np.dtype(dset.dtype)
    check_volume(shape, dtype, vp)
    return shape, dtype


def shape_dtype(vp: VolumePath) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype of the dataset, from its header."""
    with _reading(vp) as f:
        return _checked(_dataset(f, vp), vp)


def read(vp: VolumePath) -> np.ndarray:
    """The whole dataset in its stored dtype."""
    with _reading(vp) as f:
        dset = _dataset(f, vp)
        _checked(dset, vp)
        return np.asarray(dset[()])


def resolution(vp: VolumePath) -> Resolution | None:
    """The voxel size in the dataset's ``resolution`` (nm) or ``element_size_um`` attribute (None: neither)."""
    with _reading(vp) as f:
        return resolution_of_h5(dict(_dataset(f, vp).attrs))


class H5BlockReader:
    """Picklable reader for dask: each ``__getitem__`` opens the file, reads the region and closes it."""

    def __init__(self, path: Path, key: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        self.path, self.key, self.shape, self.dtype, self.ndim = str(path), key, shape, dtype, len(shape)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        with _reading(VolumePath("h5", Path(self.path), self.key.lstrip("/"))) as f:
            return np.asarray(f[self.key][key])


def open(vp: VolumePath, chunks: Chunks) -> da.Array:  # noqa: A001 - the backend interface's name
    """Lazy dask array; default blocks are multiples of the stored chunks near ``array.chunk-size``."""
    with _reading(vp) as f:
        dset = _dataset(f, vp)
        shape, dtype = _checked(dset, vp)
        key, stored = dset.name, dset.chunks
    reader = H5BlockReader(vp.file, key, shape, dtype)
    return lazy_array(reader, VolumePath("h5", vp.file, key.lstrip("/")), default_chunks(shape, dtype, stored,
                                                                                         chunks))


def _has_dataset(vp: VolumePath) -> bool:
    with _reading(vp) as f:
        return isinstance(f.get(vp.key), h5py.Dataset)


def _fill(f: h5py.File, key: str, array: np.ndarray | da.Array, chunks: tuple[int, ...] | None,
          compression: str | None, vp: VolumePath) -> None:
    if compression is not None and compression not in COMPRESSIONS:
        raise VolumeError(f"{vp}: unknown h5 compression {compression!r}; valid: {', '.join(COMPRESSIONS)}")
    if key in f:
        del f[key]
    if isinstance(array, np.ndarray):
        f.create_dataset(key, data=array, chunks=chunks, compression=compression)
        return
    dset = f.create_dataset(key, shape=array.shape, dtype=array.dtype, chunks=chunks, compression=compression)
    for region, block in iter_blocks(array):
        dset[region] = block


def write(vp: VolumePath, array: np.ndarray | da.Array, chunks: Chunks, overwrite: bool,
          compression: str | None) -> None:
    """Write one dataset through a temporary sibling file renamed on success.

    ``file.h5`` (no dataset named) replaces the whole file with one dataset ``main``; ``file.h5:/a/b``
    adds or (with ``overwrite``) replaces dataset ``a/b``, keeping the file's other datasets.
    """
    h5chunks = storage_chunks(chunks, tuple(array.shape), vp)
    add = vp.key is not None and vp.file.exists()
    if add and _has_dataset(vp) and not overwrite:
        raise exists_error(vp, "dataset")
    with atomic_file(vp.file, overwrite, vp, copy_existing=add) as tmp:
        with _h5file(tmp, vp, "a" if add else "w") as f:
            _fill(f, vp.key or DEFAULT_KEY, array, h5chunks, compression, vp)
