"""Volumes read as something other than what the file holds: a z range past the end of the stack, a tif whose pages
differ in size. Both are refused, naming the volume's size or the odd page."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from znn.errors import VolumeError
from znn.io.volume import open_volume, read_volume, volume_shape_dtype, write_volume


@pytest.mark.parametrize("fmt", ["v.tif", "v.h5:/raw", "v.zarr/raw"])
@pytest.mark.parametrize("zrange", ["[0:99]", "[30:]", "[31:40]"])
def test_a_z_range_past_the_end_is_refused(tmp_path, fmt, zrange):
    path = str(tmp_path / fmt)
    write_volume(path, np.zeros((30, 4, 5), np.uint8))
    for reader in (read_volume, open_volume, volume_shape_dtype):
        with pytest.raises(VolumeError, match=r"30 z slices"):
            reader(path + zrange)


def test_z_ranges_inside_the_stack_still_read(tmp_path):
    data = np.arange(30 * 4 * 5, dtype=np.uint16).reshape(30, 4, 5)
    write_volume(tmp_path / "v.tif", data)
    np.testing.assert_array_equal(read_volume(str(tmp_path / "v.tif") + "[25:30]"), data[25:30])
    np.testing.assert_array_equal(read_volume(str(tmp_path / "v.tif") + "[29:]"), data[29:])


def test_a_tif_with_pages_of_different_sizes_is_refused(tmp_path):
    path = tmp_path / "mixed.tif"
    tifffile.imwrite(path, np.zeros((3, 8, 8), np.uint8), photometric="minisblack")
    tifffile.imwrite(path, np.zeros((6, 5), np.uint8), append=True, photometric="minisblack")
    for reader in (read_volume, open_volume, volume_shape_dtype):
        with pytest.raises(VolumeError, match=r"page 3 is \(6, 5\) but page 0 is \(8, 8\)"):
            reader(path)
