"""TIFF volumes (``file.tif``, ``file.tiff``): the first image series, one page per 2D ``(y, x)`` slice.

Written files are uncompressed "shaped" TIFFs (tifffile records the full shape), so 2D to 4D arrays come back
with the shape they were written with. Lazy reads open the file inside each task through tifffile's zarr
store, reading only the pages (strips, tiles) a block needs.
"""

from __future__ import annotations

import lzma
import math
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import tifffile
import zarr

from znn.errors import VolumeError, ZnnError
from znn.io.volume import (
    Chunks,
    VolumePath,
    atomic_file,
    check_volume,
    default_chunks,
    iter_blocks,
    lazy_array,
)

__all__ = ["read", "open", "shape_dtype", "write", "resolution", "TifBlockReader", "TIF_ERRORS"]

# What tifffile raises for a damaged or foreign file: TiffFileError (a ValueError) where it checks the structure,
# and wherever it does not, whatever the parsing or decoding step hit (struct, zlib and lzma errors, a KeyError for a
# codec it lacks, an IndexError or TypeError for a tag of the wrong kind, ZeroDivisionError for a zero size,
# RuntimeError for inconsistent pages, and AssertionError where it checks an invariant with ``assert``, as it does
# for a shaped series whose first page lost its data type).
TIF_ERRORS = (ValueError, TypeError, KeyError, IndexError, ArithmeticError, RuntimeError, OSError, EOFError,
              AssertionError, struct.error, zlib.error, lzma.LZMAError)
MAX_SEGMENT = 1 << 24  # pixels in a strip or tile: real ones are far smaller (a 4096 x 4096 tile is this size)


def _series(tif: tifffile.TiffFile, vp: VolumePath) -> tifffile.TiffPageSeries:
    if not tif.series:
        raise VolumeError(f"{vp}: the TIFF file holds no images")
    if len(tif.series) > 1:  # tifffile puts pages of another size in another series: the first would be read alone
        _check_page_sizes(tif, vp)
    return tif.series[0]


def _check_page_sizes(tif: tifffile.TiffFile, vp: VolumePath) -> None:
    """VolumeError naming the first page whose size differs from the first page's."""
    first = tif.pages.first.shape
    for index, page in enumerate(tif.pages):
        if page.shape != first:
            raise VolumeError(f"{vp}: page {index} is {tuple(page.shape)} but page 0 is {tuple(first)}; a volume's "
                              "pages must all have one size (crop or pad the odd pages, or split the file)")


@contextmanager
def _reading(vp: VolumePath) -> Iterator[tifffile.TiffFile]:
    """The file open to read; whatever tifffile raises while it is used becomes a VolumeError naming it."""
    try:
        with tifffile.TiffFile(vp.file) as tif:
            yield tif
    except ZnnError:
        raise
    except TIF_ERRORS as err:
        raise VolumeError(f"{vp}: not a readable TIFF file ({type(err).__name__}: {err})") from err


def shape_dtype(vp: VolumePath) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype of the first series, from the TIFF headers."""
    with _reading(vp) as tif:
        series = _series(tif, vp)
        shape, dtype = tuple(int(n) for n in series.shape), np.dtype(series.dtype)
    check_volume(shape, dtype, vp)
    return shape, dtype


def resolution(vp: VolumePath) -> None:
    """Tif voxel sizes are not read (ImageJ's tags are often absent or in pixels per unit): give ``resolution`` in
    the job or sample file instead."""
    return None


def read(vp: VolumePath) -> np.ndarray:
    """The whole first series, shape as recorded in the file."""
    with _reading(vp) as tif:
        series = _series(tif, vp)
        check_volume(tuple(int(n) for n in series.shape), np.dtype(series.dtype), vp)
        return np.asarray(series.asarray())


class TifBlockReader:
    """Picklable reader for dask: each ``__getitem__`` opens the file, reads the region and closes it."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        self.path, self.shape, self.dtype, self.ndim = str(path), shape, dtype, len(shape)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        vp = VolumePath("tif", Path(self.path))
        with _reading(vp) as tif:
            store = tif.series[0].aszarr()
            try:
                z = zarr.open_array(store, mode="r")
                # zarr allocates a whole strip or tile per read: one far larger than a page comes from a damaged tag
                if math.prod(z.chunks[-2:]) > max(math.prod(self.shape[-2:]), MAX_SEGMENT):
                    raise VolumeError(f"{vp}: a strip or tile of {z.chunks[-2:]} pixels is larger than the "
                                      f"{self.shape[-2:]} image; the TIFF file is damaged")
                return np.asarray(z[key])
            finally:
                store.close()


def open(vp: VolumePath, chunks: Chunks) -> da.Array:  # noqa: A001 - the backend interface's name
    """Lazy dask array; default blocks are whole pages stacked to about dask's ``array.chunk-size``."""
    shape, dtype = shape_dtype(vp)
    pages = (1,) * (len(shape) - 2) + shape[-2:]
    return lazy_array(TifBlockReader(vp.file, shape, dtype), vp, default_chunks(shape, dtype, pages, chunks))


def _pages(array: da.Array) -> Iterator[np.ndarray]:
    """Yield the 2D pages of a dask array in file order, computing a stack of pages at a time.

    Blocks are rechunked to whole pages, single along all leading axes but the last, so that blocks in C
    order give pages in C order.
    """
    lead = array.ndim - 2
    axes = {i: 1 for i in range(lead - 1)} | {array.ndim - 2: -1, array.ndim - 1: -1}
    for _, block in iter_blocks(array.rechunk(axes)):
        yield from block.reshape((-1,) + block.shape[-2:])


def write(vp: VolumePath, array: np.ndarray | da.Array, chunks: Chunks, overwrite: bool,
          compression: str | None) -> None:
    """Write an uncompressed shaped TIFF through a temporary sibling renamed on success.

    ``chunks`` and ``compression`` do not apply to TIFF and are ignored (compression is rejected earlier).
    """
    options: dict[str, Any] = {"photometric": "minisblack"}  # never guess RGB from a last axis of 3
    with atomic_file(vp.file, overwrite, vp) as tmp:
        if isinstance(array, da.Array):
            tifffile.imwrite(tmp, _pages(array), shape=array.shape, dtype=array.dtype, **options)
        else:
            tifffile.imwrite(tmp, array, **options)
