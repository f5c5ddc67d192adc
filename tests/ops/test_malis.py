"""MALIS weights against a brute-force maximin computation over every voxel pair of small graphs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from znn.errors import ConfigError, ShapeError
from znn.ops.malis import affinity_edges, malis_weights


def brute_force(aff: np.ndarray, seg: np.ndarray, norm_type: str):
    """Max-min closure (Floyd-Warshall with (max, min)) gives every pair's maximin affinity; with distinct
    affinities the edge carrying that value is the pair's maximin edge. Count the pairs on it."""
    shape = seg.shape
    n = seg.size
    flat_aff, va, vb = affinity_edges(shape)
    values = aff.ravel()[flat_aff]
    best = np.full((n, n), -np.inf)
    best[va, vb] = best[vb, va] = values
    np.fill_diagonal(best, np.inf)
    for k in range(n):
        best = np.maximum(best, np.minimum(best[:, k, None], best[None, k, :]))
    edge_of_value = {v: e for e, v in zip(flat_aff, values)}
    ids = seg.ravel()
    seg_size = {i: int(np.sum(ids == i)) for i in np.unique(ids)}
    merger = np.zeros(aff.size)
    splitter = np.zeros(aff.size)
    false_pairs = 0.0
    for a, b in itertools.combinations(range(n), 2):
        if ids[a] == 0 or ids[b] == 0:
            continue
        amount = 1.0 / (seg_size[ids[a]] * seg_size[ids[b]]) if norm_type == "frac" else 1.0
        value = best[a, b]
        e = edge_of_value[value]
        if ids[a] == ids[b]:
            splitter[e] += amount
            false_pairs += amount * (value < 0.5)
        else:
            merger[e] += amount
            false_pairs += amount * (value > 0.5)
    nb = int(np.count_nonzero(ids))
    scale = {"num": 1 / nb, "pair": 1 / (nb * (nb - 1))}.get(norm_type, 1.0)
    return (merger * scale).reshape(aff.shape), (splitter * scale).reshape(aff.shape), false_pairs / (nb * (nb - 1) / 2)


def random_case(shape, seed: int, n_ids: int = 3):
    rng = np.random.default_rng(seed)
    aff = rng.permutation(3 * int(np.prod(shape))).reshape(3, *shape) / (3 * np.prod(shape))  # no ties
    seg = rng.integers(0, n_ids + 1, shape)
    seg.reshape(-1)[:3] = [1, 1, 2]  # at least two segments and some non-boundary pairs
    return aff, seg


SMALL_SHAPES = [(1, 3, 4), (1, 1, 6), (2, 3, 3), (3, 2, 2), (2, 2, 4)]


@pytest.mark.parametrize("shape", SMALL_SHAPES)
@pytest.mark.parametrize("norm_type", ["none", "frac", "num", "pair"])
@pytest.mark.parametrize("seed", [0, 1])
def test_malis_matches_brute_force(shape, norm_type, seed):
    aff, seg = random_case(shape, seed)
    weights, info = malis_weights(aff, seg, norm_type)
    merger, splitter, rand_error = brute_force(aff, seg, norm_type)
    if norm_type == "none":  # pure counts: exact
        np.testing.assert_array_equal(info.merger, merger)
        np.testing.assert_array_equal(info.splitter, splitter)
    np.testing.assert_allclose(info.merger, merger, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(info.splitter, splitter, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(weights, merger + splitter, rtol=1e-12, atol=1e-15)
    assert info.rand_error == pytest.approx(rand_error, rel=1e-12)
    assert info.n_nonboundary == np.count_nonzero(seg)


def test_malis_weights_total_every_pair_once_and_edges_without_predecessor_get_zero():
    aff, seg = random_case((3, 5, 6), seed=3, n_ids=4)
    weights, info = malis_weights(aff, seg)
    n = info.n_nonboundary
    assert weights.sum() == n * (n - 1) / 2
    assert np.all(weights[0, 0] == 0) and np.all(weights[1, :, 0] == 0) and np.all(weights[2, :, :, 0] == 0)
    # frac: every segment pair (including a segment with itself) totals 1
    frac, _ = malis_weights(aff, seg, "frac")
    sizes = np.unique(seg[seg > 0], return_counts=True)[1]
    k = len(sizes)
    expected = k * (k - 1) / 2 + sum((s - 1) / (2 * s) for s in sizes)
    assert frac.sum() == pytest.approx(expected, rel=1e-12)


def test_malis_depends_only_on_affinity_order_and_keeps_dtype():
    aff, seg = random_case((2, 4, 5), seed=4)
    w, _ = malis_weights(aff, seg)
    logits = np.log(aff + 1e-3) - np.log1p(-aff + 1e-3)
    np.testing.assert_array_equal(malis_weights(logits, seg)[0], w)
    w32, _ = malis_weights(aff.astype(np.float32), seg[None].astype(np.float32))
    assert w32.dtype == np.float32
    np.testing.assert_array_equal(w32, w.astype(np.float32))


def test_malis_runs_on_a_1e5_voxel_patch():
    rng = np.random.default_rng(5)
    shape = (10, 100, 100)
    aff = rng.random((3, *shape)).astype(np.float32)
    seg = (np.arange(100)[None, :, None] // 20 * 5 + np.arange(100)[None, None, :] // 20 + 1) * np.ones(shape, int)
    weights, info = malis_weights(aff, seg, "num")
    n = info.n_nonboundary
    assert n == seg.size and weights.sum() == pytest.approx((n - 1) / 2, rel=1e-4)


def test_malis_errors():
    aff, seg = random_case((1, 3, 3), seed=6)
    with pytest.raises(ConfigError, match="malis_norm_type 'fraction' is not valid; did you mean 'frac'"):
        malis_weights(aff, seg, "fraction")  # type: ignore[arg-type]
    with pytest.raises(ShapeError, match=r"affinity \(3, 1, 3, 3\) and segmentation \(1, 3, 4\)"):
        malis_weights(aff, np.zeros((1, 3, 4), int))
    with pytest.raises(ShapeError, match="integer ids"):
        malis_weights(aff, seg + 0.5)
