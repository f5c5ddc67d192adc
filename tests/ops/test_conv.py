"""Convolution kernels (znn.ops.conv, conv_fft, fft) against scipy.signal, finite differences and each other."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
from hypothesis import given, settings
from hypothesis import strategies as st

from znn.errors import ShapeError
from znn.ops import conv as conv_module
from znn.ops import conv_fft as cf
from znn.ops import fft as F
from znn.ops.conv import (
    conv_backward,
    conv_backward_direct,
    conv_forward,
    conv_forward_direct,
    conv_grad_input_direct,
    conv_grad_kernel_direct,
    direct_tiles,
)

# (input spatial, kernel, dilation, in maps, out maps): 2D and 3D, odd and even kernels, dilations 1-4 on
# different axes, kz == 1 over a thick volume, 1/3/5 maps.
CASES = [
    ((1, 9, 10), (1, 3, 3), (1, 1, 1), 1, 3),
    ((1, 12, 11), (1, 4, 2), (1, 2, 3), 3, 5),
    ((6, 7, 8), (3, 3, 3), (1, 1, 1), 3, 1),
    ((9, 8, 10), (2, 3, 2), (4, 1, 2), 5, 3),
    ((7, 11, 6), (2, 2, 1), (2, 3, 1), 1, 1),
    ((5, 6, 13), (1, 2, 4), (1, 4, 3), 3, 3),
    ((8, 8, 8), (4, 4, 4), (1, 1, 1), 2, 2),
]
IDS = [f"x{'x'.join(map(str, c[0]))}-k{'x'.join(map(str, c[1]))}-d{''.join(map(str, c[2]))}-{c[3]}to{c[4]}"
       for c in CASES]
MODES = ["direct", "fft"]


def dilate(k: np.ndarray, d: tuple[int, int, int]) -> np.ndarray:
    out = np.zeros([(s - 1) * dd + 1 for s, dd in zip(k.shape, d)], dtype=k.dtype)
    out[:: d[0], :: d[1], :: d[2]] = k
    return out


def reference(x: np.ndarray, w: np.ndarray, d: tuple[int, int, int]) -> np.ndarray:
    """The obviously right thing: scipy's true convolution per (in, out) pair, summed over inputs."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    return np.stack([sum(scipy.signal.convolve(x64[i], dilate(w64[i, o], d), mode="valid")
                         for i in range(w.shape[0])) for o in range(w.shape[1])])


def problem(case, dtype=np.float64, seed=0):
    xs, ks, d, n_in, n_out = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_in, *xs)).astype(dtype)
    w = rng.standard_normal((n_in, n_out, *ks)).astype(dtype)
    out = tuple(n - (k - 1) * dd for n, k, dd in zip(xs, ks, d))
    gy = rng.standard_normal((n_out, *out)).astype(dtype)
    return x, w, gy, d


def close(a: np.ndarray, b: np.ndarray, dtype) -> None:
    if np.dtype(dtype) == np.float64:
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10 * max(1.0, np.abs(b).max()))
    else:
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * max(1.0, np.abs(b).max()))


# ----------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_equals_reference(case, mode, dtype):
    x, w, _, d = problem(case, dtype)
    y = conv_forward(x, w, d, mode=mode)
    assert y.dtype == dtype
    close(y, reference(x, w, d), dtype)


# ----------------------------------------------------------------------------------------------- backward


def finite_difference_check(mode: str, case, seed: int = 1, n_entries: int = 5) -> None:
    """grad of f = <gy, conv(x, w)> against central differences at random entries of x and w."""
    x, w, gy, d = problem(case, np.float64, seed)
    gx, gw = conv_backward(x, w, gy, d, mode=mode)
    assert gx.shape == x.shape and gw.shape == w.shape

    def f(xv, wv):
        return float(np.sum(gy * reference(xv, wv, d)))

    rng = np.random.default_rng(seed)
    eps = 1e-5
    for arr, grad, is_x in ((x, gx, True), (w, gw, False)):
        for flat in rng.choice(arr.size, size=min(n_entries, arr.size), replace=False):
            idx = np.unravel_index(flat, arr.shape)
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += eps
            minus[idx] -= eps
            fd = (f(plus, w) - f(minus, w)) / (2 * eps) if is_x else (f(x, plus) - f(x, minus)) / (2 * eps)
            assert grad[idx] == pytest.approx(fd, rel=1e-6, abs=1e-6), (idx, is_x)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=[IDS[1], IDS[3], IDS[5]])
