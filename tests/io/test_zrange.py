"""Volume paths with a z range, ``file.tif[0:15]``: reading, lazy opening and shapes see only those sections, in
every format; bad ranges and writes to a ranged path are clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from znn.errors import VolumeError
from znn.io.samples import load_sample
from znn.io.specfile import parse_spec
from znn.io.volume import (
    open_volume,
    parse_volume_path,
    read_volume,
    volume_shape_dtype,
    write_volume,
)

FORMATS = {"tif": "v.tif", "h5": "v.h5:/raw", "zarr": "v.zarr/raw"}


@pytest.fixture(params=sorted(FORMATS))
def volume(request, tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (2, 7, 5, 6), dtype=np.uint8)
    path = str(tmp_path / FORMATS[request.param])
    write_volume(path, data)
    return path, data


@pytest.mark.parametrize("text,expect", [("[2:5]", np.s_[2:5]), ("[:3]", np.s_[:3]), ("[4:]", np.s_[4:]),
                                         ("[0:7]", np.s_[0:7])])
def test_range_reads_those_sections(volume, text, expect):
    path, data = volume
    want = data[:, expect]
    np.testing.assert_array_equal(read_volume(path + text), want)
    np.testing.assert_array_equal(open_volume(path + text).compute(), want)
    assert volume_shape_dtype(path + text) == (want.shape, np.dtype(np.uint8))


def test_round_trip_of_the_path_text():
    assert str(parse_volume_path("/d/a.h5:/stack[2:4]")) == "/d/a.h5:/stack[2:4]"
    assert str(parse_volume_path("s.zarr/g/a[:7]")) == "s.zarr/g/a[:7]"
    assert parse_volume_path("x.tif[3:]").zrange == (3, None)


@pytest.mark.parametrize("text,words", [("[a:2]", "integers"), ("[5:2]", "selects no slice"),
                                        ("[-1:2]", "from 0")])
def test_bad_ranges_are_clear(volume, text, words):
    path, _ = volume
    with pytest.raises(VolumeError, match=words):
        read_volume(path + text)


def test_writing_to_a_range_is_refused(tmp_path):
    with pytest.raises(VolumeError, match="write to the path without it"):
        write_volume(str(tmp_path / "w.tif[0:2]"), np.zeros((3, 4, 4), np.uint8))


def test_a_2d_volume_has_no_z(tmp_path):
    write_volume(tmp_path / "flat.tif", np.zeros((4, 4), np.uint8))
    with pytest.raises(VolumeError, match="z axis"):
        read_volume(str(tmp_path / "flat.tif") + "[0:1]")


def test_spec_samples_take_ranges(tmp_path):
    raw = np.random.default_rng(1).integers(0, 255, (6, 8, 8), dtype=np.uint8)
    labels = np.where(raw > 128, 255, 0).astype(np.uint8)
    write_volume(tmp_path / "raw.tif", raw)
    write_volume(tmp_path / "lab.tif", labels)
    spec = parse_spec("[image1]\nfnames = raw.tif[1:4]\npp_types = none\n[label1]\nfnames = lab.tif[1:4]\n"
                      "pp_types = binary_class\n[sample1]\ninput = 1\noutput = 1\n", tmp_path / "s.spec")
    sample = load_sample(spec, 1)
    assert sample.shape == (3, 8, 8)
    np.testing.assert_array_equal(sample.inputs[0][0], raw[1:4].astype(np.float32))
    np.testing.assert_array_equal(sample.labels[0], labels[1:4])
