"""Output stores of dense inference (znn.io.stores): arrays created or reused by layout, block writes that land
whole chunks atomically, and exports to h5 block by block and to tif."""

from __future__ import annotations

import numpy as np

from znn.io.atomic_store import PARTIAL_DIR
from znn.io.stores import (
    ArrayLayout,
    arrays_match,
    create_arrays,
    export_volume,
    write_region,
)
from znn.io.volume import read_volume, write_volume


def test_arrays_are_created_and_matched_by_layout(tmp_path):
    store = tmp_path / "out.zarr"
    layouts = {"output": ArrayLayout((2, 5, 6, 7), (2, 3, 3, 4)), "aff": ArrayLayout((3, 5, 6, 7), (3, 3, 3, 4))}
    assert not arrays_match(store, layouts)  # nothing there yet
    arrays = create_arrays(store, layouts, "float32")
    assert arrays == {"output": f"{store}/output", "aff": f"{store}/aff"}
    assert arrays_match(store, layouts)
    assert not arrays_match(store, {"output": ArrayLayout((2, 5, 6, 7), (2, 5, 6, 7))})  # other chunks
    assert not arrays_match(store, {"output": ArrayLayout((2, 5, 6, 8), (2, 3, 3, 4))})  # other shape
    assert not arrays_match(store, {"missing": ArrayLayout((1, 1, 1, 1), (1, 1, 1, 1))})
    got = read_volume(arrays["output"])
    assert got.shape == (2, 5, 6, 7) and got.dtype == np.float32 and not got.any()


def test_write_region_fills_its_chunks_and_leaves_no_temporary_files(tmp_path):
    store = tmp_path / "out.zarr"
    arrays = create_arrays(store, {"output": ArrayLayout((1, 4, 4, 6), (1, 2, 2, 3))}, "float32")
    block = np.arange(12, dtype=np.float32).reshape(1, 2, 2, 3)
    write_region(store, "output", (slice(None), slice(2, 4), slice(0, 2), slice(3, 6)), block)
    got = read_volume(arrays["output"])
    np.testing.assert_array_equal(got[:, 2:4, 0:2, 3:6], block)
    assert got.sum() == block.sum()  # nothing else written
    assert not list((store / PARTIAL_DIR).iterdir())  # every chunk renamed into place
    create_arrays(store, {"output": ArrayLayout((1, 4, 4, 6), (1, 2, 2, 3))}, "float32")  # recreated: zeros
    assert not read_volume(arrays["output"]).any()


def test_export_to_h5_block_by_block_and_to_tif(tmp_path):
    vol = np.random.default_rng(0).standard_normal((2, 5, 9, 8)).astype(np.float32)
    write_volume(tmp_path / "src.zarr", vol, chunks=(2, 2, 4, 4))
    source = str(tmp_path / "src.zarr")
    export_volume(source, str(tmp_path / "out" / "a.h5"), "output")  # the folder is made; the key is the default
    np.testing.assert_array_equal(read_volume(str(tmp_path / "out" / "a.h5") + ":/output"), vol)
    export_volume(source, str(tmp_path / "out" / "a.h5") + ":/again", "output")  # a second dataset beside it
    export_volume(source, str(tmp_path / "out" / "a.h5") + ":/again", "output")  # replaced, not refused
    np.testing.assert_array_equal(read_volume(str(tmp_path / "out" / "a.h5") + ":/again"), vol)
    np.testing.assert_array_equal(read_volume(str(tmp_path / "out" / "a.h5") + ":/output"), vol)
    export_volume(source, str(tmp_path / "b.tif"), "output")
    np.testing.assert_array_equal(read_volume(tmp_path / "b.tif"), vol)
