"""Zarr volumes (zarr-python 3; v3 written, v2 and v3 read): ``store.zarr`` or ``store.zarr/group/array``.

The store is a local directory. Every volume written is an OME-Zarr image (:mod:`znn.io.ngff`): a group holding
its full-resolution array ``0`` (and any downsampled levels) with NGFF 0.5 metadata. A path that ends at such an
image group means its level 0; a path that ends at another group holding exactly one volume (an image, or an array
outside any image, at any depth) means that volume, so ``out.zarr/output`` and plain arrays of older stores read
alike. Lazy reads use the store's chunks; writes create the image, then fill it chunk-aligned, and a failed write
removes what it created.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr
from dask.base import tokenize
from zarr.errors import BaseZarrError, NodeNotFoundError, ZarrUserWarning
from zarr.storage import LocalStore

from znn.errors import VolumeError, ZnnError
from znn.io.ngff import ImageMeta, Resolution, create_image, level_zero, origin_of, resolution_of
from znn.io.volume import (
    Chunks,
    VolumePath,
    check_volume,
    exists_error,
    not_found,
    storage_chunks,
)

__all__ = ["read", "open", "shape_dtype", "write", "create", "resolution", "origin", "ZarrBlockReader", "ZARR_ERRORS"]

# What zarr raises for a damaged or foreign store: metadata that is not JSON or not valid zarr (ValueError, which
# zarr's own errors are, TypeError or KeyError, depending on the step that meets it), a chunk its codec cannot
# decode (numcodecs raises RuntimeError) and a metadata file that cannot be read (OSError: a folder in its place).
ZARR_ERRORS = (ValueError, TypeError, KeyError, IndexError, RuntimeError, OSError)


@contextmanager
def _reading(vp: VolumePath) -> Iterator[None]:
    """Whatever zarr raises while the block reads ``vp`` becomes a VolumeError naming the store."""
    try:
        yield
    except ZnnError:
        raise
    except ZARR_ERRORS as err:
        raise VolumeError(f"{vp}: not a readable zarr array ({type(err).__name__}: {err})") from err


def _volumes(group: zarr.Group) -> list[str]:
    """Paths (from the store root) of the volumes under ``group``: its OME-Zarr images (read at level 0) and the
    arrays outside them; the label images inside an image (a segmentation store's) are part of it."""
    images, arrays = [], []
    with warnings.catch_warnings():  # the stores of older runs hold our folders (run manifest, partial writes)
        warnings.simplefilter("ignore", ZarrUserWarning)
        members = list(group.members(max_depth=None))
    for _, member in members:
        if isinstance(member, zarr.Array):
            arrays.append(member.path)
        elif level_zero(member.attrs.asdict()) is not None:
            images.append(member.path)
    inside = tuple(f"{image}/" for image in images)
    return sorted([i for i in images if not i.startswith(inside)] + [a for a in arrays if not a.startswith(inside)])


def _store_volumes(vp: VolumePath) -> list[str]:
    try:
        return _volumes(zarr.open_group(LocalStore(vp.file, read_only=True), mode="r"))
    except ZARR_ERRORS:  # no group, or a damaged one: list nothing
        return []


def _array(vp: VolumePath) -> zarr.Array[Any]:
    """The array ``vp`` names (read-only): the array itself, an image group's level 0, or the only volume under the
    group it names."""
    store = LocalStore(vp.file, read_only=True)
    try:
        node = zarr.open(store, path=vp.key or "", mode="r")
    except NodeNotFoundError:
        raise not_found(vp, "array", _store_volumes(vp), lambda name: f"{vp.file}/{name}") from None
    if isinstance(node, zarr.Array):
        return node
    level = level_zero(node.attrs.asdict())
    if level is not None:
        return _level(store, node, level, vp)
    names = _volumes(node)
    if len(names) == 1:
        return _array(VolumePath("zarr", vp.file, names[0], vp.zrange))
    if vp.key is None or not names:
        raise not_found(vp, "array", names, lambda name: f"{vp.file}/{name}")
    raise VolumeError(f"{vp} is a group holding {len(names)} volumes ({', '.join(names)}); name one as "
                      f"{vp.file}/{names[0]}")


def _level(store: LocalStore, image: zarr.Group, level: str, vp: VolumePath) -> zarr.Array[Any]:
    """The array ``level`` of OME-Zarr image group ``image``."""
    path = f"{image.path}/{level}" if image.path else level
    try:
        return zarr.open_array(store, path=path, mode="r")
    except (NodeNotFoundError, *ZARR_ERRORS) as err:
        raise VolumeError(f"{vp}: not a readable zarr array (level {level!r} of an OME-Zarr image: "
                          f"{type(err).__name__}: {err})") from err


def _image_attrs(vp: VolumePath) -> tuple[dict[str, Any], str] | None:
    """The attributes of the group holding the array ``vp`` means, and the array's name there (None: an array at
    the store's root, in no image)."""
    z = _array(vp)
    parent, _, name = z.path.rpartition("/")
    if not name:
        return None
    group = zarr.open_group(LocalStore(vp.file, read_only=True), path=parent, mode="r")
    return group.attrs.asdict(), name


def resolution(vp: VolumePath) -> Resolution | None:
    """The voxel size of the array ``vp`` means, from the OME-Zarr metadata of the image holding it (None: none)."""
    with _reading(vp):
        found = _image_attrs(vp)
        return None if found is None else resolution_of(found[0], found[1])


def origin(vp: VolumePath) -> tuple[float, float, float]:
    """Where voxel 0 of the array ``vp`` means lies, in its voxels, from the translation of the image holding it (0
    without one)."""
    with _reading(vp):
        found = _image_attrs(vp)
        return (0.0, 0.0, 0.0) if found is None else origin_of(found[0], found[1])


def _checked(z: zarr.Array[Any], vp: VolumePath) -> zarr.Array[Any]:
    check_volume(tuple(z.shape), np.dtype(z.dtype), vp)
    return z


def shape_dtype(vp: VolumePath) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype from the array's metadata."""
    with _reading(vp):
        z = _checked(_array(vp), vp)
        return tuple(z.shape), np.dtype(z.dtype)


def read(vp: VolumePath) -> np.ndarray:
    """The whole array in its stored dtype."""
    with _reading(vp):
        return np.asarray(_checked(_array(vp), vp)[...])


class ZarrBlockReader:
    """The array for dask, with a damaged chunk reported as a VolumeError naming the store."""

    def __init__(self, z: zarr.Array[Any], vp: VolumePath) -> None:
        self.z, self.vp, self.shape, self.dtype, self.ndim = z, vp, tuple(z.shape), np.dtype(z.dtype), z.ndim

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        with _reading(self.vp):
            return np.asarray(self.z[key])


def open(vp: VolumePath, chunks: Chunks) -> da.Array:  # noqa: A001 - the backend interface's name
    """Lazy dask array over the store, one block per stored chunk unless ``chunks`` says otherwise."""
    with _reading(vp):
        z = _checked(_array(vp), vp)
        stored = da.core.normalize_chunks(z.chunks, z.shape, dtype=z.dtype)  # damaged metadata fails here
    chunks = stored if chunks is None else chunks
    reader = ZarrBlockReader(z, vp)
    lazy: da.Array = da.from_array(reader, chunks, name="from-zarr-" + tokenize(z, chunks), asarray=True,
                                   fancy=False, meta=np.empty((0,) * z.ndim, dtype=z.dtype))
    return lazy


def create(vp: VolumePath, shape: tuple[int, ...], dtype: np.dtype[Any], chunks: tuple[int, ...] | None,
           overwrite: bool) -> zarr.Array[Any]:
    """Create a zero-filled OME-Zarr image at ``vp`` (voxel size unknown: scale 1) and return its level-0 array;
    ``chunks`` None lets zarr choose."""
    disk_chunks = storage_chunks(chunks, shape, vp)
    if not overwrite and _node_exists(vp):
        raise exists_error(vp, "array")
    try:
        create_image(vp.file, vp.key or "", shape, disk_chunks, dtype, ImageMeta())
        return zarr.open_array(LocalStore(vp.file), path=f"{vp.key}/0" if vp.key else "0", mode="r+")
    except BaseZarrError as err:
        raise VolumeError(f"{vp}: cannot create the array there ({err})") from err


def _node_exists(vp: VolumePath) -> bool:
    node = vp.file / vp.key if vp.key else vp.file
    return any((node / meta).exists() for meta in ("zarr.json", ".zarray", ".zgroup"))


def _first_missing(vp: VolumePath) -> Path | None:
    """The outermost directory on the way to the array that does not exist yet (None: all exist)."""
    path = vp.file
    for part in [""] + (vp.key.split("/") if vp.key else []):
        path = path / part if part else path
        if not path.exists():
            return path
    return None


@contextmanager
def _removed_on_error(vp: VolumePath) -> Iterator[None]:
    """Remove the array's directory, and any store or groups created with it, if the block raises."""
    created = _first_missing(vp) or (vp.file / vp.key if vp.key else vp.file)
    try:
        yield
    except BaseException:
        shutil.rmtree(created, ignore_errors=True)
        raise


def _aligned(array: da.Array, chunks: tuple[int, ...]) -> da.Array:
    """``array`` if every block boundary falls on a boundary of ``chunks`` (so no two tasks write one chunk),
    else ``array`` rechunked to ``chunks``."""
    aligned = all(all(int(edge) % c == 0 for edge in np.cumsum(axis)[:-1])
                  for axis, c in zip(array.chunks, chunks))
    return array if aligned else array.rechunk(chunks)


def write(vp: VolumePath, array: np.ndarray | da.Array, chunks: Chunks, overwrite: bool,
          compression: str | None) -> None:
    """Create the array, then fill it (a dask array chunk-aligned, block by block, with its scheduler).

    ``chunks`` defaults to the dask array's chunk shape, or zarr's choice for a NumPy array.
    """
    if chunks is None and isinstance(array, da.Array):
        chunks = tuple(int(c) for c in array.chunksize)
    disk_chunks = storage_chunks(chunks, tuple(array.shape), vp)
    if not overwrite and _node_exists(vp):
        raise exists_error(vp, "array")
    with _removed_on_error(vp):
        z = create(vp, tuple(array.shape), np.dtype(array.dtype), disk_chunks, overwrite)
        if isinstance(array, da.Array):
            # dask annotates store targets as NumPy array-likes; a zarr array is a valid target all the same
            da.store(_aligned(array, tuple(z.chunks)), z, lock=False)  # type: ignore[arg-type]
        else:
            z[...] = array
