"""Patch sampling: input/target alignment under mirroring and every augmentation, affinity augmentation,
rebalancing, ranges, determinism, several inputs, masks and errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from znn.errors import ConfigError, ShapeError
from znn.io.samples import make_sample
from znn.ops.loss import rebalance_weights
from znn.ops.preprocess import affinity, affinity_mask, binary_class
from znn.pipeline.train.sampler import IDENTITY, PatchSampler, SamplerOptions, Transform

ALL_FLIPS = list(itertools.product((False, True), repeat=3))


def segmentation(shape, seed=0, n=5):
    rng = np.random.default_rng(seed)
    seg = rng.integers(1, n, shape)
    seg[rng.random(shape) < 0.2] = 0
    return seg


def id_sample(shape, seed=0, out_type="boundary", mask=None):
    """A sample whose input *is* its segmentation (as float), so alignment can be read off the patches."""
    seg = segmentation(shape, seed)
    return make_sample([seg.astype(np.float64)], [seg], out_type=out_type, masks=None if mask is None else [mask],
                       dtype=np.float64), seg


def centre(arr, margins):
    """The part of an input patch under the output patch: ``(I - O) // 2`` voxels in on each axis."""
    b = [m // 2 for m in margins]
    return arr[..., b[0]:arr.shape[-3] - (margins[0] - b[0]), b[1]:arr.shape[-2] - (margins[1] - b[1]),
               b[2]:arr.shape[-1] - (margins[2] - b[2])]


@pytest.mark.parametrize("fov", [(3, 3, 3), (4, 4, 4), (1, 2, 5)])
@pytest.mark.parametrize("mirror", [False, True])
def test_inputs_and_targets_stay_aligned_under_every_transform(fov, mirror):
    out = (3, 3, 3) if fov[0] > 1 else (1, 4, 4)
    inp = tuple(o + f - 1 for o, f in zip(out, fov))
    data, seg = id_sample((7, 9, 10), seed=1)
    sampler = PatchSampler([data], {"input": inp}, out, fov, SamplerOptions(mirror, True, "none", 0))
    if len(set(inp)) == 1:
        perms = list(itertools.permutations(range(3)))
    else:
        perms = [(0, 1, 2), (0, 2, 1)] if inp[1] == inp[2] else [(0, 1, 2)]
    transforms = [Transform(f, p) for p in perms for f in ALL_FLIPS]
    low, high = sampler.position_range()
    for t in transforms:
        for pos in (low, high, tuple((lo + hi) // 2 for lo, hi in zip(low, high))):
            patch = sampler.patch_at(0, pos, t)
            x = patch.inputs["input"][0]
            assert x.shape == tuple(inp[a] for a in t.perm)
            label = patch.labels["output"]
            region = seg[tuple(slice(p, p + o) for p, o in zip(pos, out))]
            np.testing.assert_array_equal(label, t.apply(region))
            np.testing.assert_array_equal(centre(x, [inp[a] - out[a] for a in t.perm]), label)
            np.testing.assert_array_equal(patch.targets["output"], binary_class(label))


def test_random_transforms_keep_shapes_and_cover_the_group():
    data, _ = id_sample((6, 12, 12))
    iso = PatchSampler([data], {"in": (5, 5, 5)}, (3, 3, 3), None, SamplerOptions(True, True, "none", 3))
    seen = {iso.random_transform(iso.rng) for _ in range(2000)}
    assert len(seen) == 48  # 8 flips x 6 axis orders
    flat = PatchSampler([data], {"in": (1, 7, 7)}, (1, 3, 3), None, SamplerOptions(True, True, "none", 3))
    seen = {flat.random_transform(flat.rng) for _ in range(500)}
    assert {t.perm for t in seen} == {(0, 1, 2), (0, 2, 1)} and len(seen) == 16
    aniso = PatchSampler([data], {"in": (1, 7, 9)}, (1, 3, 5), None, SamplerOptions(True, True, "none", 3))
    assert all(aniso.random_transform(aniso.rng).perm == (0, 1, 2) for _ in range(50))
    for patch in iso.sample(20):
        assert patch.inputs["in"].shape == (1, 5, 5, 5) and patch.targets["output"].shape == (2, 3, 3, 3)


def reflect(i: int, n: int) -> int:
    """numpy 'symmetric' / ZNN mirror index: ... 1 0 | 0 1 ... n-1 | n-1 n-2 ..."""
    while i < 0 or i >= n:
        i = -i - 1 if i < 0 else 2 * n - 1 - i
    return i


@pytest.mark.parametrize("fov", [(1, 5, 5), (3, 4, 6)])
def test_mirroring_matches_loop(fov):
    data, seg = id_sample((4, 5, 6), seed=2)
    out = (2, 3, 3)
    inp = tuple(o + f - 1 for o, f in zip(out, fov))
    sampler = PatchSampler([data], {"input": inp}, out, fov, SamplerOptions(True, False, "none", 0))
    assert sampler.position_range() == ((0, 0, 0), (2, 2, 3))
    for pos in [(0, 0, 0), (2, 2, 3), (1, 0, 3)]:
        x = sampler.patch_at(0, pos).inputs["input"][0]
        start = [p - (f - 1) // 2 for p, f in zip(pos, fov)]
        for idx in np.ndindex(x.shape):
            src = tuple(reflect(s + i, n) for s, i, n in zip(start, idx, seg.shape))
            assert x[idx] == seg[src]


def test_position_ranges_and_draws_stay_inside():
    data, _ = id_sample((5, 12, 13))
    fov = (3, 4, 5)
    out = (1, 4, 4)
    inp = tuple(o + f - 1 for o, f in zip(out, fov))
    plain = PatchSampler([data], {"input": inp}, out, fov, SamplerOptions(False, False, "none", 0))
    assert plain.position_range() == ((1, 1, 2), (3, 6, 7))
    aug = PatchSampler([data], {"input": inp}, out, fov, SamplerOptions(False, True, "none", 0))
    assert aug.position_range() == ((1, 2, 2), (3, 6, 7))  # either flip must fit: ceil((F-1)/2) on both sides
    mirrored = PatchSampler([data], {"input": inp}, out, fov, SamplerOptions(True, True, "none", 0))
    assert mirrored.position_range() == ((0, 0, 0), (4, 8, 9))
    for sampler in (plain, aug, mirrored):
        patches = sampler.sample(300)
        positions = np.array([p.position for p in patches])
        low, high = sampler.position_range()
        assert np.all(positions.min(axis=0) == low) and np.all(positions.max(axis=0) == high)
        assert all(p.inputs["input"].shape[1:] == tuple(inp[a] for a in p.transform.perm) for p in patches)
    with pytest.raises(ShapeError, match="outside the valid range"):
        plain.patch_at(0, (0, 0, 0))


def reference_affinity_patch(seg, valid, pos, out, t):
    """Affinities of the whole transformed volume (padded by one voxel of id 0 / invalid), cut at the patch."""
    tseg, tvalid = t.apply(np.pad(seg, 1)), t.apply(np.pad(valid, 1))
    start = [p + 1 for p in pos]
    start = [(s + 2) - (st + o) if f else st for s, st, o, f in zip(seg.shape, start, out, t.flips)]
    region = tuple(slice(start[a], start[a] + out[a]) for a in t.perm)
    return affinity(tseg, np.float64)[(slice(None), *region)], affinity_mask(tvalid, np.float64)[(slice(None), *region)]


@pytest.mark.parametrize("out", [(3, 3, 3), (2, 4, 4)])
def test_affinity_targets_recomputed_after_augmentation(out):
    shape = (5, 7, 8)
    seg = segmentation(shape, seed=4, n=3)
    valid = np.random.default_rng(5).random(shape) > 0.15
    data = make_sample([seg.astype(np.float64)], [seg], out_type="affinity", masks=[valid], dtype=np.float64)
    inp = tuple(o + 2 for o in out)
    sampler = PatchSampler([data], {"input": inp}, out, (3, 3, 3), SamplerOptions(True, True, "none", 0))
    perms = list(itertools.permutations(range(3))) if len(set(out)) == 1 else [(0, 1, 2), (0, 2, 1)]
    low, high = sampler.position_range()
    for t in [Transform(f, p) for p in perms for f in ALL_FLIPS]:
        for pos in (low, high, (1, 2, 3)):
            patch = sampler.patch_at(0, pos, t)
            want_aff, want_mask = reference_affinity_patch(seg, valid, pos, out, t)
            np.testing.assert_array_equal(patch.targets["output"], want_aff)
            np.testing.assert_array_equal(patch.masks["output"], want_mask)
            np.testing.assert_array_equal(centre(patch.inputs["input"][0], [2, 2, 2]), patch.labels["output"])
            assert patch.segmentation["output"] is patch.labels["output"]


def test_flip_turns_predecessor_edges_into_successor_edges():
    seg = segmentation((3, 6, 9), seed=6, n=3)
    data = make_sample([seg.astype(np.float64)], [seg], out_type="affinity", dtype=np.float64)
    sampler = PatchSampler([data], {"input": (3, 4, 6)}, (3, 4, 6), None, SamplerOptions(True, False, "none", 0))
    pos = (0, 1, 2)
    plain = sampler.patch_at(0, pos).targets["output"]
    flipped = sampler.patch_at(0, pos, Transform((False, False, True))).targets["output"]
    original = affinity(seg)[:, 0:3, 1:5, 2:8]
    np.testing.assert_array_equal(plain, original)
    # augmented voxel u is original v = 7 - u; its x-edge (u, u - 1) is the original edge (v, v + 1), which the
    # original stores at v + 1 = 8 - u: the flipped map is shifted by one
    np.testing.assert_array_equal(flipped[2], affinity(seg)[2, 0:3, 1:5, 3:9][..., ::-1])
    np.testing.assert_array_equal(flipped[:2], original[:2, :, :, ::-1])


def test_rebalance_modes_boundary():
    data, seg = id_sample((4, 10, 10), seed=7, mask=np.random.default_rng(8).random((4, 10, 10)) > 0.2)
    target, mask = data.targets[0], data.masks[0]
    kw = dict(input_patches={"input": (2, 5, 5)}, output_patch=(2, 5, 5), fov=None)

    def options(rebalance):
        return SamplerOptions(is_bd_mirror=True, is_data_aug=False, rebalance=rebalance, rng_seed=0)

    pos = (1, 2, 3)
    region = (slice(None), slice(1, 3), slice(2, 7), slice(3, 8))
    glob = PatchSampler([data], options=options("global"), **kw).patch_at(0, pos)
    np.testing.assert_allclose(glob.weights["output"], rebalance_weights(target, mask, "half")[region])
    patch = PatchSampler([data], options=options("patch"), **kw).patch_at(0, pos)
    np.testing.assert_allclose(patch.weights["output"], rebalance_weights(target[region], mask[region], "fraction"))
    none = PatchSampler([data], options=options("none"), **kw).patch_at(0, pos)
    assert np.all(none.weights["output"] == 1)
    assert not np.allclose(glob.weights["output"], patch.weights["output"])
    np.testing.assert_array_equal(glob.masks["output"], np.broadcast_to(mask[region], (2, 2, 5, 5)))


def test_global_affinity_weights_follow_the_channel_permutation():
    rng = np.random.default_rng(9)
    seg = np.repeat(rng.integers(1, 4, (1, 8, 8)), 8, axis=0)  # columns: z-edges mostly 1, y/x mixed
    seg[:, :, ::3] = 0
    data = make_sample([seg.astype(np.float64)], [seg], out_type="affinity", dtype=np.float64)
    sampler = PatchSampler([data], {"input": (4, 4, 4)}, (4, 4, 4), None, SamplerOptions(True, True, "global", 0))
    whole = rebalance_weights(data.targets[0], data.masks[0], "fraction")
    valid = data.masks[0] > 0
    table = [[whole[c][(data.targets[0][c] == cls) & valid[c]][0] for cls in (0, 1)] for c in range(3)]
    assert len({round(t[1], 6) for t in table}) == 3
    for perm in itertools.permutations(range(3)):
        patch = sampler.patch_at(0, (2, 2, 2), Transform((True, False, False), perm))
        tgt, msk, w = patch.targets["output"], patch.masks["output"], patch.weights["output"]
        for c in range(3):
            want = np.where(tgt[c] > 0, table[perm[c]][1], table[perm[c]][0]) * (msk[c] > 0)
            np.testing.assert_allclose(w[c], want)


def test_determinism_and_validation_patches():
    data, _ = id_sample((6, 20, 20))
    make = lambda seed: PatchSampler([data, id_sample((5, 15, 18), 3)[0]], {"input": (1, 9, 9)}, (1, 5, 5),
                                     (1, 5, 5), SamplerOptions(True, True, "patch", seed))
    a, b, c = make(11).sample(6), make(11).sample(6), make(12).sample(6)
    for p, q in zip(a, b):
        assert p.position == q.position and p.transform == q.transform and p.sample_id == q.sample_id
        np.testing.assert_array_equal(p.inputs["input"], q.inputs["input"])
        np.testing.assert_array_equal(p.weights["output"], q.weights["output"])
    assert [p.position for p in a] != [p.position for p in c]
    sampler = make(0)
    v1, v2 = sampler.validation_patches(5, seed=4), make(99).validation_patches(5, seed=4)
    assert [p.position for p in v1] == [p.position for p in v2]
    assert all(p.transform == IDENTITY for p in v1)


def test_grid_positions_tile_the_range():
    data, _ = id_sample((3, 11, 12))
    sampler = PatchSampler([data], {"input": (1, 7, 7)}, (1, 4, 5), None, SamplerOptions(True, False, "none", 0))
    grid = sampler.grid_positions()
    covered = np.zeros((3, 11, 12), dtype=bool)
    for z, y, x in grid:
        covered[z, y:y + 4, x:x + 5] = True
    assert covered.all() and len(grid) == 3 * 3 * 3
    assert len(list(sampler.grid_patches())) == len(grid)


def test_several_inputs_with_different_margins():
    seg = segmentation((4, 12, 12), seed=10)
    data = make_sample([seg.astype(np.float64), seg.astype(np.float64) * 2], [seg], dtype=np.float64)
    out = (2, 3, 3)
    patches = {"a": (4, 7, 7), "b": (2, 6, 4)}
    sampler = PatchSampler([data], patches, out, (3, 5, 5), SamplerOptions(False, True, "none", 0))
    for patch in sampler.sample(30):
        label = patch.labels["output"]
        np.testing.assert_array_equal(centre(patch.inputs["a"][0], (2, 4, 4)), label)
        np.testing.assert_array_equal(centre(patch.inputs["b"][0], (0, 3, 1)), 2 * label)
    same = PatchSampler([data], {"a": (4, 7, 7), "b": (4, 7, 7)}, out, None, SamplerOptions(True, True, "none", 0))
    p = same.sample(1)[0]
    np.testing.assert_array_equal(p.inputs["b"], 2 * p.inputs["a"])


def test_masked_samples_draw_patches_with_valid_voxels():
    mask = np.zeros((4, 30, 30), dtype=bool)
    mask[2, 20:23, 5:8] = True
    data, _ = id_sample((4, 30, 30), mask=mask)
    sampler = PatchSampler([data], {"input": (1, 5, 5)}, (1, 5, 5), None, SamplerOptions(True, False, "none", 0))
    patches = sampler.sample(500)
    assert all(p.masks["output"].any() for p in patches)
    assert {p.position for p in patches} == {(2, y, x) for y in range(16, 23) for x in range(1, 8)}


def test_window_any_matches_loop():
    from znn.pipeline.train.sampler import _window_any

    mask = np.random.default_rng(12).random((4, 6, 7)) > 0.93
    got = _window_any(mask, (2, 3, 2), (0, 1, 2), (2, 3, 5))
    for idx in np.ndindex(got.shape):
        z, y, x = idx[0], idx[1] + 1, idx[2] + 2
        assert got[idx] == mask[z:z + 2, y:y + 3, x:x + 2].any()


def test_errors():
    data, _ = id_sample((3, 8, 8))
    with pytest.raises(ConfigError, match="did you mean 'global'"):
        PatchSampler([data], {"input": (1, 5, 5)}, (1, 3, 3), None, SamplerOptions(True, False, "globl", 0))
    with pytest.raises(ConfigError, match=r"1 input\(s\) but the network has 2 input node\(s\) \(a, b\)"):
        PatchSampler([data], {"a": (1, 5, 5), "b": (1, 5, 5)}, (1, 3, 3), None, SamplerOptions(True, False, "none", 0))
    with pytest.raises(ShapeError, match="too small .* is_bd_mirror"):
        PatchSampler([data], {"input": (1, 12, 12)}, (1, 3, 3), None, SamplerOptions(False, False, "none", 0))
    with pytest.raises(ShapeError, match="smaller than the output patch"):
        PatchSampler([data], {"input": (1, 2, 2)}, (1, 3, 3), None, SamplerOptions(True, False, "none", 0))
    with pytest.raises(ShapeError, match="exceeds output patch"):
        PatchSampler([data], {"input": (1, 9, 9)}, (1, 3, 3), (1, 5, 5), SamplerOptions(True, False, "none", 0))
    empty, _ = id_sample((3, 8, 8), mask=np.zeros((3, 8, 8), dtype=bool))
    with pytest.raises(ShapeError, match="mask leaves no output patch"):
        PatchSampler([empty], {"input": (1, 5, 5)}, (1, 3, 3), None, SamplerOptions(True, False, "none", 0))
    inference_only = make_sample([np.zeros((3, 8, 8))])
    with pytest.raises(ConfigError, match="no output but training needs one"):
        PatchSampler([inference_only], {"input": (1, 5, 5)}, (1, 3, 3), None, SamplerOptions(True, False, "none", 0),
                     output_nodes=["output"])
