"""Phase-decomposed FFT convolution: a dilated convolution as independent undilated ones, one per phase."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from znn.types import Triple

# Working memory of one group of phases in a phase-decomposed FFT convolution (input and output spectra).
PHASE_GROUP_BYTES = 96 << 20
# Frequencies per product chunk: its spectra (phases x maps x chunk, complex) stay in the core's L2 cache.
_FREQ_CHUNK = 128


def phase_shape(extent: Sequence[int], kernel: Sequence[int], dilation: Sequence[int]) -> Triple:
    """FFT shape of the phases of a dilated convolution over ``extent``: each phase is ``ceil(extent / d)`` long."""
    from znn.ops.fft import fast_len

    return tuple(fast_len(-(-int(n) // int(d))) for n, d in zip(extent, dilation))  # type: ignore[return-value]


def phase_kernel_spectra(w: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Undilated kernel spectra at ``shape``, frequency-major ``(F, in, out)``."""
    from znn.ops import conv_fft

    spec = conv_fft.kernel_spectra(w, (1, 1, 1), shape)
    full = np.moveaxis(spec, (0, 1), (3, 4))  # storage order (Z, Y, Xh, in, out): a view
    return np.ascontiguousarray(full).reshape(-1, w.shape[0], w.shape[1])


def phase_conv_fft(x: np.ndarray, w: np.ndarray, dilation: Sequence[int], wf: np.ndarray | None = None,
                   group_bytes: int = PHASE_GROUP_BYTES, threads: int = 1) -> np.ndarray:
    """Valid true convolution ``(in, z, y, x) * (in, out, k...)`` dilated by ``dilation``, through FFTs of its phases.

    A convolution dilated by ``d`` on a dense volume is ``d_z d_y d_x`` independent undilated convolutions, one per
    phase (the voxels ``r + d q``). The phases share the kernel spectra of one small FFT shape (so they can be
    cached where the full-size ones would not fit), and per frequency the sum over input maps of a group of phases
    is one matrix product ``(phases x in) @ (in x out)``. ``wf`` are :func:`phase_kernel_spectra` (computed here if
    not given). ``threads`` split the transforms and the products. ``x`` may be any view (a crop of a larger map).

    Each phase is read from ``x`` straight into the FFT buffer and each phase's output written straight into its
    interleaved place in the result: a block's activations are tens of megabytes, and every extra copy is memory
    traffic that workers on the other cores of the machine compete for.
    """
    from znn.ops import conv_fft
    from znn.ops.fft import complex_dtype, empty_aligned, irfft3, parallel_chunks, rfft3

    n_in, n_out = w.shape[:2]
    k = w.shape[2:]
    d = tuple(int(v) for v in dilation)
    n = x.shape[1:]
    m = tuple(a - (b - 1) * c for a, b, c in zip(n, k, d))
    lengths = tuple(-(-a // c) for a, c in zip(n, d))
    shape = phase_shape(n, k, d)
    if wf is None:
        wf = phase_kernel_spectra(w, shape)
    dtype = np.dtype(np.float32) if x.dtype == np.float32 else np.dtype(np.float64)
    count = d[0] * d[1] * d[2]
    low = tuple(a - b + 1 for a, b in zip(lengths, k))
    freq = wf.shape[0]
    per_phase = (n_in + n_out) * freq * np.dtype(wf.dtype).itemsize * 2
    group = max(1, min(count, group_bytes // max(1, per_phase)))
    # the output voxel (o, z d0 + r0, y d1 + r1, x d2 + r2) is voxel (z, y, x) of phase (r0, r1, r2)
    full = np.empty((n_out, low[0], d[0], low[1], d[1], low[2], d[2]), dtype=dtype)
    # zeros where a phase is shorter than the FFT shape (a phase past the end of x, or a padded fast length)
    padded = any(a * c != b for a, c, b in zip(lengths, d, n)) or tuple(shape) != lengths
    crop = tuple(slice(o, o + e) for o, e in zip(conv_fft.output_offset(k, (1, 1, 1)), low))
    scale = 1.0 / math.prod(shape)  # FFTW's inverse is unnormalised
    index = list(np.ndindex(*d))
    for g0 in range(0, count, group):
        chosen = index[g0:g0 + group]
        real = empty_aligned((len(chosen), n_in, *shape), dtype)
        if padded:
            real.fill(0)
        for j, r in enumerate(chosen):
            phase = x[:, r[0]::d[0], r[1]::d[1], r[2]::d[2]]
            real[(j, slice(None), *(slice(0, e) for e in phase.shape[1:]))] = phase
        spec = rfft3(real.reshape(len(chosen) * n_in, *shape), threads)
        rows_in, rows_out = len(chosen) * n_in, len(chosen) * n_out
        maps_first = empty_aligned((rows_out, *spec.shape[1:]), complex_dtype(dtype))
        xs, ys = spec.reshape(rows_in, freq), maps_first.reshape(rows_out, freq)

        def products(lo: int, hi: int, xs: np.ndarray = xs, ys: np.ndarray = ys) -> None:
            # per frequency one (phases x in) @ (in x out) product; the spectra are maps-first, so each chunk of
            # frequencies is turned frequency-major and back while it is in cache, not the whole arrays in memory
            for a in range(lo, hi, _FREQ_CHUNK):
                b = min(hi, a + _FREQ_CHUNK)
                xc = np.ascontiguousarray(xs[:, a:b].T).reshape(b - a, len(chosen), n_in)
                ys[:, a:b] = np.matmul(xc, wf[a:b]).reshape(b - a, rows_out).T

        parallel_chunks(freq, threads, products, _FREQ_CHUNK)
        del spec
        y = irfft3(maps_first, shape, threads).reshape(len(chosen), n_out, *shape)
        for j, r in enumerate(chosen):
            np.multiply(y[(j, slice(None), *crop)], scale, out=full[:, :, r[0], :, r[1], :, r[2]])
    result = full.reshape(n_out, low[0] * d[0], low[1] * d[1], low[2] * d[2])
    if result.shape[1:] != m:
        result = np.ascontiguousarray(result[:, :m[0], :m[1], :m[2]])
    return result
