"""max_filter / max_pool against explicit loops, and their backward passes against finite differences."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from znn.errors import ShapeError
from znn.ops.pooling import (max_filter, max_filter_backward, max_filter_gradient, max_filter_values, max_pool,
                             max_pool_backward)


def reference_max_filter(x: np.ndarray, size, dilation) -> tuple[np.ndarray, np.ndarray]:
    """Loop over output voxels; the winner is the first maximum in (z, y, x) tap order."""
    out = tuple(n - (s - 1) * d for n, s, d in zip(x.shape[1:], size, dilation))
    y = np.empty((x.shape[0], *out), dtype=x.dtype)
    arg = np.empty(y.shape, dtype=np.int64)
    for m, z, r, c in itertools.product(*(range(n) for n in y.shape)):
        best, best_i = None, None
        for tz, ty, tx in itertools.product(*(range(s) for s in size)):
            pos = (m, z + tz * dilation[0], r + ty * dilation[1], c + tx * dilation[2])
            if best is None or x[pos] > best:
                best, best_i = x[pos], np.ravel_multi_index(pos, x.shape)
        y[m, z, r, c], arg[m, z, r, c] = best, best_i
    return y, arg


def reference_max_pool(x: np.ndarray, size) -> np.ndarray:
    out = tuple(n // s for n, s in zip(x.shape[1:], size))
    y = np.empty((x.shape[0], *out), dtype=x.dtype)
    for m, z, r, c in itertools.product(*(range(n) for n in y.shape)):
        y[m, z, r, c] = x[m, z * size[0] : (z + 1) * size[0], r * size[1] : (r + 1) * size[1],
                          c * size[2] : (c + 1) * size[2]].max()
    return y


def distinct_values(rng: np.random.Generator, shape) -> np.ndarray:
    """Random values with gaps >= 1e-3 between any two, so a 1e-6 step never changes a winner."""
    n = int(np.prod(shape))
    return (rng.permutation(n) * 1e-2 + rng.random(n) * 1e-3).reshape(shape)


def finite_difference(f, x: np.ndarray, g: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of L(x) = sum(g * f(x)) with respect to every element of x."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        grad[i] = (np.sum(g * f(xp)) - np.sum(g * f(xm))) / (2 * h)
    return grad


# (maps, out extent, size, dilation): input extent = out + (size - 1) * dilation
FILTER_CASES = [
    (1, (1, 3, 4), (1, 2, 2), (1, 1, 1)),  # 2D (z = 1)
    (2, (1, 2, 3), (1, 3, 3), (1, 2, 2)),  # 2D, dilated
    (3, (2, 3, 2), (2, 2, 2), (1, 1, 1)),
    (2, (2, 2, 3), (3, 2, 1), (2, 3, 4)),
    (1, (1, 2, 2), (2, 3, 4), (4, 1, 2)),
    (2, (3, 2, 2), (1, 1, 1), (3, 3, 3)),  # size 1: identity
    (1, (2, 1, 2), (5, 3, 7), (1, 2, 1)),  # odd sizes, one non-power-of-two doubling tail
    (4, (1, 1, 1), (2, 4, 6), (2, 1, 1)),  # even sizes, single output voxel
]


def _in_shape(maps, out, size, dil):
    return (maps, *(o + (s - 1) * d for o, s, d in zip(out, size, dil)))


@pytest.mark.parametrize("maps,out,size,dil", FILTER_CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_max_filter_matches_loops(maps, out, size, dil, dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(_in_shape(maps, out, size, dil)).astype(dtype)
    y, arg = max_filter(x, size, dil)
    y_ref, arg_ref = reference_max_filter(x, size, dil)
    assert y.dtype == dtype and y.shape == (maps, *out)
    np.testing.assert_array_equal(y, y_ref)  # a max is exact in any dtype
    np.testing.assert_array_equal(arg, arg_ref)


def test_max_filter_ties_pick_first_in_zyx_order():
    x = np.zeros((1, 2, 2, 2))
    y, arg = max_filter(x, (2, 2, 2))
    assert y.shape == (1, 1, 1, 1) and arg.item() == 0
    x[0, 1, 0, 0] = x[0, 0, 1, 1] = x[0, 0, 1, 0] = 1.0  # three tied maxima; (0, 1, 0) comes first
    assert max_filter(x, (2, 2, 2))[1].item() == np.ravel_multi_index((0, 0, 1, 0), x.shape)


@settings(max_examples=40, deadline=None)
@given(
    maps=st.integers(1, 2),
    size=st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)),
    dil=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
    out=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
    seed=st.integers(0, 2**16),
)
def test_max_filter_fast_path_equals_loops_with_ties(maps, size, dil, out, seed):
    # few distinct values: many ties, which is where the doubling and the separable passes could disagree
    x = np.random.default_rng(seed).integers(0, 3, _in_shape(maps, out, size, dil)).astype(np.float64)
    y, arg = max_filter(x, size, dil)
    y_ref, arg_ref = reference_max_filter(x, size, dil)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(arg, arg_ref)


@pytest.mark.parametrize("maps,out,size,dil", FILTER_CASES[:5])
def test_max_filter_backward_matches_finite_differences(maps, out, size, dil):
    rng = np.random.default_rng(2)
    x = distinct_values(rng, _in_shape(maps, out, size, dil))
    y, arg = max_filter(x, size, dil)
    g = rng.standard_normal(y.shape)
    grad = max_filter_backward(g, arg, x.shape)
    np.testing.assert_allclose(grad, finite_difference(lambda v: max_filter(v, size, dil)[0], x, g), atol=1e-7)


def test_max_filter_backward_keeps_dtype_and_sums_shared_winners():
    x = np.zeros((1, 1, 1, 4), dtype=np.float32)
    x[0, 0, 0, 1] = 5  # the winner of all three windows of size 2
    _, arg = max_filter(x, (1, 1, 2))
    g = np.ones((1, 1, 1, 3), dtype=np.float32)
    grad = max_filter_backward(g, arg, x.shape)
    assert grad.dtype == np.float32
    np.testing.assert_array_equal(grad[0, 0, 0], [0, 2, 1, 0])


@pytest.mark.parametrize(
    "maps,out,size",
    [(1, (1, 3, 2), (1, 2, 2)), (2, (2, 2, 3), (2, 2, 2)), (3, (1, 2, 2), (3, 1, 4)), (2, (2, 1, 1), (1, 3, 5))],
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_max_pool_matches_loops_and_filter(maps, out, size, dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((maps, *(o * s for o, s in zip(out, size)))).astype(dtype)
    y, arg = max_pool(x, size)
    assert y.dtype == dtype and y.shape == (maps, *out)
    np.testing.assert_array_equal(y, reference_max_pool(x, size))
    # pooling is the max filter sampled every `size` voxels: same values and same winners
    yf, argf = max_filter(x, size)
    np.testing.assert_array_equal(y, yf[:, :: size[0], :: size[1], :: size[2]])
    np.testing.assert_array_equal(arg, argf[:, :: size[0], :: size[1], :: size[2]])


@pytest.mark.parametrize("size", [(1, 2, 2), (2, 2, 2), (2, 1, 3)])
def test_max_pool_backward_matches_finite_differences(size):
    rng = np.random.default_rng(4)
    x = distinct_values(rng, (2, *(2 * s for s in size)))
    y, arg = max_pool(x, size)
    g = rng.standard_normal(y.shape)
    grad = max_pool_backward(g, arg, x.shape)
    np.testing.assert_allclose(grad, finite_difference(lambda v: max_pool(v, size)[0], x, g), atol=1e-7)


def test_errors_name_the_shapes():
    x = np.zeros((1, 2, 5, 5))
    with pytest.raises(ShapeError, match=r"max_filter window \(1, 3, 3\) with dilation \(1, 3, 1\)"):
        max_filter(x, (1, 3, 3), (1, 3, 1))
    with pytest.raises(ShapeError, match=r"does not divide input shape \(2, 5, 5\)"):
        max_pool(x, (1, 2, 2))
    with pytest.raises(ShapeError, match="three integers >= 1"):
        max_filter(x, (1, 0, 2))
    with pytest.raises(ShapeError, match="must be 4D"):
        max_pool(np.zeros((4, 4)), (2, 2, 2))
    with pytest.raises(ShapeError, match="argmax shape"):
        max_filter_backward(np.zeros((1, 1, 1, 2)), np.zeros((1, 1, 1, 3), dtype=np.int32), (1, 1, 1, 4))


@pytest.mark.parametrize("slab_bytes, threads", [(1, 1), (1, 2), (200, 2), (1 << 30, 1)])
@pytest.mark.parametrize("size, dilation", [((2, 3, 2), (2, 1, 3)), ((1, 2, 1), (1, 2, 1)), ((3, 1, 1), (1, 1, 1)),
                                            ((1, 1, 2), (1, 1, 1))])
def test_max_filter_values_equal_max_filter(monkeypatch, slab_bytes, threads, size, dilation):
    """The inference max filter (values only, in slabs of z planes, on threads) equals the training one's values
    for slabs of one plane up to whole maps and windows along any subset of the axes, read from a strided view;
    a 1x1x1 window passes the maps through as they are."""
    from znn.ops import pooling

    monkeypatch.setattr(pooling, "MAX_FILTER_SLAB_BYTES", slab_bytes)
    x = np.random.default_rng(1).standard_normal((3, 9, 10, 11)).astype(np.float32)
    got = pooling.max_filter_values(x, size, dilation, threads)
    np.testing.assert_array_equal(got, pooling.max_filter(x, size, dilation)[0])
    assert got.flags.c_contiguous and not np.may_share_memory(got, x)
    view = x[:, 1:, ::2, 2:]
    np.testing.assert_array_equal(pooling.max_filter_values(view, size, dilation, threads),
                                  pooling.max_filter(np.ascontiguousarray(view), size, dilation)[0])
    np.testing.assert_array_equal(pooling.max_filter_values(x, (1, 1, 1), (1, 1, 1)), x)


@pytest.mark.parametrize("size", [(2, 2, 2), (1, 3, 2)])
def test_max_pool_ties_and_nan(size):
    """Ties (few distinct values): pooling's winners are the max filter's, sampled (the first tap in window
    order). NaN in a window: the output is NaN and its winner is a NaN voxel (the first), as numpy's argmax."""
    rng = np.random.default_rng(7)
    x = rng.integers(0, 3, (3, *(3 * s for s in size))).astype(np.float32)
    y, arg = max_pool(x, size)
    np.testing.assert_array_equal(y, reference_max_pool(x, size))
    np.testing.assert_array_equal(arg, max_filter(x, size)[1][:, :: size[0], :: size[1], :: size[2]])
    x.ravel()[rng.choice(x.size, 9, replace=False)] = np.nan
    y, arg = max_pool(x, size)
    np.testing.assert_array_equal(y, reference_max_pool(x, size))  # NaN where the window holds one
    nan = np.isnan(y)
    assert nan.any() and np.isnan(x.ravel()[arg[nan]]).all()
    assert not np.isnan(x.ravel()[arg[~nan]]).any()


