"""The segmentation kernels: each against a slow, obviously-right reference (mean-affinity agglomeration, face
pairing, union-find, relabelling, the affinity height map), per-slice segmentation equal to slice-by-slice, the
method recovering clean synthetic cells, and its settings checked."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from znn.errors import ConfigError, ShapeError
from znn.ops.metrics import adapted_rand_error
from znn.ops.preprocess import affinity
from znn.ops.segment import (
    NO_MERGE,
    Method,
    agglomerate,
    edge_affinities,
    face_pairs,
    height_map,
    join_pairs,
    offset_ids,
    relabel,
    same_partition,
    segment,
)


# ------------------------------------------------------------------------------------------------ test data
def cells(shape: tuple[int, int, int], spacing: int, seed: int, flat: bool) -> np.ndarray:
    """Voronoi cells around a jittered grid of points (ids from 1): every cell within about ``spacing`` voxels of
    its point, so a halo of about ``2 * spacing`` holds every cell a block's core touches. ``flat``: cells of
    single z-slices (the points of each slice apart)."""
    rng = np.random.default_rng(seed)
    axes = [np.arange(spacing // 2, s, spacing) for s in shape]
    if flat:
        axes[0] = np.arange(shape[0])
    points = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    jitter = rng.integers(-(spacing // 4), spacing // 4 + 1, points.shape)
    if flat:
        jitter[:, 0] = 0
    points = np.clip(points + jitter, 0, np.array(shape) - 1)
    marks = np.zeros(shape, np.int64)
    marks[tuple(points.T)] = np.arange(1, len(points) + 1)
    sampling = (1e3, 1, 1) if flat else (1, 1, 1)  # far apart in z: the nearest point lies in the same slice
    nearest = ndimage.distance_transform_edt(marks == 0, sampling=sampling, return_distances=False,
                                             return_indices=True)
    labels: np.ndarray = marks[tuple(nearest)]
    return labels


def edges(labels: np.ndarray, flat: bool) -> np.ndarray:
    """The voxels before a change of id (along y and x only when ``flat``)."""
    found = np.zeros(labels.shape, bool)
    for axis in range(1 if flat else 0, 3):
        before = [slice(None)] * 3
        before[axis] = slice(None, -1)
        found[tuple(before)] |= np.diff(labels, axis=axis) != 0
    return found


def boundary_map(labels: np.ndarray, seed: int, flat: bool) -> np.ndarray:
    """A boundary probability of ``labels``: 1 on its :func:`edges`, falling off with the distance to them, plus
    uniform noise of 0.1."""
    distance = ndimage.distance_transform_edt(~edges(labels, flat), sampling=(1e3, 1, 1) if flat else (1, 1, 1))
    noise = np.random.default_rng(seed).random(labels.shape)
    return np.clip(np.exp(-distance / 1.5) + 0.1 * noise, 0, 1).astype(np.float32)


def affinity_map(labels: np.ndarray, seed: int) -> np.ndarray:
    """Affinities of ``labels`` scaled to 0.7 plus uniform noise of 0.4: noisy edges inside and between cells."""
    noise = np.random.default_rng(seed).random((3, *labels.shape))
    return np.clip(affinity(labels) * 0.7 + 0.4 * noise, 0, 1).astype(np.float32)


# ------------------------------------------------------------------------------------------------ references
def slow_height(aff: np.ndarray, flat: bool) -> np.ndarray:
    """1 - the mean affinity of each voxel's edges, voxel by voxel."""
    shape = aff.shape[1:]
    out = np.zeros(shape)
    for v in itertools.product(*map(range, shape)):
        found = []
        for axis in range(1 if flat else 0, 3):
            if v[axis] > 0:
                found.append(aff[(axis, *v)])
            after = list(v)
            after[axis] += 1
            if after[axis] < shape[axis]:
                found.append(aff[(axis, *after)])
        out[v] = 1 - np.mean(found)
    return out


