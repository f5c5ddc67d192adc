"""Find NaN and infinite values where data enters: volumes in memory, volumes out of core (per chunk), parameters.

A NaN voxel spreads through every convolution that sees it, so one bad voxel of an input gives NaN over whole
slices of a prediction, and one NaN weight an all-NaN one. The readers check what they read and say where the
first bad value is (in C order, the order a person scans a volume: channel, z, y, x) and how many there are.
Integer arrays cannot hold either, so they cost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from znn.io.volume import VolumePath, parse_volume_path

__all__ = ["NonFinite", "find_non_finite", "non_finite_records", "first_of_records", "in_file", "VOXEL_AXES"]

VOXEL_AXES = ("channel", "z", "y", "x")


@dataclass(frozen=True)
class NonFinite:
    """The first NaN or infinite element of an array (its index in C order and its value) and how many there are."""

    index: tuple[int, ...]
    value: float
    count: int

    def position(self, axes: Sequence[str] | None = None) -> str:
        """``channel 0, z 3, y 5, x 7`` for a volume (the trailing names of ``axes`` fit the index); a plain
        ``index (0, 1, 2)`` when ``axes`` is None."""
        if axes is None:
            return f"index {self.index}"
        names = list(axes)[-len(self.index):]
        return ", ".join(f"{name} {i}" for name, i in zip(names, self.index))

    def describe(self, axes: Sequence[str] | None = VOXEL_AXES) -> str:
        """``3 NaN or infinite values, the first (nan) at channel 0, z 3, y 5, x 7``."""
        many = "value" if self.count == 1 else "values"
        return f"{self.count} NaN or infinite {many}, the first ({self.value}) at {self.position(axes)}"


def _can_hold(dtype: np.dtype[Any]) -> bool:
    """Whether ``dtype`` can hold NaN or infinity (floats and complex numbers)."""
    return dtype.kind in "fc"


def find_non_finite(array: np.ndarray, offset: Sequence[int] | None = None) -> NonFinite | None:
    """The first NaN or infinite element of ``array`` (its index plus ``offset``), or None if there is none."""
    if not _can_hold(array.dtype):
        return None
    finite = np.isfinite(array)
    if finite.all():
        return None
    local = np.unravel_index(int(np.argmin(finite)), array.shape)  # argmin of a bool array: the first False
    shift = offset if offset is not None else (0,) * array.ndim
    index = tuple(int(i) + int(o) for i, o in zip(local, shift))
    return NonFinite(index, float(array[local]), int(finite.size - np.count_nonzero(finite)))


def _block_record(block: np.ndarray, block_info: dict[Any, Any] | None = None) -> np.ndarray:
    """One chunk's record ``[count, *first index in the whole array, first value]`` (count 0: all finite)."""
    assert block_info is not None
    offset = [start for start, _ in block_info[0]["array-location"]]
    record = np.zeros((1,) * block.ndim + (block.ndim + 2,), np.float64)
    found = find_non_finite(block, offset)
    if found is not None:
        record.flat[:] = [found.count, *found.index, found.value]
    return record


def non_finite_records(array: da.Array) -> da.Array | None:
    """A small lazy array of one record per chunk of ``array`` (see :func:`first_of_records`), to compute in the
    same pass as whatever else reads the volume; None when the dtype cannot hold NaN or infinity."""
    if not _can_hold(np.dtype(array.dtype)):
        return None
    ndim = array.ndim
    chunks = tuple((1,) * len(c) for c in array.chunks) + ((ndim + 2,),)
    records: da.Array = da.map_blocks(_block_record, array, chunks=chunks, new_axis=ndim, dtype=np.float64,
                                      meta=np.empty((0,) * (ndim + 1), np.float64))
    return records


def first_of_records(records: np.ndarray) -> NonFinite | None:
    """The first NaN or infinite element over every chunk's record, with the total count; None if all are finite.

    Within a chunk the first element in C order is also its first in the whole array (order between positions is
    lexicographic, which a shift does not change), so the first over the chunks' firsts is the first of all."""
    flat = records.reshape(-1, records.shape[-1])
    bad = flat[flat[:, 0] > 0]
    if not len(bad):
        return None
    first = min(bad, key=lambda r: tuple(r[1:-1]))
    return NonFinite(tuple(int(i) for i in first[1:-1]), float(first[-1]), int(bad[:, 0].sum()))


def in_file(found: NonFinite, path: str | Path | VolumePath) -> NonFinite:
    """``found`` (in a volume read from ``path``) with its z counted in the file: a path's z range ``[start:stop]``
    starts its slices at ``start``, and a person opens the file, not the range."""
    zrange = parse_volume_path(path).zrange
    if zrange is None or not zrange[0] or len(found.index) < 3:
        return found
    index = list(found.index)
    index[-3] += zrange[0]
    return NonFinite(tuple(index), found.value, found.count)
