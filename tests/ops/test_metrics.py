"""Metrics against loops and hand-computed cases; `znn evaluate` end to end."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from znn.errors import ShapeError
from znn.io.volume import write_volume
from znn.ops import loss
from znn.ops.metrics import (
    adapted_rand_error,
    boundary_probability,
    evaluate,
    fill_boundary,
    gt_segmentation,
    pixel_error,
    segment_affinity_map,
    segment_boundary_map,
    variation_of_information,
)
from znn.ops.preprocess import affinity, binary_class
from znn.pipeline.jobs.synthetic import boundary_labels, synthetic_em


def loop_rand(seg, gt):
    """Pair counting over ordered pairs of distinct voxels with gt != 0."""
    idx = [i for i in np.ndindex(gt.shape) if gt[i] != 0]
    both = in_seg = in_gt = 0
    for a, b in itertools.permutations(idx, 2):
        s, g = seg[a] == seg[b], gt[a] == gt[b]
        both += s and g
        in_seg += s
        in_gt += g
    prec, rec = both / in_seg, both / in_gt
    return 1 - 2 * prec * rec / (prec + rec), prec, rec


def loop_voi(seg, gt):
    pairs = [(int(seg[i]), int(gt[i])) for i in np.ndindex(gt.shape) if gt[i] != 0]
    n = len(pairs)
    joint, ps, pg = Counter(pairs), Counter(s for s, _ in pairs), Counter(g for _, g in pairs)
    h_seg_given_gt = -sum(c / n * math.log2(c / pg[g]) for (s, g), c in joint.items())
    h_gt_given_seg = -sum(c / n * math.log2(c / ps[s]) for (s, g), c in joint.items())
    return h_seg_given_gt, h_gt_given_seg


@pytest.mark.parametrize("seed", range(4))
def test_rand_and_voi_match_loops(seed):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 4, (2, 4, 5))
    seg = rng.integers(0, 3, (2, 4, 5)) * 1000 + 7  # large, sparse ids are fine
    np.testing.assert_allclose(adapted_rand_error(seg, gt), loop_rand(seg, gt), rtol=1e-12)
    np.testing.assert_allclose(variation_of_information(seg, gt), loop_voi(seg, gt), atol=1e-12)


def test_rand_and_voi_known_values():
    gt = np.array([[[1, 2], [3, 2]]])
    merged = np.ones_like(gt)
    # one segment for three objects: 2 of 12 ordered pairs belong together; nothing is split
    assert adapted_rand_error(merged, gt) == pytest.approx((1 - 2 * (1 / 6) / (1 + 1 / 6), 1 / 6, 1.0))
    assert variation_of_information(merged, gt) == pytest.approx((0.0, 1.5))  # H(gt) = 1.5 bits
    assert adapted_rand_error(gt, gt) == (0.0, 1.0, 1.0)
    # gt 0 voxels are ignored whatever the segmentation does there
    gt0 = np.array([[[1, 1, 0, 2, 2]]])
    assert adapted_rand_error(np.array([[[5, 5, 5, 6, 6]]]), gt0)[0] == 0.0
    assert all(math.isnan(v) for v in adapted_rand_error(gt0, np.zeros_like(gt0)))


def test_pixel_error():
    rng = np.random.default_rng(1)
    prob, label = rng.random((2, 3, 4, 5)), rng.random((2, 3, 4, 5)) > 0.5
    mask = rng.random((1, 3, 4, 5)) > 0.4
    wrong = valid = 0
    for c, *v in np.ndindex(prob.shape):
        if mask[(0, *v)]:
            valid += 1
            wrong += (prob[(c, *v)] > 0.3) != label[(c, *v)]
    assert pixel_error(prob, label, mask, threshold=0.3) == pytest.approx(wrong / valid)
    assert pixel_error(prob, label) == pytest.approx(loss.pixel_error(prob, label.astype(float)))
    with pytest.raises(ShapeError, match="does not match"):
        pixel_error(prob, label[:1])


def test_segment_boundary_map_2d_and_3d():
    prob = np.array([[[0.1, 0.9, 0.2],
                      [0.1, 0.9, 0.9]],
                     [[0.1, 0.1, 0.9],
                      [0.9, 0.9, 0.2]]])
    seg3 = segment_boundary_map(prob, 0.5, "3d")
    np.testing.assert_array_equal(seg3, [[[1, 0, 2], [1, 0, 0]], [[1, 1, 0], [0, 0, 3]]])
    seg2 = segment_boundary_map(prob, 0.5, "2d")
    np.testing.assert_array_equal(seg2, [[[1, 0, 2], [1, 0, 0]], [[3, 3, 0], [0, 0, 4]]])


def union_find_segments(aff, threshold, dims):
    shape = aff.shape[1:]
    parent = {v: v for v in np.ndindex(shape)}

    def find(v):
        while parent[v] != v:
            v = parent[v]
        return v

    linked = set()
    for c in range(1 if dims == "2d" else 0, 3):
        for v in np.ndindex(shape):
            if v[c] > 0 and aff[(c, *v)] > threshold:
                u = list(v)
                u[c] -= 1
                parent[find(v)] = find(tuple(u))
                linked |= {v, tuple(u)}
    return {v: (find(v) if v in linked else None) for v in np.ndindex(shape)}


@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_segment_affinity_map_matches_union_find(dims):
    aff = np.random.default_rng(2).random((3, 3, 4, 4)) ** 2  # sparse enough for several components
    seg = segment_affinity_map(aff, 0.5, dims)
    ref = union_find_segments(aff, 0.5, dims)
    for v, root in ref.items():
        assert (seg[v] == 0) == (root is None)
    for a, b in itertools.combinations(ref, 2):
        if ref[a] is not None and ref[b] is not None:
            assert (seg[a] == seg[b]) == (ref[a] == ref[b])
    assert set(np.unique(seg[seg > 0])) == set(range(1, int(seg.max()) + 1))


def test_affinity_of_a_segmentation_segments_back_to_it():
    seg = np.array([[[1, 1, 0, 2], [1, 0, 2, 2], [0, 3, 3, 0]]])
    np.testing.assert_array_equal(segment_affinity_map(affinity(seg)), [[[1, 1, 0, 2], [1, 0, 2, 2], [0, 3, 3, 0]]])


def test_fill_and_gt_segmentation():
    seg = np.array([[[1, 0, 0, 2]], [[0, 0, 0, 0]]])
    np.testing.assert_array_equal(fill_boundary(seg, "2d"), [[[1, 1, 2, 2]], [[0, 0, 0, 0]]])
    np.testing.assert_array_equal(fill_boundary(seg, "3d"), [[[1, 1, 2, 2]], [[1, 1, 2, 2]]])
    isbi = np.array([[[255, 0, 255]], [[255, 255, 0]]], dtype=np.uint8)
    np.testing.assert_array_equal(gt_segmentation(isbi, "2d"), [[[1, 0, 2]], [[3, 3, 0]]])
    np.testing.assert_array_equal(gt_segmentation(isbi, "3d"), [[[1, 0, 2]], [[1, 1, 0]]])
    ids = np.array([[[5, 5, 0]], [[5, 9, 9]]])
    np.testing.assert_array_equal(gt_segmentation(ids, "3d"), ids)
    np.testing.assert_array_equal(gt_segmentation(ids, "2d"), [[[1, 1, 0]], [[2, 3, 3]]])


def test_boundary_probability_channel_conventions():
    p = np.random.default_rng(3).random((1, 2, 3))
    np.testing.assert_array_equal(boundary_probability(p), p)
    np.testing.assert_array_equal(boundary_probability(p[None], "nonboundary"), 1 - p)
    np.testing.assert_array_equal(boundary_probability(np.stack([1 - p, p])), p)  # channel 1 = boundary
    with pytest.raises(ShapeError, match="channel 1 = boundary"):
        boundary_probability(np.zeros((3, 1, 2, 3)))


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_em((3, 48, 48), seed=5)


def test_evaluate_perfect_and_noisy(synthetic):
    _, seg = synthetic
    labels = boundary_labels(seg)
    perfect = evaluate(binary_class(labels), labels, "boundary")
    assert perfect["pixel_error"] == 0 and perfect["rand_error"] == pytest.approx(0, abs=1e-12)
    assert perfect["voi_split"] == pytest.approx(0, abs=1e-9) and perfect["voi_merge"] == pytest.approx(0, abs=1e-9)
    same = evaluate((seg == 0).astype(float), seg, "boundary")
    assert same == pytest.approx(perfect, abs=1e-9)
    assert evaluate(seg > 0, seg, "boundary", one_channel="nonboundary") == pytest.approx(perfect, abs=1e-9)
    aff = evaluate(affinity(seg), seg, "affinity")
    assert aff["pixel_error"] == 0 and aff["rand_error"] == pytest.approx(0, abs=1e-12)
    # erase a stretch of membrane in every slice: two cells merge, precision falls, recall stays 1
    broken = (seg == 0).astype(float)
    broken[:, :, 20:28] = 0
    result = evaluate(broken, seg, "boundary")
    assert result["rand_precision"] < 0.95 and result["rand_recall"] == pytest.approx(1)
    assert result["voi_merge"] > 0.1 and result["voi_split"] == pytest.approx(0, abs=1e-9)
    with pytest.raises(ShapeError, match=r"prediction shape \(3, 48, 40\) does not match label shape \(3, 48, 48\)"):
        evaluate(broken[:, :, :40], seg, "boundary")


def run_cli(*args):
    """`znn evaluate` in a fresh interpreter (about 3 s of imports, so only a few cases run this way)."""
    return subprocess.run([sys.executable, "-m", "znn.cli", "evaluate", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def main_cli(capsys, *args):
    """`znn evaluate` in this process through the same entry point: (exit code, stdout, stderr)."""
    from znn.cli import main

    code = main(["evaluate", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_evaluate_end_to_end(tmp_path, synthetic, capsys):
    _, seg = synthetic
    labels = boundary_labels(seg)
    write_volume(tmp_path / "labels.tif", labels)
    write_volume(tmp_path / "seg.h5", seg)
    rng = np.random.default_rng(4)
    noisy = np.clip((seg == 0) + rng.normal(0, 0.2, seg.shape), 0, 1).astype(np.float32)
    write_volume(tmp_path / "pred.h5", np.stack([1 - noisy, noisy]))  # ZNN binary_class order
    write_volume(tmp_path / "aff.h5", affinity(seg))
    done = run_cli(tmp_path / "pred.h5", tmp_path / "labels.tif", "--json", tmp_path / "out.json")
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "out.json").read_text())
    assert record["type"] == "boundary" and record["dims"] == "2d"
    assert record["pixel_error"] == pytest.approx(evaluate(np.stack([1 - noisy, noisy]), labels)["pixel_error"])
    assert "rand_error" in done.stdout and "voi_merge" in done.stdout
    code, out, err = main_cli(capsys, tmp_path / "aff.h5", tmp_path / "seg.h5", "--type", "affinity")
    assert code == 0, err
    assert "pixel_error     0.0000" in out and "rand_error      0.0000" in out
    # a prediction made without mirroring is smaller: --crop compares the centre
    write_volume(tmp_path / "small.tif", noisy[:, 3:-2, 4:-4])
    code, out, err = main_cli(capsys, tmp_path / "small.tif", tmp_path / "labels.tif", "--crop", "--dims", "3d")
    assert code == 0 and "3x43x40 voxels" in out, err
    # a one-channel map of P(non-boundary) (ZNN one_class) read with --nonboundary scores like the boundary map
    write_volume(tmp_path / "inside.tif", 1 - noisy)
    write_volume(tmp_path / "boundary.tif", noisy)
    inside = main_cli(capsys, tmp_path / "inside.tif", tmp_path / "labels.tif", "--nonboundary")[1]
    boundary = main_cli(capsys, tmp_path / "boundary.tif", tmp_path / "labels.tif")[1]
    assert inside.splitlines()[1:] == boundary.splitlines()[1:]


def test_cli_evaluate_errors_without_traceback(tmp_path, capsys):
    write_volume(tmp_path / "pred.tif", np.zeros((2, 8, 8), dtype=np.float32))
    write_volume(tmp_path / "labels.tif", np.zeros((2, 8, 9), dtype=np.uint8))
    done = run_cli(tmp_path / "pred.tif", tmp_path / "labels.tif")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "spatial shape (2, 8, 8)" in done.stderr and "shape (2, 8, 9)" in done.stderr and "--crop" in done.stderr
    code, _, err = main_cli(capsys, tmp_path / "missing.tif", tmp_path / "labels.tif")
    assert code == 2 and "missing.tif" in err
    write_volume(tmp_path / "three.tif", np.zeros((3, 2, 8, 9), dtype=np.float32))
    code, _, err = main_cli(capsys, tmp_path / "three.tif", tmp_path / "labels.tif")
    assert code == 2 and "3 channels" in err and "--type affinity" in err
