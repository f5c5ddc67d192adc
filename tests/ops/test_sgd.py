"""ZNN's SGD rule (filter.hpp) element by element, and learning-rate annealing."""

from __future__ import annotations

import numpy as np
import pytest

from znn.errors import ShapeError
from znn.ops.sgd import anneal, sgd_update


def reference_step(w: float, g: float, v: float, eta, mom, wd, ps) -> tuple[float, float]:
    """One scalar step of ZNN's filter::update, both of its branches written out."""
    if mom == 0:
        return w * (1 - eta * wd) - eta / ps * g, v
    v = mom * v - eta / ps * g - eta * wd * w
    return w + v, v


@pytest.mark.parametrize("eta,mom,wd,ps", [(0.01, 0.0, 0.0, 1), (0.01, 0.0, 1e-3, 1), (0.05, 0.9, 0.0, 1),
                                           (0.02, 0.9, 1e-2, 1), (0.1, 0.5, 1e-3, 64)])
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_sgd_matches_znn_rule_over_several_steps(eta, mom, wd, ps, dtype, rtol):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 3, 1, 3, 3)).astype(dtype)
    v = np.zeros_like(w)
    w_ref, v_ref = w.astype(np.float64), v.astype(np.float64)
    param, velocity = w, v
    for _ in range(4):
        g = rng.standard_normal(w.shape).astype(dtype)
        sgd_update(w, g, v, eta, mom, wd, patch_size=ps)
        for i in np.ndindex(w.shape):
            w_ref[i], v_ref[i] = reference_step(w_ref[i], float(g[i]), v_ref[i], eta, mom, wd, ps)
    assert w is param and v is velocity and w.dtype == dtype and v.dtype == dtype  # updated in place
    np.testing.assert_allclose(w, w_ref, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(v, v_ref, rtol=rtol, atol=rtol)


def test_momentum_free_branch_equals_the_general_formula():
    """ZNN's two branches agree: with momentum 0 the velocity form gives the same weights."""
    rng = np.random.default_rng(1)
    w0, g = rng.standard_normal(5), rng.standard_normal(5)
    w = w0.copy()
    sgd_update(w, g, np.zeros(5), eta=0.1, momentum=0.0, weight_decay=0.01, patch_size=8)
    np.testing.assert_allclose(w, w0 + (0 - 0.1 / 8 * g - 0.1 * 0.01 * w0), rtol=1e-14)


def test_sgd_errors():
    with pytest.raises(ShapeError, match=r"param \(3,\), grad \(2,\), velocity \(3,\)"):
        sgd_update(np.zeros(3), np.zeros(2), np.zeros(3), 0.1)
    with pytest.raises(ShapeError, match="patch_size must be a positive"):
        sgd_update(np.zeros(3), np.zeros(3), np.zeros(3), 0.1, patch_size=0)


@pytest.mark.parametrize("iteration,expected", [(0, 0.1), (1, 0.1), (999, 0.1), (1000, 0.05), (2500, 0.025)])
def test_anneal(iteration, expected):
    assert anneal(0.1, 0.5, iteration, 1000) == pytest.approx(expected, rel=1e-15)


def test_anneal_disabled_when_every_is_not_positive():
    assert anneal(0.1, 0.5, 5000, 0) == 0.1
