"""Valid 3D convolution of feature maps (ZNN's conv edge): public entry points and the direct (BLAS) mode.

Shapes: input ``x (in, z, y, x)``, kernels ``w (in, out, kz, ky, kx)``, dilation ``(dz, dy, dx)`` (ZNN's
sparsity), output ``y (out, z', y', x')`` with ``z' = z - (kz - 1) * dz`` and so on. The convolution is a true
convolution (kernel flipped), as in ZNN::

    y[o] = sum_i scipy.signal.convolve(x[i], dilate(w[i, o]), mode="valid")

No bias (transfer nodes add it). The dtype of ``x`` (float32 or float64) is kept.

Threads: ``threads`` is how many cores one call may use. FFTW and the loops this module splits itself obey it;
BLAS obeys the caller's ``threadpoolctl`` limit, which the caller sets to the same number (the pipeline owns
thread counts: one big task gets them all, many parallel tasks get one each).

Direct mode gathers the ``ky * kx`` in-plane kernel offsets of a tile of input rows into a column matrix
(im2col over y and x only) and accumulates one GEMM ``(out x ky*kx*in) @ (ky*kx*in x voxels)`` per z offset,
reading the z shift as a strided view of that matrix: the copy is ``kz`` times smaller than a full im2col and
every GEMM has a deep contraction.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from znn.errors import ShapeError
from znn.ops.conv_fft import Spectra, conv_backward_fft, conv_forward_fft
from znn.ops.fft import Shape3, check_conv_shapes

__all__ = [
    "MODES",
    "conv_forward",
    "conv_backward",
    "conv_forward_direct",
    "conv_backward_direct",
    "check_conv_shapes",
]

MODES = ("direct", "fft")

# Bytes of gathered columns per tile: large enough for long GEMMs, small enough to stay out of swap on
# big patches (the whole column matrix of a 2D layer with 40x40 kernels would be gigabytes).
_TILE_BYTES = 48 << 20


def _dil(dilation: Sequence[int]) -> Shape3:
    d = tuple(int(v) for v in dilation)
    if len(d) != 3:
        raise ShapeError(f"dilation must be three integers (dz, dy, dx), got {dilation}")
    return (d[0], d[1], d[2])


def _float(x: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Cast everything to the input's float dtype (float32/float64; anything else becomes float64)."""
    dt = x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    return [a.astype(dt, copy=False) for a in (x, *others)]


# ----------------------------------------------------------------------------------------------- tiling


