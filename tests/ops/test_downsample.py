"""Pyramid downsampling kernels against slow loops over windows: mean, mode (labels) and striding, border windows
included; a block whose start is a multiple of the factors gives its part of the whole array's result."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from znn.errors import ShapeError
from znn.ops.downsample import downsample, downsample_mean, downsample_mode, downsample_stride

SHAPES_FACTORS = [((7, 9, 10), (1, 2, 2)), ((5, 6, 7), (2, 2, 2)), ((2, 3, 11, 12), (1, 2, 3, 2)),
                  ((4, 4), (3, 3)), ((1, 1, 5), (1, 1, 2))]


def _windows(shape: tuple[int, ...], factors: tuple[int, ...]):
    """(output index, slices of its window inside the array) for every window, by a plain loop."""
    counts = [-(-n // f) for n, f in zip(shape, factors)]
    for index in itertools.product(*(range(c) for c in counts)):
        yield index, tuple(slice(i * f, min((i + 1) * f, n)) for i, f, n in zip(index, factors, shape))


def _reference(x: np.ndarray, factors: tuple[int, ...], reduce) -> np.ndarray:
    out_shape = tuple(-(-n // f) for n, f in zip(x.shape, factors))
    out = np.empty(out_shape, dtype=object)
    for index, window in _windows(x.shape, factors):
        out[index] = reduce(x[window].ravel())
    return out


def _mode(values: np.ndarray):
    found, counts = np.unique(values, return_counts=True)  # sorted: the first most frequent is the smallest
    return found[np.argmax(counts)]


@pytest.mark.parametrize("shape, factors", SHAPES_FACTORS)
def test_mean_equals_the_mean_of_each_window(shape, factors):
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    want = _reference(x.astype(np.float64), factors, np.mean).astype(np.float64)
    got = downsample_mean(x, factors)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_mean_of_integers_is_float32():
    x = np.arange(16, dtype=np.uint8).reshape(4, 4)
    np.testing.assert_array_equal(downsample_mean(x, (2, 2)), np.array([[2.5, 4.5], [10.5, 12.5]], np.float32))


@pytest.mark.parametrize("shape, factors", SHAPES_FACTORS)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint64, np.int32])
def test_mode_equals_the_most_frequent_id_of_each_window(shape, factors, dtype):
    rng = np.random.default_rng(1)
    ids = np.array([0, 3, 7, 2**31 + 5], dtype=np.int64)[: 3 if dtype != np.uint64 else 4]
    x = ids[rng.integers(0, len(ids), shape)].astype(dtype)
    got = downsample_mode(x, factors)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, _reference(x, factors, _mode).astype(dtype))
    assert set(np.unique(got)) <= set(np.unique(x))  # a label pyramid makes no new ids


def test_mode_tie_takes_the_smallest_id():
    x = np.array([[5, 9], [9, 5]], dtype=np.uint64)
    assert downsample_mode(x, (2, 2))[0, 0] == 5


@pytest.mark.parametrize("shape, factors", SHAPES_FACTORS)
def test_stride_keeps_each_windows_first_voxel(shape, factors):
    x = np.random.default_rng(2).integers(0, 1000, shape).astype(np.uint64)
    np.testing.assert_array_equal(downsample_stride(x, factors), _reference(x, factors, lambda v: v[0]).astype(
        np.uint64))


@pytest.mark.parametrize("method", ["mean", "mode", "stride"])
def test_a_block_at_a_multiple_of_the_factors_gives_its_part_of_the_whole(method):
    x = np.random.default_rng(3).integers(0, 4, (2, 9, 13, 11)).astype(np.uint32)
    factors = (1, 2, 2, 2)
    whole = downsample(x, factors, method)
    for z0, y0 in itertools.product((0, 4, 8), (0, 6, 12)):  # blocks of 4 x 6 (the last ones cut by the border)
        part = downsample(x[:, z0:z0 + 4, y0:y0 + 6], factors, method)
        np.testing.assert_array_equal(part, whole[:, z0 // 2:z0 // 2 + 2, y0 // 2:y0 // 2 + 3])


def test_mistakes_say_what_is_expected():
    with pytest.raises(ShapeError, match="one integer >= 1 per axis"):
        downsample_mean(np.zeros((4, 4)), (2, 2, 2))
    with pytest.raises(ShapeError, match="one integer >= 1 per axis"):
        downsample_mode(np.zeros((4, 4), np.uint8), (0, 2))
    with pytest.raises(ValueError, match="use mean, mode, stride"):
        downsample(np.zeros((4, 4)), (2, 2), "median")
