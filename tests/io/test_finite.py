"""The NaN/infinity finder the readers share: first position in C order, value and count, in memory and per chunk."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from znn.io.finite import (
    NonFinite,
    find_non_finite,
    first_of_records,
    in_file,
    non_finite_records,
)


def test_in_memory_first_position_value_and_count():
    vol = np.zeros((2, 3, 4, 5), np.float32)
    vol[1, 0, 0, 0] = np.inf
    vol[0, 2, 3, 1] = np.nan
    found = find_non_finite(vol)
    assert found is not None and found.index == (0, 2, 3, 1) and np.isnan(found.value) and found.count == 2
    assert found.describe() == "2 NaN or infinite values, the first (nan) at channel 0, z 2, y 3, x 1"
    assert find_non_finite(np.ones((3, 3))) is None
    assert find_non_finite(np.full((3, 3), 255, np.uint8)) is None  # integers hold neither


def test_per_chunk_finds_the_first_in_c_order_not_in_chunk_order():
    vol = np.zeros((4, 8, 8), np.float64)
    vol[1, 0, 0] = np.nan  # in the first chunk, but after the next one in C order
    vol[0, 5, 0] = -np.inf  # in the second chunk (y 4..7)
    vol[3, 7, 7] = np.nan
    records = non_finite_records(da.from_array(vol, chunks=(2, 4, 4)))
    found = first_of_records(records.compute())
    assert found == NonFinite((0, 5, 0), -np.inf, 3) == find_non_finite(vol)
    assert first_of_records(non_finite_records(da.zeros((4, 4), chunks=2)).compute()) is None
    assert non_finite_records(da.zeros((4, 4), chunks=2, dtype=np.uint16)) is None


@pytest.mark.parametrize("path, z", [("v.tif", 2), ("v.tif[3:9]", 5), ("v.h5:/raw[:4]", 2)])
def test_positions_are_counted_in_the_file(path, z):
    assert in_file(NonFinite((0, 2, 1, 1), np.nan, 1), path).index == (0, z, 1, 1)