def _gradient_by_argmax(x, g, size, dil):
    _, arg = max_filter(x, size, dil)
    return max_filter_backward(g, arg, x.shape)


@pytest.mark.parametrize("maps,out,size,dil", FILTER_CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_max_filter_gradient_from_values_equals_the_argmax_gradient(maps, out, size, dil, dtype):
    """Training's backward (winners found again from input and output) routes every output's gradient to the
    voxel max_filter's argmax names; gradients of small integers add up exactly in any order."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal(_in_shape(maps, out, size, dil)).astype(dtype)
    y = max_filter_values(x, size, dil)
    g = rng.integers(-4, 5, y.shape).astype(dtype)
    got = max_filter_gradient(g, x, y, size, dil)
    assert got.dtype == dtype and got.shape == x.shape and not np.may_share_memory(got, x)
    np.testing.assert_array_equal(got, _gradient_by_argmax(x, g, size, dil))


@settings(max_examples=40, deadline=None)
@given(
    maps=st.integers(1, 4),  # with 2000-byte slabs a group takes some maps, not all
    size=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
    dil=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
    out=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)),
    slab_bytes=st.sampled_from([1, 40, 2000, 1 << 20]),
    seed=st.integers(0, 2**16),
)
def test_max_filter_gradient_ties_slabs_and_views(maps, size, dil, out, slab_bytes, seed):
    """Many ties (few distinct values, as after a ReLU): the first tap in (z, y, x) order wins, as with the
    argmax, for slabs of one plane up to whole maps and several whole maps at once, read from a strided view of
    the input."""
    from znn.ops import pooling

    rng = np.random.default_rng(seed)
    shape = _in_shape(maps, out, size, dil)
    base = rng.integers(0, 3, (shape[0], shape[1], 2 * shape[2], shape[3] + 1)).astype(np.float64)
    x = base[:, :, ::2, 1:]
    y = max_filter_values(x, size, dil)
    g = rng.integers(-3, 4, y.shape).astype(np.float64)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pooling, "GRADIENT_SLAB_BYTES", slab_bytes)
        got = max_filter_gradient(g, x, y, size, dil)
    np.testing.assert_array_equal(got, _gradient_by_argmax(np.ascontiguousarray(x), g, size, dil))


def test_max_filter_gradient_of_nan_windows_and_non_finite_gradients():
    """A window holding NaN outputs NaN, and its gradient goes to the window's first NaN; an infinite gradient
    reaches its winner only (no 0 * inf = NaN elsewhere)."""
    x = np.arange(8, dtype=np.float32).reshape(1, 1, 1, 8)
    x[0, 0, 0, 3] = x[0, 0, 0, 4] = np.nan
    y = max_filter_values(x, (1, 1, 2), (1, 1, 1))
    np.testing.assert_array_equal(np.isnan(y[0, 0, 0]), [False, False, True, True, True, False, False])
    g = np.ones_like(y)
    np.testing.assert_array_equal(max_filter_gradient(g, x, y, (1, 1, 2), (1, 1, 1))[0, 0, 0],
                                  [0, 1, 1, 2, 1, 0, 1, 1])
    g[0, 0, 0, 0] = np.inf
    got = max_filter_gradient(g, np.arange(8.0, dtype=np.float32).reshape(x.shape), np.arange(1.0, 8.0,
                              dtype=np.float32).reshape(y.shape), (1, 1, 2), (1, 1, 1))
    np.testing.assert_array_equal(got[0, 0, 0], [0, np.inf, 1, 1, 1, 1, 1, 1])
    with pytest.raises(ShapeError, match="does not match gradient shape"):
        max_filter_gradient(g[..., :3], x, y, (1, 1, 2), (1, 1, 1))