def _tiles(in_spatial: Shape3, out_spatial: Shape3, k: Shape3, d: Shape3, n_rows: int,
           itemsize: int) -> Iterator[tuple[int, int, int, int]]:
    """Output tiles ``(z0, z1, y0, y1)`` whose gathered columns (``n_rows`` per voxel) fit ``_TILE_BYTES``."""
    zo, yo, xo = out_spatial
    halo_z = (k[0] - 1) * d[0]
    plane = n_rows * xo * itemsize  # bytes per gathered input row of one z plane
    # whole output rows per tile if one plane of output fits, else split y
    rows_fit = max(1, _TILE_BYTES // max(1, plane * (1 + halo_z)))
    if rows_fit >= yo:
        zt = max(1, min(zo, (_TILE_BYTES // (plane * yo) - halo_z)))
        for z0 in range(0, zo, zt):
            yield z0, min(zo, z0 + zt), 0, yo
    else:
        for z0 in range(zo):
            for y0 in range(0, yo, rows_fit):
                yield z0, z0 + 1, y0, min(yo, y0 + rows_fit)


def _gather(x: np.ndarray, col: np.ndarray, z0: int, zin: int, y0: int, yt: int, k: Shape3, d: Shape3,
            xo: int) -> None:
    """``col[sy, sx, i, z, y, x] = x[i, z0 + z, y0 + y + sy*dy, x + sx*dx]`` for the tile (im2col in y, x)."""
    for sy in range(k[1]):
        ys = y0 + sy * d[1]
        for sx in range(k[2]):
            xs = sx * d[2]
            col[sy, sx] = x[:, z0:z0 + zin, ys:ys + yt, xs:xs + xo]


# ----------------------------------------------------------------------------------------------- direct


def conv_forward_direct(x: np.ndarray, w: np.ndarray, dilation: Sequence[int] = (1, 1, 1)) -> np.ndarray:
    """Direct valid true convolution: ``(in, z, y, x)``, ``(in, out, kz, ky, kx)`` -> ``(out, z', y', x')``."""
    d = _dil(dilation)
    out_spatial = check_conv_shapes(x.shape, w.shape, d)
    x, w = _float(x, w)
    n_in, n_out, kz, ky, kx = w.shape
    k = (kz, ky, kx)
    zo, yo, xo = out_spatial
    # true convolution = correlation with the flipped kernel; rows ordered (sy, sx, in) like the columns
    wf = w[:, :, ::-1, ::-1, ::-1]
    wm = np.ascontiguousarray(wf.transpose(2, 1, 3, 4, 0)).reshape(kz, n_out, ky * kx * n_in)
    y = np.empty((n_out, zo, yo, xo), dtype=x.dtype)
    for z0, z1, y0, y1 in _tiles(x.shape[1:], out_spatial, k, d, ky * kx * n_in, x.itemsize):
        zt, yt = z1 - z0, y1 - y0
        zin = zt + (kz - 1) * d[0]
        col = np.empty((ky, kx, n_in, zin, yt, xo), dtype=x.dtype)
        _gather(x, col, z0, zin, y0, yt, k, d, xo)
        colm = col.reshape(ky * kx * n_in, zin * yt * xo)
        plane = yt * xo
        acc = np.empty((n_out, zt * plane), dtype=x.dtype)
        tmp = np.empty_like(acc) if kz > 1 else acc
        for sz in range(kz):
            src = colm[:, sz * d[0] * plane:(sz * d[0] + zt) * plane]  # z shift = a strided view, no copy
            np.matmul(wm[sz], src, out=acc if sz == 0 else tmp)
            if sz > 0:
                acc += tmp
        y[:, z0:z1, y0:y1, :] = acc.reshape(n_out, zt, yt, xo)
    return y


def conv_backward_direct(x: np.ndarray, w: np.ndarray, grad_y: np.ndarray,
                         dilation: Sequence[int] = (1, 1, 1)) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of :func:`conv_forward_direct`: ``(grad_x (in, z, y, x), grad_w (in, out, kz, ky, kx))``."""
    d = _dil(dilation)
    check_conv_shapes(x.shape, w.shape, d, grad_y.shape)
    x, w, grad_y = _float(x, w, grad_y)
    return _grad_input_direct(w, grad_y, d), _grad_kernel_direct(x, grad_y, w.shape, d)


def _grad_input_direct(w: np.ndarray, grad_y: np.ndarray, d: Shape3) -> np.ndarray:
    """``grad_x`` = full correlation of ``grad_y`` with the kernels: a valid convolution of the zero-padded
    gradient with the flipped, transposed kernels (so it reuses the forward GEMMs)."""
    pads = [(0, 0)] + [((k - 1) * dd, (k - 1) * dd) for k, dd in zip(w.shape[2:], d)]
    gyp = np.pad(grad_y, pads)
    wt = w[:, :, ::-1, ::-1, ::-1].transpose(1, 0, 2, 3, 4)
    return conv_forward_direct(gyp, wt, d)


def _grad_kernel_direct(x: np.ndarray, grad_y: np.ndarray, w_shape: tuple[int, ...], d: Shape3) -> np.ndarray:
    """``grad_w[i, o, t] = sum_p grad_y[o, p] x[i, p + (k - 1 - t) * d]``: per z offset one GEMM
    ``(out x voxels) @ (voxels x ky*kx*in)`` on the same gathered columns as the forward pass."""
    n_in, n_out, kz, ky, kx = w_shape
    k = (kz, ky, kx)
    out_spatial = grad_y.shape[1:]
    acc = np.zeros((kz, n_out, ky * kx * n_in), dtype=x.dtype)
    tmp = np.empty((n_out, ky * kx * n_in), dtype=x.dtype)
    for z0, z1, y0, y1 in _tiles(x.shape[1:], out_spatial, k, d, ky * kx * n_in, x.itemsize):
        zt, yt = z1 - z0, y1 - y0
        zin = zt + (kz - 1) * d[0]
        col = np.empty((ky, kx, n_in, zin, yt, out_spatial[2]), dtype=x.dtype)
        _gather(x, col, z0, zin, y0, yt, k, d, out_spatial[2])
        plane = yt * out_spatial[2]
        colm = col.reshape(ky * kx * n_in, zin * plane)
        gy = np.ascontiguousarray(grad_y[:, z0:z1, y0:y1, :]).reshape(n_out, zt * plane)
        for sz in range(kz):
            src = colm[:, sz * d[0] * plane:(sz * d[0] + zt) * plane]
            np.matmul(gy, src.T, out=tmp)
            acc[sz] += tmp
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
    return conv_forward_direct(x, w, dilation)


def conv_backward(x: np.ndarray, w: np.ndarray, grad_y: np.ndarray, dilation: Sequence[int] = (1, 1, 1),
                  mode: str = "direct", threads: int = 1,
                  spectra: Spectra | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(grad_x (in, z, y, x), grad_w (in, out, kz, ky, kx))`` of :func:`conv_forward` in ``mode``."""
    _check_mode(mode)
    check_conv_shapes(x.shape, w.shape, dilation, grad_y.shape)
    if mode == "fft":
        return conv_backward_fft(x, w, grad_y, dilation, spectra=spectra, threads=threads)
    return conv_backward_direct(x, w, grad_y, dilation)
