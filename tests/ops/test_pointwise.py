"""Dropout, crop, maxout, biases and transfer functions: loops/math references and finite differences."""

from __future__ import annotations

import math

import numpy as np
import pytest

from znn.errors import FormatError, NetworkSpecError, ShapeError
from znn.ops.pointwise import (
    TRANSFER_FUNCTIONS,
    add_bias,
    bias_gradient,
    crop,
    crop_backward,
    dropout,
    dropout_backward,
    maxout,
    maxout_backward,
    transfer_backward,
    transfer_forward,
)

SHAPES = [(1, 1, 5, 6), (2, 3, 4, 5), (3, 2, 3, 3)]


def finite_difference(f, x: np.ndarray, g: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of L(x) = sum(g * f(x)) with respect to every element of x."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        grad[i] = (np.sum(g * f(xp)) - np.sum(g * f(xm))) / (2 * h)
    return grad


# ---------------------------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("ratio", [0.5, 0.8, 1.0])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dropout_keeps_with_probability_ratio_and_scales_by_its_inverse(ratio, dtype):
    x = np.random.default_rng(0).standard_normal((2, 8, 16, 16)).astype(dtype)
    y, keep = dropout(x, ratio, np.random.default_rng(1))
    assert y.dtype == dtype and keep is not None and keep.shape == x.shape
    assert abs(keep.mean() - ratio) < 0.03
    np.testing.assert_allclose(y, np.where(keep, x / dtype(ratio), 0), rtol=1e-6)
    # same seed, same mask
    np.testing.assert_array_equal(dropout(x, ratio, np.random.default_rng(1))[1], keep)


def test_dropout_is_identity_in_inference():
    x = np.random.default_rng(0).standard_normal((2, 1, 4, 4))
    y, keep = dropout(x, 0.3, np.random.default_rng(1), training=False)
    assert keep is None
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(dropout_backward(x, None, 0.3), x)


def test_dropout_backward_matches_finite_differences():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 2, 3, 3))
    _, keep = dropout(x, 0.6, np.random.default_rng(7))
    g = rng.standard_normal(x.shape)
    # the forward is linear for a fixed mask: reseed so every evaluation draws the same mask
    fd = finite_difference(lambda v: dropout(v, 0.6, np.random.default_rng(7))[0], x, g)
    np.testing.assert_allclose(dropout_backward(g, keep, 0.6), fd, rtol=1e-7, atol=1e-8)


def test_dropout_errors():
    with pytest.raises(ShapeError, match="keep probability"):
        dropout(np.zeros((1, 1, 2, 2)), 0.0, np.random.default_rng(0))
    with pytest.raises(ShapeError, match="dropout mask shape"):
        dropout_backward(np.zeros((1, 1, 2, 2)), np.ones((1, 1, 2, 3), dtype=bool), 0.5)


# ---------------------------------------------------------------------------------------------------- crop


@pytest.mark.parametrize(
    "shape,offset",
    [((1, 1, 5, 6), (0, 0, 0)), ((1, 1, 5, 6), (0, 2, 1)), ((2, 3, 4, 5), (1, 1, 2)), ((3, 4, 3, 3), (1, 0, 1))],
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_crop_matches_loops(shape, offset, dtype):
    x = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    y = crop(x, offset)
    ref = np.empty((shape[0], *(n - 2 * o for n, o in zip(shape[1:], offset))), dtype=dtype)
    for m, z, r, c in np.ndindex(ref.shape):
        ref[m, z, r, c] = x[m, z + offset[0], r + offset[1], c + offset[2]]
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, ref)


def test_crop_backward_matches_finite_differences():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 5, 4))
    g = rng.standard_normal(crop(x, (1, 1, 1)).shape)
    np.testing.assert_allclose(
        crop_backward(g, (1, 1, 1)), finite_difference(lambda v: crop(v, (1, 1, 1)), x, g), atol=1e-8
    )


def test_crop_error_names_shape():
    with pytest.raises(ShapeError, match=r"crop offset \(0, 2, 0\) leaves nothing of input shape \(1, 1, 4, 4\)"):
        crop(np.zeros((1, 1, 4, 4)), (0, 2, 0))


# ---------------------------------------------------------------------------------------------------- maxout


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_maxout_matches_loops(n, shape, dtype):
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal(shape).astype(dtype) for _ in range(n)]
    y, which = maxout(xs)
    assert y.dtype == dtype
    for i in np.ndindex(shape):
        values = [x[i] for x in xs]
        assert y[i] == max(values) and which[i] == values.index(max(values))


def test_maxout_ties_go_to_the_first_input():
    a = np.ones((1, 1, 1, 3))
    _, which = maxout([a, a.copy(), a.copy()])
    np.testing.assert_array_equal(which, 0)


def test_maxout_backward_matches_finite_differences():
    rng = np.random.default_rng(6)
    xs = [rng.standard_normal((2, 1, 3, 3)) for _ in range(3)]
    y, which = maxout(xs)
    g = rng.standard_normal(y.shape)
    grads = maxout_backward(g, which, 3)
    for k in range(3):
        def f(v, k=k):
            return maxout([v if j == k else xs[j] for j in range(3)])[0]
        np.testing.assert_allclose(grads[k], finite_difference(f, xs[k], g), atol=1e-8)


def test_maxout_errors():
    with pytest.raises(ShapeError, match="at least one input"):
        maxout([])
    with pytest.raises(ShapeError, match=r"share shape and dtype, got shapes \[\(1, 1, 2, 2\), \(1, 1, 2, 3\)\]"):
        maxout([np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 3))])


