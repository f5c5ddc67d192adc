"""Synthetic EM volumes: shapes, determinism, membranes where the segmentation says, learnable contrast, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from znn.errors import ShapeError
from znn.ops.metrics import pixel_error
from znn.pipeline.jobs.synthetic import EMStyle, boundary_labels, synthetic_em


@pytest.fixture(scope="module")
def volume():
    return synthetic_em((6, 96, 96), seed=3)


def test_types_shapes_and_determinism(volume):
    raw, seg = volume
    assert raw.dtype == np.uint8 and seg.dtype == np.int32 and raw.shape == seg.shape == (6, 96, 96)
    again = synthetic_em((6, 96, 96), seed=3)
    np.testing.assert_array_equal(again[0], raw)
    np.testing.assert_array_equal(again[1], seg)
    assert not np.array_equal(synthetic_em((6, 96, 96), seed=4)[0], raw)


def test_membranes_separate_cells(volume):
    raw, seg = volume
    assert 0.05 < (seg == 0).mean() < 0.3
    assert len(np.unique(seg)) > 10
    # no two different cells touch in-plane: every cell border is membrane
    for axis in (1, 2):
        a, b = np.moveaxis(seg, axis, 0)[1:], np.moveaxis(seg, axis, 0)[:-1]
        assert not np.any((a != b) & (a > 0) & (b > 0))
    # membranes are 1 to 3 voxels thick: nearly every membrane voxel is within 1 voxel of a cell in-plane (only
    # junctions of thick membranes reach further)
    def near_cell(r):
        return ndimage.binary_dilation(seg > 0, structure=np.ones((1, 2 * r + 1, 2 * r + 1), bool))[seg == 0]

    assert near_cell(1).mean() > 0.9 and near_cell(3).all()


def test_columns_keep_ids_through_z(volume):
    _, seg = volume
    same = (seg[1:] == seg[:-1]) & (seg[1:] > 0)
    assert same.sum() / (seg[1:] > 0).sum() > 0.8


def test_3d_cells_have_membranes_across_z():
    _, seg = synthetic_em((12, 40, 40), seed=1, style=EMStyle(cells="3d", cell_size=14))
    a, b = seg[1:], seg[:-1]
    assert not np.any((a != b) & (a > 0) & (b > 0))
    assert np.any((seg[1:] == 0) & (seg[:-1] > 0))


def test_membranes_are_dark_enough_to_learn(volume):
    raw, seg = volume
    assert raw[seg == 0].mean() + 50 < raw[seg > 0].mean()
    # a blurred threshold already finds most membranes; a network should do much better
    smooth = ndimage.gaussian_filter(raw.astype(float), (0, 1, 1))
    assert pixel_error(smooth < 115, seg == 0) < 0.15


def test_boundary_labels_and_errors():
    np.testing.assert_array_equal(boundary_labels(np.array([[0, 3], [4, 0]])), [[0, 255], [255, 0]])
    with pytest.raises(ShapeError, match="three positive"):
        synthetic_em((4, 0, 8))


def test_fast_enough_for_the_quickstart():
    start = time.perf_counter()
    synthetic_em((8, 256, 256), seed=0)
    assert time.perf_counter() - start < 4  # about 1 s on the 2-core development machine
