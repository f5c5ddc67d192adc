"""Valid 3D convolution of feature maps (ZNN's conv edge): public entry points and the direct (BLAS) mode.

Shapes: input ``x (in, z, y, x)``, kernels ``w (in, out, kz, ky, kx)``, dilation ``(dz, dy, dx)`` (ZNN's
sparsity), output ``y (out, z', y', x')`` with ``z' = z - (kz - 1) * dz`` and so on. The convolution is a true
convolution (kernel flipped), as in ZNN::

    y[o] = sum_i scipy.signal.convolve(x[i], dilate(w[i, o]), mode="valid")

No bias (transfer nodes add it). The dtype of ``x`` (float32 or float64) is kept.

Threads: ``threads`` is how many cores one call may use. With ``threads > 1`` the kernels split their work
over that many Python threads (NumPy and FFTW release the GIL) and keep BLAS single-threaded meanwhile (the
split is dynamic, so a core lost to another process only slows its share); BLAS calls outside those splits
follow the caller's ``threadpoolctl`` limit, which the caller sets to the same number. With ``threads=1``
(many tasks side by side, as the pipeline runs them) nothing here starts a thread or changes a limit.

Direct mode gathers the ``ky * kx`` in-plane kernel offsets of a tile of input rows into a column matrix
(im2col over y and x only) and accumulates one GEMM ``(out x ky*kx*in) @ (ky*kx*in x voxels)`` per z offset,
reading the z shift as a strided view of that matrix: the copy is ``kz`` times smaller than a full im2col and
every GEMM has a deep contraction.

The input gradient has two ways (:func:`conv_grad_input_direct` picks one per call by the work each does): the
forward convolution of the zero-padded output gradient with the transposed kernels (deep GEMMs, but every input
voxel times every tap, zeros included), and a scatter (``(taps*in x out) @ (out x voxels)`` of the output
gradient, each tap's rows added where they land: only the products that are not zero). Where the kernel's span is
large against the maps (a dilated layer near the output, a small training patch), the padded way multiplies
mostly zeros: N4's last 3x3 layer at dilation 16 on a 100x100 patch pads 100^2 gradient voxels to 132^2.
"""

from __future__ import annotations

import math

from collections.abc import Sequence

import numpy as np

from znn.errors import ShapeError
from znn.ops.conv_fft import Spectra, conv_backward_fft, conv_forward_fft
from znn.ops.fft import check_conv_shapes, parallel_map
from znn.ops.pointwise import output_array
from znn.types import Triple

__all__ = [
    "MODES",
    "conv_forward",
    "conv_backward",
    "conv_forward_direct",
    "direct_tiles",
    "conv_backward_direct",
    "conv_grad_input_direct",
    "conv_grad_kernel_direct",
    "grad_input_method",
    "rows_along",
    "check_conv_shapes",
]

# Every conv mode a kernel has, the one list: the network plan (znn.pipeline.graph.plan), job keys and commands
# take theirs from it.
MODES = ("fft", "direct")

# Bytes of gathered columns per tile (each thread holds one): the whole column matrix of a 2D layer with
# 40x40 kernels would be gigabytes.
TILE_BYTES = 16 << 20
# Output voxels per tile: measured on the development machine, (40 x 360) @ (360 x n) runs at ~65 GFLOP/s
# per core for n = 1024..4096 but slower for n = 14k (the B panel falls out of cache).
TILE_VOXELS = 2048
# The input gradient is scattered (not padded and convolved) when padding would multiply more than
# ``1 + SCATTER_MAPS / out maps`` times the products the scatter does: the scatter's GEMMs contract over the output
# maps only and its adds cost memory traffic, so it needs deep contractions or much padding to win (measured on the
# slab tasks of N4 at 1x100x100, VD2D3D at 4x40x40 and 3d_5 at 12^3: it won at 1.32x padding with 200 output maps
# and at 1.84x with 100, lost at up to 1.56x with 40-60).
SCATTER_MAPS = 64
# Speed of conv_forward_direct on one core (GFLOP/s), measured on the development machine (n337 layers, 80
# maps): what the speed models of dense inference assume (fft's is ``znn.ops.phase.TileGeometry.seconds``).
DIRECT_GFLOPS = 20.0


