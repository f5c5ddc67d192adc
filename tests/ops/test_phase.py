"""The phase-decomposed, tiled FFT convolution against the dilated direct convolution (itself tested against a
loop in test_conv.py), and the tile choice."""

from __future__ import annotations

import numpy as np
import pytest

from znn.ops.conv import conv_forward_direct
from znn.ops.phase import TileGeometry, choose_tile, group_spectra, phase_conv_fft, phase_kernel_spectra

CASES = [((9, 11, 13), (2, 3, 3), (2, 3, 1)), ((1, 17, 14), (1, 3, 2), (1, 4, 4)), ((12, 12, 12), (3, 3, 3), (1, 1, 1)),
         ((10, 9, 8), (2, 2, 2), (3, 2, 2)), ((12, 10, 14), (3, 3, 2), (2, 2, 2)), ((17, 17, 17), (3, 3, 3), (8, 8, 8))]


def _tiles(k):
    """Whole phases; the smallest tiles (one valid output each); uneven tiles that leave a short last tile; tiles
    longer than most phases (zero-padded, of varying lengths)."""
    return [None, tuple(k), tuple(kk + 2 for kk in k), tuple(kk + 6 for kk in k)]


@pytest.mark.parametrize("n, k, d", CASES)
def test_tiled_phase_conv_equals_dilated_direct_conv(n, k, d):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, *n))
    w = rng.standard_normal((3, 4, *k))
    want = conv_forward_direct(x, w, d)
    for tile in _tiles(k):
        got = phase_conv_fft(x, w, d, group_bytes=1, tile=tile)  # one tile per group: exercises the grouping
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * np.abs(want).max(), err_msg=str(tile))
        assert got.flags.c_contiguous


@pytest.mark.parametrize("n, k, d", CASES[:3])
def test_tiled_phase_conv_float32_views_threads_and_given_spectra(n, k, d):
    """float32, all tiles in one group, ``x`` a crop of a larger map (the evaluator passes views), two threads, and
    kernel spectra made once and passed in, as the evaluator's cache does."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 4, *k)).astype(np.float32)
    big = rng.standard_normal((3, *(e + 3 for e in n))).astype(np.float32)
    view = big[:, 1:1 + n[0], 2:2 + n[1], :n[2]]
    want = conv_forward_direct(np.ascontiguousarray(view), w, d)
    tol = 1e-5 * np.abs(want).max()
    for tile in _tiles(k):
        got = phase_conv_fft(view, w, d, tile=tile)
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=tol)
        shape = TileGeometry.of(n, w.shape, d, tile).shape
        given = phase_conv_fft(view, w, d, phase_kernel_spectra(w, shape), threads=2, tile=tile)
        np.testing.assert_allclose(given, got, rtol=1e-5, atol=tol)


@pytest.mark.parametrize("n, k, d", CASES)
def test_given_group_spectra_give_the_same_convolution(n, k, d):
    """Group spectra made beforehand (the autotuner touches them before it times a slab) and used for several
    groups give what spectra made inside give; reused dirty from an earlier call too."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, *n)).astype(np.float32)
    w = rng.standard_normal((3, 4, *k)).astype(np.float32)
    for tile, group in [(None, 1 << 30), (tuple(kk + 2 for kk in k), 1)]:
        want = phase_conv_fft(x, w, d, group_bytes=group, tile=tile)
        spectra = group_spectra(TileGeometry.of(n, w.shape, d, tile), np.dtype(np.float32), group)
        for a in spectra:
            a.fill(np.nan)  # whatever they held before must not leak into the result
        for _ in range(2):
            got = phase_conv_fft(x, w, d, group_bytes=group, tile=tile, spectra=spectra)
            np.testing.assert_array_equal(got, want)


def test_group_spectra_too_small_are_refused():
    w = np.ones((2, 3, 3, 3, 3), np.float32)
    x = np.ones((2, 12, 12, 12), np.float32)
    small = group_spectra(TileGeometry.of((6, 12, 12), w.shape, (1, 1, 1), (6, 6, 6)), np.dtype(np.float32))
    with pytest.raises(ValueError, match="do not hold"):
        phase_conv_fft(x, w, (1, 1, 1), tile=(6, 6, 6), spectra=small)
    other = group_spectra(TileGeometry.of((12, 12, 12), w.shape, (1, 1, 1), (6, 6, 6)), np.dtype(np.float64))
    with pytest.raises(ValueError, match="do not hold"):
        phase_conv_fft(x, w, (1, 1, 1), tile=(6, 6, 6), spectra=other)


def test_spectra_of_another_shape_are_refused():
    w = np.ones((2, 3, 3, 3, 3))
    with pytest.raises(ValueError, match="do not match"):
        phase_conv_fft(np.ones((2, 12, 12, 12)), w, (1, 1, 1), phase_kernel_spectra(w, (8, 8, 8)), tile=(6, 6, 6))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        phase_conv_fft(np.ones((2, 12, 12, 12)), w, (1, 1, 1), tile=(2, 6, 6))


def test_every_output_voxel_is_covered_once():
    """The tiles of all phases partition the output: each voxel written by exactly one tile."""
    for n, k, d in CASES:
        for tile in _tiles(k):
            geometry = TileGeometry.of(n, (1, 1, *k), d, tile)
            hits = np.zeros(geometry.out, dtype=int)
            axes = geometry.axes()
            for tz in axes[0].tiles:
                for ty in axes[1].tiles:
                    for tx in axes[2].tiles:
                        hits[tz[2], ty[2], tx[2]] += 1
            assert (hits == 1).all(), (n, k, d, tile)


def test_choose_tile_keeps_kernel_spectra_under_the_cap():
    """80 x 80 maps of a large block: the whole phases' spectra would take gigabytes; the chosen tiles' fit the
    cap, and a cap too small for any tile gives the smallest tile that holds the kernel."""
    w_shape, extent, d = (80, 80, 3, 3, 3), (176, 176, 176), (2, 2, 2)
    whole = TileGeometry.of(extent, w_shape, d)
    assert whole.spectra_bytes(4) > 4 << 30
    for cap in (32 << 20, 256 << 20):
        tile = choose_tile(extent, w_shape, d, spectra_cap=cap)
        assert TileGeometry.of(extent, w_shape, d, tile).spectra_bytes(4) <= cap
    assert choose_tile(extent, w_shape, d, spectra_cap=1) == (8, 8, 8)
    # a small layer whose whole phases are cheap keeps them
    assert choose_tile((20, 20, 20), (2, 2, 3, 3, 3), (4, 4, 4)) == TileGeometry.of((20, 20, 20), w_shape, (4, 4, 4)).shape


def test_tile_count_equals_the_listed_tiles():
    for n, k, d in CASES:
        for tile in _tiles(k):
            geometry = TileGeometry.of(n, (1, 1, *k), d, tile)
            assert geometry.count() == len(geometry.axes()[0].tiles) * len(geometry.axes()[1].tiles) * len(
                geometry.axes()[2].tiles)