def slow_agglomerate(fragments: np.ndarray, aff: np.ndarray, threshold: float) -> np.ndarray:
    """Merge the pair of regions with the highest mean affinity over the voxel edges between them while it is above
    ``threshold``, recomputing every mean from the voxels after each merge."""
    labels = fragments.copy()
    while True:
        sums: dict[tuple[int, int], list[float]] = {}
        for axis in range(3):
            for v in itertools.product(*map(range, labels.shape)):
                if v[axis] == 0:
                    continue
                u = list(v)
                u[axis] -= 1
                a, b = labels[v], labels[tuple(u)]
                if a != b:
                    sums.setdefault((min(a, b), max(a, b)), []).append(float(aff[(axis, *v)]))
        best = max(sums.items(), key=lambda item: np.mean(item[1]), default=None)
        if best is None or np.mean(best[1]) <= threshold:
            return labels
        labels[labels == best[0][1]] = best[0][0]


def slow_union(pairs: list[tuple[int, int]]) -> dict[int, int]:
    """id -> smallest id of its object, by repeated merging of sets."""
    sets: list[set[int]] = []
    for a, b in pairs:
        touching = [s for s in sets if a in s or b in s]
        merged = {a, b}.union(*touching)
        sets = [s for s in sets if s not in touching] + [merged]
    return {i: min(s) for s in sets for i in s}


