"""Image preprocessing and label transforms against loops and hand-computed cases; MALIS's edge convention."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from znn.errors import ConfigError, ShapeError
from znn.ops.malis import affinity_edges
from znn.ops.preprocess import (
    IMAGE_PP_TYPES,
    affinity,
    affinity_mask,
    binary_class,
    label_targets,
    one_class,
    preprocess_image,
    resolve_label_pp,
    segmentation_ids,
    target_mask,
)


def loop_preprocess(vol: np.ndarray, pp: str) -> np.ndarray:
    out = np.empty(vol.shape)
    if pp == "none":
        return vol.astype(float)
    if pp == "standard2D":
        for z in range(vol.shape[0]):
            values = [float(v) for v in vol[z].ravel()]
            mean, std = statistics.fmean(values), statistics.pstdev(values)
            for y, x in np.ndindex(vol.shape[1:]):
                out[z, y, x] = (float(vol[z, y, x]) - mean) / (std or 1.0)
        return out
    values = [float(v) for v in vol.ravel()]
    if pp == "standard3D":
        mean, std = statistics.fmean(values), statistics.pstdev(values)
        return np.array([(v - mean) / std for v in values]).reshape(vol.shape)
    low, high = min(values), max(values)
    return np.array([2 * (v - low) / (high - low) - 1 for v in values]).reshape(vol.shape)


@pytest.mark.parametrize("pp", IMAGE_PP_TYPES)
@pytest.mark.parametrize("shape", [(1, 4, 5), (3, 2, 6)])
def test_image_preprocessing_matches_loop(pp, shape):
    vol = np.random.default_rng(1).integers(0, 256, shape).astype(np.uint8)
    got = preprocess_image(vol, pp, np.float64)
    np.testing.assert_allclose(got, loop_preprocess(vol, pp), rtol=1e-12, atol=1e-12)
    assert preprocess_image(vol, pp).dtype == np.float32


def test_image_preprocessing_properties_and_blank_slices():
    vol = np.random.default_rng(2).normal(5, 3, (3, 8, 9))
    vol[1] = 7.0  # a blank slice: no NaN, only centred
    out = preprocess_image(vol, "standard2D", np.float64)
    assert np.all(np.isfinite(out)) and np.all(out[1] == 0)
    np.testing.assert_allclose(out[[0, 2]].mean(axis=(1, 2)), 0, atol=1e-12)
    np.testing.assert_allclose(out[[0, 2]].std(axis=(1, 2)), 1, atol=1e-12)
    rescaled = preprocess_image(vol, "symetric_rescale", np.float64)
    assert rescaled.min() == -1 and rescaled.max() == 1
    assert np.all(preprocess_image(np.full((2, 3, 3), 4.0), "symetric_rescale") == 0)
    assert np.all(preprocess_image(np.full((2, 3, 3), 4.0), "standard3D") == 0)


def test_image_preprocessing_errors():
    with pytest.raises(ConfigError, match="did you mean 'standard2D'"):
        preprocess_image(np.zeros((1, 2, 2)), "standard2d")
    with pytest.raises(ShapeError, match=r"\(Z, Y, X\)"):
        preprocess_image(np.zeros((2, 2)), "none")


def test_binary_and_one_class_follow_znn_channel_order():
    isbi = np.array([[[0, 255, 255], [0, 0, 255]]], dtype=np.uint8)  # 0 membrane, 255 interior
    bc = binary_class(isbi)
    assert bc.shape == (2, 1, 2, 3) and bc.dtype == np.float32
    np.testing.assert_array_equal(bc[0, 0], [[0, 1, 1], [0, 0, 1]])  # channel 0: label > 0 (non-boundary)
    np.testing.assert_array_equal(bc[1, 0], [[1, 0, 0], [1, 1, 0]])  # channel 1: boundary
    seg = np.array([[[0, 3, 3], [0, 0, 7]]])
    np.testing.assert_array_equal(binary_class(seg), bc)
    np.testing.assert_array_equal(one_class(seg), bc[:1])


def test_affinity_hand_computed():
    seg = np.array([[[1, 1, 0],
                     [1, 2, 2]],
                    [[1, 2, 0],
                     [1, 2, 2]]])
    aff = affinity(seg)
    # z: voxel (1, y, x) against (0, y, x)
    np.testing.assert_array_equal(aff[0], [[[0, 0, 0], [0, 0, 0]], [[1, 0, 0], [1, 1, 1]]])
    # y: voxel (z, 1, x) against (z, 0, x)
    np.testing.assert_array_equal(aff[1], [[[0, 0, 0], [1, 0, 0]], [[0, 0, 0], [1, 1, 0]]])
    # x: voxel (z, y, 1..2) against (z, y, 0..1)
    np.testing.assert_array_equal(aff[2], [[[0, 1, 0], [0, 0, 1]], [[0, 0, 0], [0, 0, 1]]])


def test_affinity_and_mask_match_loop():
    rng = np.random.default_rng(3)
    seg = rng.integers(0, 3, (3, 4, 5))
    mask = rng.random(seg.shape) > 0.3
    aff, am = affinity(seg, np.float64), affinity_mask(mask, np.float64)
    for c in range(3):
        for v in np.ndindex(seg.shape):
            if v[c] == 0:
                assert aff[(c, *v)] == 0 and am[(c, *v)] == 0
                continue
            p = list(v)
            p[c] -= 1
            p = tuple(p)
            assert aff[(c, *v)] == float(seg[v] == seg[p] and seg[v] != 0)
            assert am[(c, *v)] == float(mask[v] and mask[p])


def test_affinity_uses_the_malis_edge_convention():
    seg = np.random.default_rng(4).integers(0, 3, (3, 4, 4))
    flat, a, b = affinity_edges(seg.shape)
    aff = affinity(seg).ravel()
    s = seg.ravel()
    np.testing.assert_array_equal(aff[flat], (s[a] == s[b]) & (s[b] != 0))


def test_label_targets_and_masks():
    seg = np.array([[[1, 1], [0, 2]]])
    assert resolve_label_pp("auto", "boundary") == "binary_class"
    assert resolve_label_pp("auto", "affinity") == "affinity"
    assert resolve_label_pp("one_class", "affinity") == "one_class"
    with pytest.raises(ConfigError, match="affinity"):
        resolve_label_pp("afinity", "boundary")
    assert label_targets(seg, "affinity").shape == (3, 1, 2, 2)
    assert label_targets(seg, "none").shape == (1, 1, 2, 2)
    assert label_targets(np.stack([seg, seg]), "none").shape == (2, 1, 2, 2)
    with pytest.raises(ConfigError, match="resolve 'auto'"):
        label_targets(seg, "auto")
    assert target_mask(None, "binary_class", (1, 2, 2)).shape == (1, 1, 2, 2)
    edge = target_mask(np.ones((1, 2, 2)), "affinity", (1, 2, 2))
    np.testing.assert_array_equal(edge[0], 0)  # one slice: no z predecessor
    np.testing.assert_array_equal(edge[1, 0], [[0, 0], [1, 1]])
    with pytest.raises(ShapeError, match="does not match"):
        target_mask(np.ones((1, 3, 2)), "binary_class", (1, 2, 2))


def test_segmentation_ids():
    assert segmentation_ids(np.array([[[1.0, 2.0]]])).dtype == np.int64
    with pytest.raises(ShapeError, match="whole-number"):
        segmentation_ids(np.array([[[1.5, 2.0]]]))
    assert math.isclose(float(affinity(np.ones((2, 1, 1), dtype=np.float32))[0, 1, 0, 0]), 1.0)