def test_backward_finite_differences(case, mode):
    finite_difference_check(mode, case)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_direct_gradients_by_slabs_of_rows_equal_the_whole(case):
    """What the training graph's slab tasks compute: input-gradient rows from the output rows that reach them,
    and kernel-gradient shares of output slabs (with the input rows under them) that add up to the whole."""
    x, w, gy, d = problem(case)
    gx, gw = conv_backward_direct(x, w, gy, d)
    halo = [(k - 1) * dd for k, dd in zip(w.shape[2:], d)]
    for axis in (0, 1, 2):
        n_in, n_out = x.shape[1 + axis], gy.shape[1 + axis]
        cuts = sorted({0, n_in // 3, (2 * n_in) // 3, n_in})
        parts = [conv_grad_input_direct(w, gy, d, rows=(a, b), axis=axis) for a, b in zip(cuts, cuts[1:]) if b > a]
        close(np.concatenate(parts, axis=1 + axis), gx, np.float64)
        cuts = sorted({0, n_out // 2, n_out})
        shares = []
        for a, b in zip(cuts, cuts[1:]):
            if b > a:
                xs = np.take(x, range(a, b + halo[axis]), axis=1 + axis)
                shares.append(conv_grad_kernel_direct(xs, np.take(gy, range(a, b), axis=1 + axis), w.shape, d))
        close(sum(shares), gw, np.float64)
    with pytest.raises(ShapeError, match="outside"):
        conv_grad_input_direct(w, gy, d, rows=(0, x.shape[1] + 1), axis=0)


def reference_grad_input(w: np.ndarray, gy: np.ndarray, d: tuple[int, int, int]) -> np.ndarray:
    """The input gradient of :func:`reference`: scipy's full correlation of the output gradient with each kernel."""
    w64, gy64 = w.astype(np.float64), gy.astype(np.float64)
    return np.stack([sum(scipy.signal.correlate(gy64[o], dilate(w64[i, o], d), mode="full")
                         for o in range(w.shape[1])) for i in range(w.shape[0])])


@pytest.mark.parametrize("method", ["padded", "scatter"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_both_input_gradient_methods_equal_scipy_whole_by_slabs_and_threaded(case, method, monkeypatch):
    """Each way of the direct input gradient (forced), whole, by slabs of input rows along every axis, and on
    threads, equals scipy's full correlation."""
    monkeypatch.setattr(conv_module, "SCATTER_MAPS", 1e9 if method == "padded" else -1e9)
    _, w, gy, d = problem(case)
    ref = reference_grad_input(w, gy, d)
    assert conv_module.grad_input_method(w.shape, gy.shape[1:], d, (0, ref.shape[1]), 0) == method
    close(conv_grad_input_direct(w, gy, d), ref, np.float64)
    close(conv_grad_input_direct(w, gy, d, threads=3), ref, np.float64)
    for axis in (0, 1, 2):
        n = ref.shape[1 + axis]
        cuts = sorted({0, n // 3, (2 * n) // 3, n})
        parts = [conv_grad_input_direct(w, gy, d, rows=(a, b), axis=axis) for a, b in zip(cuts, cuts[1:]) if b > a]
        close(np.concatenate(parts, axis=1 + axis), ref, np.float64)


def test_the_input_gradient_is_scattered_where_padding_would_multiply_mostly_zeros():
    """N4's last 3x3 layer (48 -> 200 maps, dilation 16) on a 100x100 patch pads 100^2 voxels to 132^2: scattered;
    its 5x5 layer at dilation 2 (48 -> 48, 182^2 -> 190^2) is padded; so is a large kernel on few output maps."""
    scatter = conv_module.grad_input_method((48, 200, 1, 3, 3), (1, 100, 100), (1, 16, 16), (0, 132), 1)
    padded = conv_module.grad_input_method((48, 48, 1, 5, 5), (1, 182, 182), (1, 2, 2), (0, 190), 1)
    few_maps = conv_module.grad_input_method((40, 3, 5, 5, 5), (12, 12, 12), (1, 1, 1), (0, 16), 0)
    assert (scatter, padded, few_maps) == ("scatter", "padded", "padded")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fft_equals_direct_with_reused_spectra(case, dtype):
    x, w, gy, d = problem(case, dtype)
    gx_d, gw_d = conv_backward_direct(x, w, gy, d)
    y_f, spectra = cf.conv_forward_fft(x, w, d, keep=True)
    close(y_f, conv_forward_direct(x, w, d), dtype)
    gx_f, gw_f = cf.conv_backward_fft(x, w, gy, d, spectra=spectra)
    assert gx_f.dtype == dtype and gw_f.dtype == dtype
    close(gx_f, gx_d, dtype)
    close(gw_f, gw_d, dtype)
    gx_n, gw_n = cf.conv_backward_fft(x, w, gy, d)  # no spectra: recomputed, same result
    close(gx_n, gx_d, dtype)
    close(gw_n, gw_d, dtype)


@pytest.mark.parametrize("pairs_by_product", [0, 10**6], ids=["per-column GEMMs", "pair products"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_pruned_and_full_fft_kernel_transforms_agree(case, pairs_by_product, monkeypatch):
    """Both lead stages of the pruned kernel gradient (chosen by the map pairs of a block) equal full FFTs."""
    monkeypatch.setattr(cf, "_PAIRS_BY_PRODUCT", pairs_by_product)
    x, w, gy, d = problem(case)
    shape = F.fft_shape(x.shape[1:], w.shape[2:], d)
    ws_p = cf.kernel_spectra(w, d, shape, method="pruned")
    ws_f = cf.kernel_spectra(w, d, shape, method="fft")
    np.testing.assert_allclose(ws_p, ws_f, atol=1e-10)
    xs = cf.input_spectra(x, shape)
    gs = cf.grad_output_spectra(gy, shape, w.shape[2:], d)
    np.testing.assert_allclose(cf.grad_kernel(xs, gs, shape, w.shape[2:], d, method="pruned"),
                               cf.grad_kernel(xs, gs, shape, w.shape[2:], d, method="fft"), atol=1e-10)


# ----------------------------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[6]], ids=[IDS[1], IDS[3], IDS[6]])
def test_pieces_compose_by_blocks_of_maps(case):
    """What the task graph does: input blocks, output blocks, partial sums added by the caller."""
    x, w, gy, d = problem(case)
    n_in, n_out = w.shape[:2]
    k = w.shape[2:]
    shape = F.fft_shape(x.shape[1:], k, d)
    y_ref = conv_forward_direct(x, w, d)
    gx_ref, gw_ref = conv_backward_direct(x, w, gy, d)
    ib = [slice(0, n_in // 2 + 1), slice(n_in // 2 + 1, n_in)]  # second block may be empty for 1 map
    ob = [slice(0, n_out // 2 + 1), slice(n_out // 2 + 1, n_out)]
    xs = [cf.input_spectra(x[b], shape) for b in ib]
    ws = [[cf.kernel_spectra(w[bi, bo], d, shape) for bo in ob] for bi in ib]
    gs = [cf.grad_output_spectra(gy[b], shape, k, d) for b in ob]
    off = cf.output_offset(k, d)
    for o, bo in enumerate(ob):
        y_spec = sum(cf.multiply_accumulate(xs[i], ws[i][o]) for i in range(2))
        np.testing.assert_allclose(cf.inverse_valid(y_spec, shape, y_ref.shape[1:], off), y_ref[bo], atol=1e-10)
    for i, bi in enumerate(ib):
        gx_spec = sum(cf.grad_input_spectra(gs[o], ws[i][o]) for o in range(2))
        np.testing.assert_allclose(cf.inverse_valid(gx_spec, shape, x.shape[1:]), gx_ref[bi], atol=1e-10)
        for o, bo in enumerate(ob):
            np.testing.assert_allclose(cf.grad_kernel(xs[i], gs[o], shape, k, d), gw_ref[bi, bo], atol=1e-10)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_phases_of_a_dilated_convolution_give_its_output_and_gradients(case, dtype):
    """The convolution split into phases (its dilation, and every z plane of a one-plane kernel), each phase an
    undilated convolution at the small phase FFT shape, input and output blocks summed by the caller as the graph
    does: output, input gradient and kernel gradient equal the direct convolution's."""
    x, w, gy, d = problem(case, dtype)
    k = w.shape[2:]
    split = cf.phase_split(x.shape[1:], k, d)
    phases = int(np.prod(split))
    shape = cf.phase_fft_shape(x.shape[1:], k, split)
    lengths = cf.phase_lengths(x.shape[1:], split)
    out_lengths = tuple(n - kk + 1 for n, kk in zip(lengths, k))
    offset = cf.output_offset(k, (1, 1, 1))
    n_in, n_out = w.shape[:2]
    ib = [slice(0, n_in // 2 + 1), slice(n_in // 2 + 1, n_in)]
    ob = [slice(0, n_out // 2 + 1), slice(n_out // 2 + 1, n_out)]
    xs = [cf.phase_spectra(x[b], split, shape) for b in ib]
    ws = [[cf.kernel_spectra(w[bi, bo], (1, 1, 1), shape) for bo in ob] for bi in ib]
    gs = [cf.phase_spectra(gy[b], split, shape, offset=offset) for b in ob]
    y = [cf.merge_phases(cf.inverse_valid(sum(cf.multiply_accumulate(xs[i], ws[i][o], phases=phases)
                                              for i in range(2)), shape, out_lengths, offset),
                         split, gy.shape[1:]) for o in range(2)]
    gx = [cf.merge_phases(cf.inverse_valid(sum(cf.grad_input_spectra(gs[o], ws[i][o], phases=phases)
                                               for o in range(2)), shape, lengths), split, x.shape[1:])
          for i in range(2)]
    gw = np.concatenate([np.concatenate([cf.grad_kernel(xs[i], gs[o], shape, k, (1, 1, 1), phases=phases)
                                         for o in range(2)], axis=1) for i in range(2)])
    gx_d, gw_d = conv_backward_direct(x, w, gy, d)
    close(np.concatenate(y), conv_forward_direct(x, w, d), dtype)
    close(np.concatenate(gx), gx_d, dtype)
    close(gw, gw_d, dtype)
    assert gw.dtype == dtype and y[0].dtype == dtype


def test_phase_split_follows_dilation_and_one_plane_kernels():
    assert cf.phase_split((1, 190, 190), (1, 5, 5), (1, 2, 2)) == (1, 2, 2)
    assert cf.phase_split((8, 100, 100), (1, 3, 3), (1, 4, 4)) == (8, 4, 4)  # 2D kernels of a 2D-3D net
    assert cf.phase_split((7, 88, 88), (2, 3, 3), (1, 8, 8)) == (1, 8, 8)
    assert cf.phase_split((20, 20, 20), (3, 3, 3), (1, 1, 1)) == (1, 1, 1)  # not split
    assert cf.phase_fft_shape((1, 180, 180), (1, 4, 4), (1, 4, 4)) == (1, 45, 45)
    with pytest.raises(ShapeError, match="do not fit"):
        cf.phase_spectra(np.zeros((1, 1, 9, 9)), (1, 2, 2), (1, 4, 4))


def test_spectra_layout_and_dtype():
    x, w, _, d = problem(CASES[2], np.float32)
    _, sp = cf.conv_forward_fft(x, w, d)
    zyx = F.spectrum_shape(sp.shape)
    assert sp.x_spec.shape == (x.shape[0], *zyx) and sp.x_spec.dtype == np.complex64
    assert sp.w_spec.shape == (*w.shape[:2], *zyx) and sp.w_spec.dtype == np.complex64
    assert sp.nbytes == sp.x_spec.nbytes + sp.w_spec.nbytes
    # a caller may hand back a plain C-ordered copy of a spectrum: same result
    ys = cf.multiply_accumulate(np.ascontiguousarray(sp.x_spec), np.ascontiguousarray(sp.w_spec))
    np.testing.assert_allclose(ys, cf.multiply_accumulate(sp.x_spec, sp.w_spec), rtol=1e-6)


def test_threads_give_the_same_result():
    x, w, gy, d = problem(CASES[3])
    np.testing.assert_allclose(conv_forward_direct(x, w, d, threads=2), conv_forward_direct(x, w, d), atol=1e-12)
    for a, b in zip(conv_backward_direct(x, w, gy, d, threads=2), conv_backward_direct(x, w, gy, d)):
        np.testing.assert_allclose(a, b, atol=1e-12)
    y1, sp1 = cf.conv_forward_fft(x, w, d, threads=1)
    y2, sp2 = cf.conv_forward_fft(x, w, d, threads=2)
    np.testing.assert_allclose(y1, y2, atol=1e-12)
    for a, b in zip(cf.conv_backward_fft(x, w, gy, d, sp1, threads=1), cf.conv_backward_fft(x, w, gy, d, sp2, threads=2)):
        np.testing.assert_allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("case", CASES + [((12, 40, 300), (3, 3, 3), (2, 1, 1), 4, 2)])
def test_direct_tiles_partition_the_output_and_a_few_compute_their_part(case):
    """The tiles conv_forward_direct works in cover each output voxel once, and given a few of them (what the
    autotuner times) it computes exactly those voxels and leaves the rest of ``out`` alone."""
    x, w, _, d = problem(case)
    want = conv_forward_direct(x, w, d)
    tiles = direct_tiles(want.shape[1:], w.shape, d, x.itemsize)
    hits = np.zeros(want.shape[1:], int)
    for z0, z1, y0, y1 in tiles:
        hits[z0:z1, y0:y1] += 1
    assert (hits == 1).all()
    some = tiles[::2]
    out = np.full_like(want, np.nan)
    got = conv_forward_direct(x, w, d, threads=2, out=out, tiles=some)
    assert got is out
    mine = np.zeros(want.shape[1:], bool)
    for z0, z1, y0, y1 in some:
        mine[z0:z1, y0:y1] = True
    np.testing.assert_array_equal(got[:, mine], want[:, mine])
    assert np.isnan(got[:, ~mine]).all()
    if case[0] == (12, 40, 300):
        assert len(tiles) > 2, tiles  # the large case has several tiles, so a subset is a real part


def test_concurrent_calls_from_many_threads():
    """Dask runs tasks side by side with threads=1: per-thread plans must not interfere."""
    from concurrent.futures import ThreadPoolExecutor

    problems = [problem(CASES[i % len(CASES)], seed=i) for i in range(12)]
    expected = [conv_forward_direct(x, w, d) for x, w, _, d in problems]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda p: cf.conv_forward_fft(p[0], p[1], p[3])[0], problems))
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, atol=1e-10)


def test_backward_reuses_spectra_transform_counts():
    x, w, gy, d = problem(CASES[3])
    n_in, n_out = w.shape[:2]
    F.reset_transform_counts()
    _, sp = cf.conv_forward_fft(x, w, d, keep=True)
    assert F.transform_counts() == {"forward": n_in + n_in * n_out, "inverse": n_out}
    F.reset_transform_counts()
    cf.conv_backward_fft(x, w, gy, d, spectra=sp)
    # only grad_y is transformed; inverses: grad x per input map, grad w per (in, out) pair
    assert F.transform_counts() == {"forward": n_out, "inverse": n_in + n_in * n_out}
    F.reset_transform_counts()
    cf.conv_backward_fft(x, w, gy, d)
    assert F.transform_counts()["forward"] == n_out + n_in + n_in * n_out
    F.reset_transform_counts()
    _, sp2 = cf.conv_forward_fft(x, w, d, spectra=sp, keep=False)  # same kernels, new patch
    assert F.transform_counts() == {"forward": n_in, "inverse": n_out}
    assert sp2.x_spec is None and sp2.w_spec is sp.w_spec


def test_changed_kernels_recomputed_in_place():
    x, w, gy, d = problem(CASES[6])
    w2 = w[:, :, ::-1].copy()
    _, sp = cf.conv_forward_fft(x, w, d)
    F.reset_transform_counts()
    y2, sp2 = cf.conv_forward_fft(x, w2, d, spectra=sp, kernels_changed=True)
    assert F.transform_counts()["forward"] == x.shape[0] * (1 + w.shape[1])
    assert np.shares_memory(sp2.w_spec, sp.w_spec)  # the stale buffer was reused
    np.testing.assert_allclose(y2, conv_forward_direct(x, w2, d), atol=1e-10)
    for a, b in zip(cf.conv_backward_fft(x, w2, gy, d, spectra=sp2), conv_backward_direct(x, w2, gy, d)):
        np.testing.assert_allclose(a, b, atol=1e-10)
    with pytest.raises(ShapeError, match="kernel spectra here are"):
        cf.kernel_spectra(w[:1], d, sp.shape, out=sp.w_spec)


# ----------------------------------------------------------------------------------------------- sizes, wisdom


@given(st.integers(1, 3000))
def test_fast_len_is_smallest_7_smooth(n):
    m = F.fast_len(n)
    assert m >= n

    def smooth(v):
        for p in (2, 3, 5, 7):
            while v % p == 0:
                v //= p
        return v == 1

    assert smooth(m) and not any(smooth(v) for v in range(n, m))


def test_fft_shape_holds_the_input():
    assert F.fft_shape((1, 137, 137), (1, 10, 10), (1, 1, 1)) == (1, 140, 140)
    assert F.fft_shape((34, 34, 34), (3, 3, 3), (1, 1, 1)) == (35, 35, 35)
    with pytest.raises(ShapeError, match="exceeds"):
        F.fft_shape((5, 5, 5), (3, 3, 3), (3, 1, 1))


def test_wisdom_round_trip(tmp_path):
    x, w, _, d = problem(CASES[0])
    cf.conv_forward_fft(x, w, d)
    path = tmp_path / "wisdom.json"
    F.save_wisdom(path)
    assert path.stat().st_size > 0
    assert any(F.load_wisdom(path))
    assert F.load_wisdom(tmp_path / "missing.json") == (False, False, False)


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("mode", MODES)
def test_shape_errors_name_the_shapes(mode):
    x = np.zeros((3, 4, 5, 6))
    with pytest.raises(ShapeError, match=r"larger than the input .*\(3, 4, 5, 6\)"):
        conv_forward(x, np.zeros((3, 2, 5, 1, 1)), mode=mode)
    with pytest.raises(ShapeError, match="larger than the input"):
        conv_forward(x, np.zeros((3, 2, 2, 2, 2)), (4, 1, 1), mode=mode)
    with pytest.raises(ShapeError, match="has 3 maps but kernels"):
        conv_forward(x, np.zeros((2, 2, 1, 1, 1)), mode=mode)
    with pytest.raises(ShapeError, match=r"grad_y has shape \(2, 4, 5, 6\), expected \(2, 4, 4, 5\)"):
        conv_backward(x, np.zeros((3, 2, 1, 2, 2)), np.zeros((2, 4, 5, 6)), mode=mode)
    with pytest.raises(ShapeError, match="input must be"):
        conv_forward(np.zeros((4, 5, 6)), np.zeros((3, 2, 1, 1, 1)), mode=mode)
    with pytest.raises(ShapeError, match="dilation"):
        conv_forward(x, np.zeros((3, 2, 1, 1, 1)), (0, 1, 1), mode=mode)


def test_bad_mode_and_stale_spectra():
    x, w, _, d = problem(CASES[2])
    with pytest.raises(ShapeError, match="conv mode must be one of"):
        conv_forward(x, w, d, mode="winograd")
    _, sp = cf.conv_forward_fft(x, w, d)
    with pytest.raises(ShapeError, match="spectra were made for"):
        cf.conv_backward_fft(x[:, :-1], w, np.zeros((w.shape[1], 3, 5, 6)), d, spectra=sp)


# ----------------------------------------------------------------------------------------------- property


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_property_fft_equals_direct(data):
    d = tuple(data.draw(st.integers(1, 3)) for _ in range(3))
    k = tuple(data.draw(st.integers(1, 4)) for _ in range(3))
    flat = data.draw(st.booleans())
    if flat:
        k, d = (1, *k[1:]), (1, *d[1:])
    out = tuple(data.draw(st.integers(1, 5)) for _ in range(3))
    xs = tuple((1 if (flat and a == 0) else o + (kk - 1) * dd) for a, (o, kk, dd) in enumerate(zip(out, k, d)))
    n_in, n_out = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    x, w, gy, _ = problem((xs, k, d, n_in, n_out), seed=data.draw(st.integers(0, 2**16)))
    y_f, sp = cf.conv_forward_fft(x, w, d)
    close(y_f, conv_forward_direct(x, w, d), np.float64)
    for a, b in zip(cf.conv_backward_fft(x, w, gy, d, spectra=sp), conv_backward_direct(x, w, gy, d)):
        close(a, b, np.float64)


# ----------------------------------------------------------------------------------------------- benchmark


def test_ops_bench_smoke(tmp_path):
    from znn.bench.ops import (
        LAYERS,
        OpsRequest,
        format_table,
        run_ops_bench,
        write_json,
    )

    assert {lay.name for lay in LAYERS} == {"2d_10", "2d_20", "2d_30", "2d_40", "3d_3", "3d_5", "3d_7"}
    rows = run_ops_bench(OpsRequest(["2d_10", "3d_3"], outsz_2d=(1, 6, 6), outsz_3d=(3, 3, 3), threads=1, repeat=1,
                                    torch=False))
    assert [r["layer"] for r in rows] == ["2d_10", "3d_3"]
    assert all(r["direct_ms"] > 0 and r["fft_ms"] > 0 and r["best_mode"] in MODES for r in rows)
    assert rows[0]["insz"] == [1, 15, 15] and rows[1]["fft_shape"] == [5, 5, 5]
    assert "3d_3" in format_table(rows)
    write_json(rows, tmp_path / "ops.json")
    assert (tmp_path / "ops.json").read_text().startswith("{")
