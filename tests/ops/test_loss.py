"""Losses against per-voxel loops and finite differences (with masks and weights); rebalancing; pixel error."""

from __future__ import annotations

import math

import numpy as np
import pytest

from znn.errors import ShapeError
from znn.ops.loss import (
    LOSSES,
    binomial_cross_entropy,
    pixel_error,
    rebalance_weights,
    sigmoid,
    softmax,
    softmax_loss,
    square_loss,
)

SHAPES = [(1, 1, 4, 5), (2, 2, 3, 3), (3, 3, 2, 4)]


def make_case(shape, seed: int, one_hot: bool):
    """Logits, targets, a (1, z, y, x) mask shared by the maps, and per-map positive weights."""
    rng = np.random.default_rng(seed)
    pred = rng.standard_normal(shape) * 2
    if one_hot:
        target = np.eye(shape[0])[rng.integers(0, shape[0], shape[1:])].transpose(3, 0, 1, 2)
    else:
        target = (rng.random(shape) > 0.5).astype(np.float64)
    mask = (rng.random((1, *shape[1:])) > 0.3).astype(np.float64)
    weight = rng.random(shape) + 0.5
    return pred, target, mask, weight


def reference_cost(name: str, pred, target, mask, weight) -> float:
    """Plain loops and the math module; the cost of each voxel times its weight, skipping masked voxels."""
    factor = np.broadcast_to(mask > 0, pred.shape) * np.broadcast_to(weight, pred.shape)
    total = 0.0
    maps = pred.shape[0]
    for i in np.ndindex(pred.shape[1:]):
        z = [float(pred[(c, *i)]) for c in range(maps)]
        for c in range(maps):
            w, t = float(factor[(c, *i)]), float(target[(c, *i)])
            if w == 0:
                continue
            if name == "square_loss":
                total += w * (z[c] - t) ** 2
            elif name == "binomial_cross_entropy":
                p = 1 / (1 + math.exp(-z[c]))
                total += w * (-t * math.log(p) - (1 - t) * math.log(1 - p))
            else:
                log_p = z[c] - math.log(sum(math.exp(v) for v in z))
                total += -w * t * log_p
    return total


def finite_difference(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        grad[i] = (f(xp) - f(xm)) / (2 * h)
    return grad


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_loss_cost_matches_loops_and_grad_matches_finite_differences(name, shape, masked):
    loss = LOSSES[name]
    pred, target, mask, weight = make_case(shape, seed=sum(shape), one_hot=name == "softmax_loss")
    m, w = (mask, weight) if masked else (None, None)
    cost, grad = loss(pred, target, m, w)
    ones = np.ones(pred.shape)
    ref = reference_cost(name, pred, target, ones if m is None else m, ones if w is None else w)
    assert math.isclose(cost, ref, rel_tol=1e-10, abs_tol=1e-12)  # one-map softmax costs 0
    fd = finite_difference(lambda p: loss(p, target, m, w)[0], pred)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-7)
    if masked:
        assert np.all(grad[:, mask[0] == 0] == 0)


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_float32_matches_float64(name):
    pred, target, mask, weight = make_case((2, 3, 4, 4), seed=1, one_hot=name == "softmax_loss")
    cost64, grad64 = LOSSES[name](pred, target, mask, weight)
    cost32, grad32 = LOSSES[name](pred.astype(np.float32), target.astype(np.float32), mask, weight)
    assert grad32.dtype == np.float32
    assert math.isclose(cost32, cost64, rel_tol=1e-4)
    np.testing.assert_allclose(grad32, grad64, rtol=1e-4, atol=1e-6)


def test_znn_definitions():
    """ZNN's cost_fn.py: square cost sum (p-t)^2 with gradient 2(p-t); cross-entropies give prop - lbl."""
    pred, target, _, _ = make_case((2, 1, 3, 3), seed=3, one_hot=True)
    cost, grad = square_loss(pred, target)
    assert math.isclose(cost, float(np.sum((pred - target) ** 2)))
    np.testing.assert_allclose(grad, 2 * (pred - target))
    np.testing.assert_allclose(binomial_cross_entropy(pred, target)[1], sigmoid(pred) - target, rtol=1e-12)
    np.testing.assert_allclose(softmax_loss(pred, target)[1], softmax(pred) - target, rtol=1e-12, atol=1e-15)