# ---------------------------------------------------------------------------------------------------- biases


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_add_bias_and_its_gradient(dtype):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 2, 3, 4)).astype(dtype)
    b = rng.standard_normal(3).astype(dtype)
    y = add_bias(x, b)
    assert y.dtype == dtype
    for m in range(3):
        np.testing.assert_array_equal(y[m], x[m] + b[m])
    g = rng.standard_normal(x.shape)
    fd = np.array([(np.sum(g * add_bias(x.astype(np.float64), b + h * np.eye(3)[m]))
                    - np.sum(g * add_bias(x.astype(np.float64), b - h * np.eye(3)[m]))) / (2 * h)
                   for m in range(3) for h in [1e-6]])
    np.testing.assert_allclose(bias_gradient(g), fd, rtol=1e-6)
    assert bias_gradient(g.astype(dtype)).dtype == dtype
    with pytest.raises(ShapeError, match=r"bias shape \(2,\) does not match 3 maps"):
        add_bias(x, b[:2])


# ---------------------------------------------------------------------------------------------------- transfer


def scalar_reference(name: str, v: float, args, training: bool) -> float:
    if name == "linear":
        return args[0] * v + (args[1] if len(args) > 1 else 0.0)
    if name == "rectify_linear":
        return max(0.0, v)
    if name == "tanh":
        return args[0] * math.tanh(args[1] * v)
    if name == "soft_sign":
        return v / (1 + abs(v))
    if name == "logistics" or (name == "forward_logistics" and not training):
        return 1 / (1 + math.exp(-v))
    return v  # forward_logistics in training


CASES = [
    ("linear", None), ("linear", [2.5, -0.5]), ("linear", [0.3]),
    ("rectify_linear", None), ("tanh", None), ("tanh", [1.7159, 0.6666]),
    ("soft_sign", None), ("logistics", None), ("forward_logistics", None),
]
DEFAULTS = {"linear": [1.0, 0.0], "tanh": [1.0, 1.0]}


@pytest.mark.parametrize("name,args", CASES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_transfer_forward_matches_math(name, args, training, dtype, rtol):
    x = (np.random.default_rng(8).standard_normal((2, 1, 4, 5)) * 3).astype(dtype)
    y = transfer_forward(name, x, args, training)
    full = args or DEFAULTS.get(name, [])
    ref = np.vectorize(lambda v: scalar_reference(name, float(v), full, training))(x)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, ref, rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.parametrize("name,args", CASES)
@pytest.mark.parametrize("piece_bytes, threads", [(12, 1), (12, 2), (1 << 20, 2)])
def test_bias_transfer_inplace_equals_bias_then_transfer(monkeypatch, name, args, piece_bytes, threads):
    """The in-place, pieced, threaded bias and transfer of inference gives the values of add_bias then
    transfer_forward exactly, in the very array it was given; a non-contiguous array is refused, not copied."""
    from znn.ops import pointwise

    monkeypatch.setattr(pointwise, "_PIECE_BYTES", piece_bytes)
    x = (np.random.default_rng(9).standard_normal((3, 2, 5, 7)) * 3).astype(np.float32)
    bias = np.array([0.5, -1.0, 2.0])
    want = transfer_forward(name, add_bias(x, bias), args, training=False)
    got = pointwise.bias_transfer_inplace(x, bias, name, args, threads)
    assert got is x
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ShapeError, match="C-contiguous"):
        pointwise.bias_transfer_inplace(x[:, :, ::2], bias, name, args)


@pytest.mark.parametrize("name,args", CASES)
def test_transfer_backward_matches_finite_differences(name, args):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 2, 3, 3)) * 2
    x[np.abs(x) < 1e-3] = 0.5  # keep clear of the kinks of relu and soft_sign
    g = rng.standard_normal(x.shape)
    y = transfer_forward(name, x, args)
    grad = transfer_backward(name, y, g, args, x=x)
    if name == "forward_logistics":
        np.testing.assert_array_equal(grad, g)  # identity in training, as in ZNN
        return
    fd = finite_difference(lambda v: transfer_forward(name, v, args), x, g)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


def test_transfer_keeps_float32_and_is_stable_for_large_inputs():
    x = np.array([-1e4, -50.0, 0.0, 50.0, 1e4], dtype=np.float32).reshape(1, 1, 1, 5)
    y = transfer_forward("logistics", x)
    assert y.dtype == np.float32 and np.all(np.isfinite(y))
    np.testing.assert_allclose(y.ravel(), [0, 1.9287e-22, 0.5, 1, 1], rtol=1e-4, atol=1e-30)
    assert transfer_backward("logistics", y, np.ones_like(y)).dtype == np.float32


def test_transfer_errors():
    x = np.zeros((1, 1, 1, 1))
    with pytest.raises(NetworkSpecError, match="'rectified_linear'; did you mean 'rectify_linear'"):
        transfer_forward("rectified_linear", x)
    with pytest.raises(FormatError, match="unknown transfer function 'softmax'; valid: "):
        transfer_backward("softmax", x, x)
    with pytest.raises(ValueError, match="tanh takes 2 function_args"):
        transfer_forward("tanh", x, [1.0])
    with pytest.raises(NetworkSpecError, match="rectify_linear takes no function_args"):
        transfer_forward("rectify_linear", x, [1.0])
    assert set(TRANSFER_FUNCTIONS) == {"linear", "rectify_linear", "tanh", "soft_sign", "logistics",
                                       "forward_logistics"}