# ------------------------------------------------------------------------------------------------ kernels
@pytest.mark.parametrize("flat", [False, True])
def test_affinity_height_map_equals_voxel_by_voxel(flat):
    aff = np.random.default_rng(0).random((3, 3, 4, 5))
    got = height_map(aff, Method.of("affinity", "2d" if flat else "3d"))
    np.testing.assert_allclose(got, slow_height(aff, flat), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_agglomeration_equals_the_slow_reference(seed):
    rng = np.random.default_rng(seed)
    fragments = segment(rng.random((1, 3, 8, 8)), Method.of("boundary", "3d", seed_threshold=0.3, min_size=0,
                                                            sigma=0))
    aff = rng.random((3, *fragments.shape))
    got = agglomerate(fragments, aff, 0.5, flat=False)
    want = slow_agglomerate(fragments, aff, 0.5)
    assert fragments.max() > 10 and len(np.unique(got)) < fragments.max()  # something merged, not everything
    assert same_partition(got, want)


def slow_boundary_affinities(prob: np.ndarray, flat: bool) -> np.ndarray:
    """Each voxel's edge to its predecessor along an axis: 1 - the larger boundary probability of the two."""
    aff = np.zeros((3, *prob.shape))
    for axis in range(1 if flat else 0, 3):
        for v in itertools.product(*map(range, prob.shape)):
            if v[axis] > 0:
                u = list(v)
                u[axis] -= 1
                aff[(axis, *v)] = 1 - max(prob[v], prob[tuple(u)])
    return aff


@pytest.mark.parametrize("flat", [False, True])
def test_boundary_edge_affinities_equal_voxel_by_voxel(flat):
    prob = np.random.default_rng(1).random((3, 4, 5))
    method = Method.of("boundary", "2d" if flat else "3d")
    got = edge_affinities(prob, height_map(prob, method), method)
    np.testing.assert_array_equal(got, slow_boundary_affinities(prob, flat))


def test_boundary_agglomeration_equals_the_slow_reference_on_its_edge_affinities():
    prob = np.random.default_rng(4).random((2, 8, 8))
    fragments_only = Method.of("boundary", "3d", seed_threshold=0.3, min_size=0, sigma=0)
    fragments = segment(prob, fragments_only)
    got = segment(prob, Method.of("boundary", "3d", seed_threshold=0.3, min_size=0, sigma=0, merge_threshold=0.4))
    want = slow_agglomerate(fragments, slow_boundary_affinities(prob, flat=False), 0.4)
    assert fragments.max() > 10 and 1 < len(np.unique(got)) < fragments.max()  # something merged, not everything
    assert same_partition(got, want)


def test_boundary_fragments_merge_across_a_faint_membrane_only():
    """Two cells apart by a strong membrane, the first split in two by a faint line: with a merge threshold of 0.5
    the faint line's fragments merge (edges 0.8), the cells stay apart (edges 0.1); boundary maps' default merges
    nothing."""
    prob = np.full((1, 20, 30), 0.02)
    prob[:, :, 20] = 0.9  # the membrane between the cells
    prob[:, 10, :20] = 0.2  # a faint line across the first cell: above the seed threshold, so it splits its seeds
    settings = {"seed_threshold": 0.1, "min_size": 0, "sigma": 0.0}
    fragments = segment(prob, Method.of("boundary", **settings))
    merged = segment(prob, Method.of("boundary", **settings, merge_threshold=0.5))
    assert Method.of("boundary").merge_threshold == NO_MERGE
    assert len(np.unique(fragments)) == 3 and len(np.unique(merged)) == 2
    assert merged[0, 5, 5] == merged[0, 15, 5] != merged[0, 5, 25]


def test_face_pairs_join_mutual_majorities():
    first = np.array([[1, 1, 1, 1, 2, 2, 3, 3, 3, 0]])
    second = np.array([[7, 7, 7, 8, 8, 8, 9, 9, 9, 9]])
    # 1 and 7: 3 of 1's 4 voxels, all 3 of 7's; 2 and 8: both of 2's, but 2 of 8's 3 (8 has one in 1): a majority
    # both ways; 3 and 9: all 3 of 3's, 3 of 9's 3 counted (the 0 is ignored)
    assert {tuple(p) for p in face_pairs(first, second).tolist()} == {(1, 7), (2, 8), (3, 9)}
    # 4 covers two ids of the other side: each holds a majority of its own voxels in 4, but neither half of 4's
    assert face_pairs(np.array([4, 4, 4, 4]), np.array([5, 5, 6, 6])).size == 0


@pytest.mark.parametrize("seed", range(3))
def test_face_pairs_equal_counting_by_hand(seed):
    rng = np.random.default_rng(seed)
    first, second = rng.integers(0, 4, (4, 9)), rng.integers(0, 4, (4, 9))
    first[:2] = second[:2] = 1  # some pairs hold a majority
    want = set()
    for a, b in itertools.product(range(1, 4), repeat=2):
        both = int(np.sum((first == a) & (second == b)))
        of_a, of_b = int(np.sum((first == a) & (second > 0))), int(np.sum((second == b) & (first > 0)))
        if both > 0.5 * of_a and both > 0.5 * of_b:
            want.add((a, b))
    assert (1, 1) in want
    assert {tuple(p) for p in face_pairs(first, second).tolist()} == want


def test_join_and_relabel_equal_the_slow_union_and_relabelling_twice_changes_nothing():
    rng = np.random.default_rng(4)
    pairs = [(int(a), int(b)) for a, b in rng.integers(1, 40, (25, 2))]
    ids, roots = join_pairs(np.array(pairs, np.uint64))
    assert dict(zip(ids.tolist(), roots.tolist())) == slow_union(pairs)
    labels = rng.integers(0, 50, (5, 6, 7)).astype(np.uint64)
    once = relabel(labels, ids, roots)
    mapping = slow_union(pairs)
    assert once.tolist() == np.vectorize(lambda i: mapping.get(int(i), int(i)))(labels).tolist()
    np.testing.assert_array_equal(relabel(once, ids, roots), once)
    assert join_pairs(np.zeros((0, 2), np.uint64))[0].size == 0


def test_offset_ids_keep_zero():
    got = offset_ids(np.array([[0, 1, 2]]), 1 << 40)
    assert got.dtype == np.uint64 and got.tolist() == [[0, (1 << 40) + 1, (1 << 40) + 2]]


def test_same_partition():
    a = np.array([1, 1, 2, 0])
    assert same_partition(a, np.array([5, 5, 9, 0]))
    assert not same_partition(a, np.array([5, 5, 5, 0]))  # merged
    assert not same_partition(a, np.array([5, 6, 9, 0]))  # split
    assert not same_partition(a, np.array([5, 5, 9, 3]))  # 0 is not an id


# ------------------------------------------------------------------------------------------------ the method
def test_per_slice_segmentation_equals_segmenting_each_slice():
    labels = cells((3, 40, 40), 10, 0, flat=True)
    prob = boundary_map(labels, 0, flat=True)
    method = Method.of("boundary", "2d", seed_threshold=0.3)
    whole = segment(prob, method)
    for z in range(3):
        assert same_partition(whole[z], segment(prob[z : z + 1], method)[0])
    assert not set(np.unique(whole[0])) & set(np.unique(whole[1]))  # ids unique over the stack


def test_clean_cells_are_recovered():
    """Affinities name the cell of every voxel: recovered exactly. A boundary map leaves its ridge to the
    watershed: every cell found, and exactly so off the ridge (which the scores ignore, as ISBI's do)."""
    labels = cells((12, 32, 32), 8, 1, flat=False)
    got = segment(affinity_map(labels, 1), Method.of("affinity", "3d", seed_threshold=0.3, min_size=0))
    assert same_partition(got, labels)
    labels = cells((2, 64, 64), 12, 1, flat=True)
    got = segment(boundary_map(labels, 1, True), Method.of("boundary", "2d", seed_threshold=0.3, min_size=0))
    assert len(np.unique(got)) == len(np.unique(labels))
    assert adapted_rand_error(got, np.where(edges(labels, True), 0, labels))[0] < 1e-9


def test_two_channel_boundary_maps_use_channel_1_and_nonboundary_flips():
    labels = cells((1, 32, 32), 8, 2, flat=True)
    prob = boundary_map(labels, 2, True)
    method = Method.of("boundary", seed_threshold=0.3)
    want = segment(prob, method)
    assert same_partition(segment(np.stack([1 - prob, prob]), method), want)
    assert same_partition(segment((1 - prob)[None], Method.of("boundary", nonboundary=True, seed_threshold=0.3)),
                          want)


def test_min_size_gives_small_segments_to_neighbours():
    prob = np.zeros((1, 20, 20), np.float32)
    prob[0, 13:18, 13:18] = 1.0  # a closed ring ...
    prob[0, 14:17, 14:17] = 0.0  # ... around a 9-voxel seed: a segment of 9 to 25 voxels
    kept = segment(prob, Method.of("boundary", min_size=0, sigma=0, seed_threshold=0.5))
    dropped = segment(prob, Method.of("boundary", min_size=30, sigma=0, seed_threshold=0.5))
    assert 9 <= np.bincount(kept.ravel())[1:].min() <= 25
    assert len(np.unique(kept)) == 2 and len(np.unique(dropped)) == 1 and dropped.min() == 1


@pytest.mark.parametrize("settings, message", [
    ({"out_type": "segmentation"}, "type 'segmentation' is not valid"),
    ({"dims": "4d"}, "dims '4d' is not valid"),
    ({"seed_threshold": 1.5}, "seed-threshold 1.5 is not within"),
    ({"sigma": -1.0}, "must be finite numbers >= 0"),
])
def test_bad_settings_are_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        Method(**settings)


def test_of_fills_in_the_type_defaults_and_refuses_unknown_settings():
    assert Method.of("affinity").sigma == 0.0 and Method.of("boundary", min_size=5).min_size == 5
    with pytest.raises(ConfigError, match="not a setting of the segmentation method; did you mean 'sigma'"):
        Method.of("boundary", sigmaa=1.0)


def test_an_affinity_map_must_have_three_channels():
    with pytest.raises(ShapeError, match=r"an affinity map is \(3, Z, Y, X\)"):
        segment(np.zeros((2, 2, 4, 4)), Method.of("affinity"))