def test_cross_entropies_are_stable_for_huge_logits_and_ignore_nan_in_masked_voxels():
    pred = np.array([-1e4, -40.0, 40.0, 1e4]).reshape(1, 1, 1, 4)
    target = np.array([1.0, 0.0, 1.0, 0.0]).reshape(1, 1, 1, 4)
    cost, grad = binomial_cross_entropy(pred, target)
    assert math.isclose(cost, 1e4 + 2 * math.log1p(math.exp(-40)) + 1e4, rel_tol=1e-12)
    np.testing.assert_allclose(grad.ravel(), [-1, 0, 0, 1], atol=1e-15)
    two = np.concatenate([pred, -pred])
    cost, grad = softmax_loss(two, np.concatenate([target, 1 - target]))
    assert np.isfinite(cost) and np.all(np.isfinite(grad))
    nan_target = target.copy()
    nan_target[0, 0, 0, 0] = np.nan
    mask = np.array([0, 1, 1, 1]).reshape(1, 1, 1, 4)
    for loss in LOSSES.values():
        cost, grad = loss(pred, nan_target, mask)
        assert np.isfinite(cost) and np.all(np.isfinite(grad)) and grad[0, 0, 0, 0] == 0


def test_loss_shape_errors():
    pred = np.zeros((2, 1, 3, 3))
    with pytest.raises(ShapeError, match=r"target shape \(1, 1, 3, 3\) does not match prediction shape"):
        square_loss(pred, np.zeros((1, 1, 3, 3)))
    with pytest.raises(ShapeError, match=r"weight shape \(2, 1, 3, 2\) does not broadcast"):
        softmax_loss(pred, pred, weight=np.ones((2, 1, 3, 2)))


# ---------------------------------------------------------------------------------------------------- rebalance


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", ["half", "fraction"])
@pytest.mark.parametrize("masked", [False, True])
def test_rebalance_gives_each_class_equal_total_weight_per_map(shape, norm, masked):
    rng = np.random.default_rng(10)
    target = (rng.random(shape) > 0.8).astype(np.float32)
    target.reshape(shape[0], -1)[:, :2] = [1, 0]  # both classes present in every map
    mask = (rng.random((1, *shape[1:])) > 0.2) if masked else None
    if mask is not None:
        mask.reshape(-1)[:2] = True
    w = rebalance_weights(target, mask, norm)
    assert w.dtype == np.float32 and w.shape == shape
    valid = np.ones(shape, bool) if mask is None else np.broadcast_to(mask, shape)
    for c in range(shape[0]):
        pos = (target[c] > 0) & valid[c]
        neg = (target[c] == 0) & valid[c]
        assert math.isclose(w[c][pos].sum(), w[c][neg].sum(), rel_tol=1e-5)
        n_pos, n_neg = pos.sum(), neg.sum()
        if norm == "half":  # ZNN _get_balance_weight
            assert np.allclose(w[c][pos], 0.5 * (n_pos + n_neg) / n_pos)
            assert math.isclose(w[c][valid[c]].mean(), 1.0, rel_tol=1e-5)
        else:  # ZNN _get_balance_weight_v1
            assert np.allclose(w[c][pos], (1 / n_pos) / (1 / n_pos + 1 / n_neg))
        assert np.all(w[c][~valid[c]] == 0)


def test_rebalance_one_class_gives_ones_and_bad_norm_is_rejected():
    target = np.ones((2, 1, 3, 3))
    np.testing.assert_array_equal(rebalance_weights(target), 1.0)
    with pytest.raises(ValueError, match="'half' or 'fraction'"):
        rebalance_weights(target, norm="global")
    with pytest.raises(ShapeError, match=r"mask shape \(1, 1, 2, 3\) does not broadcast"):
        rebalance_weights(target, np.ones((1, 1, 2, 3)))


def test_pixel_error():
    pred = np.array([0.9, 0.2, 0.6, 0.4]).reshape(1, 1, 1, 4)
    target = np.array([1, 1, 0, 0]).reshape(1, 1, 1, 4)
    assert pixel_error(pred, target) == 0.5
    assert pixel_error(pred, target, np.array([1, 0, 1, 1]).reshape(1, 1, 1, 4)) == pytest.approx(1 / 3)
    assert pixel_error(pred, target, np.zeros((1, 1, 1, 4))) == 0.0