def direct_seconds(n_in: int, n_out: int, kernel: Sequence[int], out_extent: Sequence[int]) -> float:
    """Modelled one-core seconds of :func:`conv_forward_direct` of ``n_in`` to ``n_out`` maps."""
    return 2.0 * n_in * n_out * math.prod(kernel) * math.prod(out_extent) / (DIRECT_GFLOPS * 1e9)

Tile = tuple[int, int, int, int]


def _dil(dilation: Sequence[int]) -> Triple:
    d = tuple(int(v) for v in dilation)
    if len(d) != 3:
        raise ShapeError(f"dilation must be three integers (dz, dy, dx), got {dilation}")
    return (d[0], d[1], d[2])


def _float(x: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Cast everything to the input's float dtype (float32/float64; anything else becomes float64)."""
    dt = x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    return [a.astype(dt, copy=False) for a in (x, *others)]


# ----------------------------------------------------------------------------------------------- tiling


def _tiles(out_spatial: Triple, k: Triple, d: Triple, n_rows: int, itemsize: int) -> list[Tile]:
    """Output tiles ``(z0, z1, y0, y1)`` of about ``TILE_VOXELS`` voxels whose columns fit ``TILE_BYTES``.

    Tiles span all z planes when they can: the z offsets are then column shifts of one gathered matrix and
    no input plane is gathered twice; otherwise z is split too (each z tile re-gathers its halo).
    """
    zo, yo, xo = out_spatial
    halo = (k[0] - 1) * d[0]
    row_bytes = n_rows * xo * itemsize  # gathered bytes per input (z, y) row
    if zo * xo <= 2 * TILE_VOXELS and row_bytes * (zo + halo) <= TILE_BYTES:
        yt = min(yo, max(1, TILE_VOXELS // (zo * xo)), max(1, TILE_BYTES // (row_bytes * (zo + halo))))
        return [(0, zo, y0, min(yo, y0 + yt)) for y0 in range(0, yo, yt)]
    yt = min(yo, max(1, TILE_VOXELS // xo), max(1, TILE_BYTES // (row_bytes * (1 + halo))))
    zt = max(1, min(zo, TILE_VOXELS // (yt * xo), TILE_BYTES // (row_bytes * yt) - halo))
    return [(z0, min(zo, z0 + zt), y0, min(yo, y0 + yt)) for z0 in range(0, zo, zt) for y0 in range(0, yo, yt)]


def _gather(x: np.ndarray, tile: Tile, k: Triple, d: Triple, xo: int) -> np.ndarray:
    """Columns of a tile, ``(ky*kx*in, zin*yt*xo)``: row ``(sy, sx, i)``, column ``(z, y, x)`` holds
    ``x[i, z0 + z, y0 + y + sy*dy, x + sx*dx]``, ``z`` over the tile's planes plus the z halo."""
    z0, z1, y0, y1 = tile
    zin, yt = z1 - z0 + (k[0] - 1) * d[0], y1 - y0
    col = np.empty((k[1], k[2], x.shape[0], zin, yt, xo), dtype=x.dtype)
    for sy in range(k[1]):
        ys = y0 + sy * d[1]
        for sx in range(k[2]):
            xs = sx * d[2]
            col[sy, sx] = x[:, z0:z0 + zin, ys:ys + yt, xs:xs + xo]
    return col.reshape(k[1] * k[2] * x.shape[0], zin * yt * xo)


# ----------------------------------------------------------------------------------------------- direct


def conv_forward_direct(x: np.ndarray, w: np.ndarray, dilation: Sequence[int] = (1, 1, 1),
                        threads: int = 1, out: np.ndarray | None = None,
                        tiles: Sequence[Tile] | None = None) -> np.ndarray:
    """Direct valid true convolution: ``(in, z, y, x)``, ``(in, out, kz, ky, kx)`` -> ``(out, z', y', x')``.

    With ``threads > 1`` the tiles run on that many threads, BLAS single-threaded inside. ``out``: see
    :func:`~znn.ops.pointwise.output_array`. ``tiles``: only these of :func:`direct_tiles` are computed, the rest
    of the output is left as it was (the autotuner times a few of a large layer's tiles).
    """
    d = _dil(dilation)
    out_spatial = check_conv_shapes(x.shape, w.shape, d)
    x, w = _float(x, w)
    n_in, n_out, kz, ky, kx = w.shape
    k = (kz, ky, kx)
    xo = out_spatial[2]
    # true convolution = correlation with the flipped kernel; rows ordered (sy, sx, in) like the columns
    wf = w[:, :, ::-1, ::-1, ::-1]
    wm = np.ascontiguousarray(wf.transpose(2, 1, 3, 4, 0)).reshape(kz, n_out, ky * kx * n_in)
    y = output_array(out, (n_out, *out_spatial), x.dtype, x)

    def work(tile: Tile) -> None:
        z0, z1, y0, y1 = tile
        colm = _gather(x, tile, k, d, xo)
        plane = (y1 - y0) * xo
        nvox = (z1 - z0) * plane
        acc = np.empty((n_out, nvox), dtype=x.dtype)
        tmp = np.empty_like(acc) if kz > 1 else acc
        for sz in range(kz):
            s0 = sz * d[0] * plane  # the z shift is a column offset of the same matrix: no copy
            np.matmul(wm[sz], colm[:, s0:s0 + nvox], out=acc if sz == 0 else tmp)
            if sz > 0:
                acc += tmp
        y[:, z0:z1, y0:y1, :] = acc.reshape(n_out, z1 - z0, y1 - y0, xo)

    parallel_map(work, _tiles(out_spatial, k, d, ky * kx * n_in, x.itemsize) if tiles is None else tiles, threads)
    return y


def largest_tile(out_spatial: Sequence[int], w_shape: Sequence[int], dilation: Sequence[int],
                 itemsize: int) -> tuple[int, int]:
    """``(bytes of its gathered columns, output voxels)`` of the largest of :func:`direct_tiles`: what one thread
    of a direct convolution (or of its kernel gradient, on the same columns) holds besides its partial sums."""
    n_in, _, kz, ky, kx = (int(v) for v in w_shape)
    halo = (kz - 1) * _dil(dilation)[0]
    xo = int(out_spatial[2])
    sizes = [((z1 - z0 + halo) * (y1 - y0) * xo, (z1 - z0) * (y1 - y0) * xo)
             for z0, z1, y0, y1 in direct_tiles(out_spatial, w_shape, dilation, itemsize)]
    columns, voxels = max(sizes)
    return ky * kx * n_in * columns * itemsize, voxels


def direct_tiles(out_spatial: Sequence[int], w_shape: Sequence[int], dilation: Sequence[int],
                 itemsize: int) -> list[Tile]:
    """The output tiles ``(z0, z1, y0, y1)`` (all of x) :func:`conv_forward_direct` computes one at a time."""
    n_in, _, kz, ky, kx = (int(v) for v in w_shape)
    zo, yo, xo = (int(v) for v in out_spatial)
    return _tiles((zo, yo, xo), (kz, ky, kx), _dil(dilation), ky * kx * n_in, itemsize)


def conv_backward_direct(x: np.ndarray, w: np.ndarray, grad_y: np.ndarray, dilation: Sequence[int] = (1, 1, 1),
                         threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of :func:`conv_forward_direct`: ``(grad_x (in, z, y, x), grad_w (in, out, kz, ky, kx))``."""
    d = _dil(dilation)
    check_conv_shapes(x.shape, w.shape, d, grad_y.shape)
    x, w, grad_y = _float(x, w, grad_y)
    return conv_grad_input_direct(w, grad_y, d, threads), _grad_kernel_direct(x, grad_y, w.shape, d, threads)


def conv_grad_input_direct(w: np.ndarray, grad_y: np.ndarray, dilation: Sequence[int] = (1, 1, 1),
                           threads: int = 1, rows: tuple[int, int] | None = None, axis: int = 0) -> np.ndarray:
    """``grad_x`` of :func:`conv_forward_direct` from ``grad_y`` alone (the input's extent is ``grad_y``'s plus
    the kernel's span); with ``rows = (r0, r1)``, only input rows ``r0..r1`` along spatial ``axis`` (0 z, 1 y,
    2 x), computed from the output rows that reach them: a task per slab of rows gives the same values."""
    d = _dil(dilation)
    grad_y, w = _float(grad_y, w)
    halo = [(k - 1) * dd for k, dd in zip(w.shape[2:], d)]
    n_rows = grad_y.shape[1 + axis]
    r0, r1 = (0, n_rows + halo[axis]) if rows is None else rows
    if not 0 <= r0 < r1 <= n_rows + halo[axis]:
        raise ShapeError(f"input rows {rows} along axis {axis} are outside 0..{n_rows + halo[axis]}")
    if grad_input_method(w.shape, grad_y.shape[1:], d, (r0, r1), axis) == "scatter":
        return _grad_input_scatter(w, grad_y, d, (r0, r1), axis, threads)
    if rows is None:
        return _grad_input_direct(w, grad_y, d, threads)
    lo, hi = max(0, r0 - halo[axis]), min(n_rows, r1)  # output rows that reach input rows r0..r1
    pads = [(0, 0)] + [(h, h) for h in halo]
    pads[1 + axis] = (lo - (r0 - halo[axis]), r1 - hi)
    wt = w[:, :, ::-1, ::-1, ::-1].transpose(1, 0, 2, 3, 4)
    return conv_forward_direct(np.pad(rows_along(grad_y, axis, lo, hi), pads), wt, d, threads)


def grad_input_method(w_shape: Sequence[int], out_spatial: Sequence[int], dilation: Sequence[int],
                      rows: tuple[int, int], axis: int) -> str:
    """How :func:`conv_grad_input_direct` computes input rows ``rows`` along ``axis``: ``padded`` or ``scatter``,
    whichever multiplies fewer (the padded way counts every tap of every input voxel, zeros included; the scatter
    only the taps that reach a voxel, at ``1 + SCATTER_MAPS / out maps`` times the cost of a padded one)."""
    k = [int(v) for v in w_shape[2:]]
    d = _dil(dilation)
    out = [int(v) for v in out_spatial]
    r0, r1 = rows
    extent = [n + (kk - 1) * dd for n, kk, dd in zip(out, k, d)]
    extent[axis] = r1 - r0
    padded = math.prod(extent) * math.prod(k)
    exact = sum(len(_reaching(out[axis], ta * d[axis], rows)) for ta in range(k[axis]))
    exact *= math.prod(n * kk for a, (n, kk) in enumerate(zip(out, k)) if a != axis)
    return "scatter" if padded > (1 + SCATTER_MAPS / int(w_shape[1])) * exact else "padded"


def _reaching(n_out: int, shift: int, rows: tuple[int, int]) -> range:
    """Output rows ``p`` (of ``n_out``) whose tap at ``shift`` lands in input rows ``rows``: ``r0 <= p + shift <
    r1``."""
    return range(max(0, rows[0] - shift), min(n_out, rows[1] - shift))


def _grad_input_scatter(w: np.ndarray, grad_y: np.ndarray, d: Triple, rows: tuple[int, int], axis: int,
                        threads: int) -> np.ndarray:
    """Input rows ``rows`` along ``axis`` of ``grad_x``: ``grad_x[i, p + t*d] += sum_o wc[i, o, t] grad_y[o, p]``
    (``wc`` the correlation kernel, ``w`` flipped) for the taps ``t`` and output voxels ``p`` that land there.

    The taps are grouped by their offset along ``axis``; each group is one GEMM ``(taps*in x out) @ (out x
    voxels)`` over the output rows it reaches, whose rows are added into place. With ``threads > 1`` the input rows
    are split into that many ranges, each computed the same way (no two threads add into one voxel)."""
    r0, r1 = rows
    if threads > 1 and r1 - r0 > 1:
        cuts = [r0 + (r1 - r0) * j // threads for j in range(threads + 1)]
        parts = parallel_map(lambda c: _grad_input_scatter(w, grad_y, d, c, axis, 1),
                             [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a], threads)
        return np.concatenate(parts, axis=1 + axis)
    n_in, n_out = w.shape[:2]
    k = w.shape[2:]
    out = grad_y.shape[1:]
    extent = [n + (kk - 1) * dd for n, kk, dd in zip(out, k, d)]
    extent[axis] = r1 - r0
    gx = np.zeros((n_in, *extent), dtype=grad_y.dtype)
    wc = w[:, :, ::-1, ::-1, ::-1]
    plane = math.prod(n for a, n in enumerate(out) if a != axis)  # output voxels per row along axis
    for ta in range(k[axis]):
        reach = _reaching(out[axis], ta * d[axis], rows)
        if not reach:
            continue
        taps = [t for t in np.ndindex(*k) if t[axis] == ta]
        wg = np.ascontiguousarray(np.stack([wc[(slice(None), slice(None), *t)] for t in taps]))
        wg = wg.reshape(len(taps) * n_in, n_out)
        step = max(1, TILE_BYTES // (wg.shape[0] * plane * grad_y.itemsize))
        for c0 in range(reach.start, reach.stop, step):
            c1 = min(reach.stop, c0 + step)
            gy = np.ascontiguousarray(rows_along(grad_y, axis, c0, c1))
            r = (wg @ gy.reshape(n_out, -1)).reshape(len(taps), n_in, *gy.shape[1:])
            for j, t in enumerate(taps):
                at = [slice(tb * db, tb * db + n) for tb, db, n in zip(t, d, out)]
                at[axis] = slice(c0 + ta * d[axis] - r0, c1 + ta * d[axis] - r0)
                gx[(slice(None), *at)] += r[j]
    return gx


def rows_along(a: np.ndarray, axis: int, lo: int, hi: int) -> np.ndarray:
    """Rows ``lo..hi`` along spatial ``axis`` (0 z, 1 y, 2 x) of ``a`` (maps, z, y, x): a view."""
    index: list[slice] = [slice(None)] * 4
    index[1 + axis] = slice(lo, hi)
    return a[tuple(index)]


def conv_grad_kernel_direct(x: np.ndarray, grad_y: np.ndarray, w_shape: Sequence[int],
                            dilation: Sequence[int] = (1, 1, 1), threads: int = 1) -> np.ndarray:
    """``grad_w (in, out, kz, ky, kx)`` of :func:`conv_forward_direct` from its input and output gradient (the
    kernel-gradient half of :func:`conv_backward_direct`; a slab of output rows and the input rows under it give
    that slab's share, and the shares add up to the whole)."""
    d = _dil(dilation)
    shape = tuple(int(v) for v in w_shape)
    check_conv_shapes(x.shape, shape, d, grad_y.shape)
    x, grad_y = _float(x, grad_y)
    return _grad_kernel_direct(x, grad_y, shape, d, threads)


def _grad_input_direct(w: np.ndarray, grad_y: np.ndarray, d: Triple, threads: int) -> np.ndarray:
    """``grad_x`` = full correlation of ``grad_y`` with the kernels: a valid convolution of the zero-padded
    gradient with the flipped, transposed kernels (so it reuses the forward GEMMs)."""
    pads = [(0, 0)] + [((k - 1) * dd, (k - 1) * dd) for k, dd in zip(w.shape[2:], d)]
    gyp = np.pad(grad_y, pads)
    wt = w[:, :, ::-1, ::-1, ::-1].transpose(1, 0, 2, 3, 4)
    return conv_forward_direct(gyp, wt, d, threads)


def _grad_kernel_direct(x: np.ndarray, grad_y: np.ndarray, w_shape: tuple[int, ...], d: Triple,
                        threads: int) -> np.ndarray:
    """``grad_w[i, o, t] = sum_p grad_y[o, p] x[i, p + (k - 1 - t) * d]``: per tile and z offset one GEMM
    ``(out x voxels) @ (voxels x ky*kx*in)`` on the same gathered columns as the forward pass."""
    n_in, n_out, kz, ky, kx = w_shape
    k = (kz, ky, kx)
    out_spatial = (grad_y.shape[1], grad_y.shape[2], grad_y.shape[3])
    xo = out_spatial[2]

    def work(tile: Tile) -> np.ndarray:
        z0, z1, y0, y1 = tile
        colm = _gather(x, tile, k, d, xo)
        plane = (y1 - y0) * xo
        nvox = (z1 - z0) * plane
        gy = np.ascontiguousarray(grad_y[:, z0:z1, y0:y1, :]).reshape(n_out, nvox)
        part = np.empty((kz, n_out, ky * kx * n_in), dtype=x.dtype)
        for sz in range(kz):
            s0 = sz * d[0] * plane
            np.matmul(gy, colm[:, s0:s0 + nvox].T, out=part[sz])
        return part

    parts = parallel_map(work, _tiles(out_spatial, k, d, ky * kx * n_in, x.itemsize), threads)
    acc = parts[0] if len(parts) == 1 else np.sum(parts, axis=0, dtype=x.dtype)
    # acc[sz, o, (sy, sx, i)] is the gradient of the flipped kernel
    g = acc.reshape(kz, n_out, ky, kx, n_in).transpose(4, 1, 0, 2, 3)[:, :, ::-1, ::-1, ::-1]
    return np.ascontiguousarray(g)


# ----------------------------------------------------------------------------------------------- dispatch


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ShapeError(f"conv mode must be one of {MODES}, got {mode!r}")


def conv_forward(x: np.ndarray, w: np.ndarray, dilation: Sequence[int] = (1, 1, 1), mode: str = "direct",
                 threads: int = 1, spectra: Spectra | None = None) -> np.ndarray:
    """Valid true convolution ``(in, z, y, x) * (in, out, kz, ky, kx) -> (out, z', y', x')`` in ``mode``.

    ``spectra`` (fft mode only) lends cached kernel spectra; use :func:`conv_forward_fft` to get them back.
    """
    _check_mode(mode)
    check_conv_shapes(x.shape, w.shape, dilation)
    if mode == "fft":
        return conv_forward_fft(x, w, dilation, spectra=spectra, keep=False, threads=threads)[0]
    return conv_forward_direct(x, w, dilation, threads)


def conv_backward(x: np.ndarray, w: np.ndarray, grad_y: np.ndarray, dilation: Sequence[int] = (1, 1, 1),
                  mode: str = "direct", threads: int = 1,
                  spectra: Spectra | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(grad_x (in, z, y, x), grad_w (in, out, kz, ky, kx))`` of :func:`conv_forward` in ``mode``."""
    _check_mode(mode)
    check_conv_shapes(x.shape, w.shape, dilation, grad_y.shape)
    if mode == "fft":
        return conv_backward_fft(x, w, grad_y, dilation, spectra=spectra, threads=threads)
    return conv_backward_direct(x, w, grad_y, dilation, threads)
