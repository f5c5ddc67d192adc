"""Phase-decomposed FFT convolution: a dilated convolution as independent undilated ones, one per phase."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from znn.types import Triple

# Working memory of one group of phases in a phase-decomposed FFT convolution (input and output spectra).
PHASE_GROUP_BYTES = 96 << 20
# Frequencies per product chunk: its spectra (phases x maps x chunk, complex) stay in the core's L2 cache.
_FREQ_CHUNK = 128


def phase_shape(extent: Sequence[int], kernel: Sequence[int], dilation: Sequence[int]) -> Triple:
    """FFT shape of the phases of a dilated convolution over ``extent``: each phase is ``ceil(extent / d)`` long."""
    from znn.ops.fft import fast_len

    z, y, x = (fast_len(-(-int(n) // int(d))) for n, d in zip(extent, dilation))
    return (z, y, x)


def phase_kernel_spectra(w: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Undilated kernel spectra at ``shape``, frequency-major ``(F, in, out)``."""
    from znn.ops import conv_fft

    spec = conv_fft.kernel_spectra(w, (1, 1, 1), shape)
    full = np.moveaxis(spec, (0, 1), (3, 4))  # storage order (Z, Y, Xh, in, out): a view
    return np.ascontiguousarray(full).reshape(-1, w.shape[0], w.shape[1])


@dataclass(frozen=True)
class _Phases:
    """The shapes of one phase-decomposed convolution of ``(in, n...)`` by ``(in, out, k...)`` dilated by ``d``."""

    n_in: int
    n_out: int
    kernel: Triple
    dilation: Triple
    lengths: Triple  # each phase's extent: ceil(n / d)
    shape: Triple  # the phases' FFT shape
    low: Triple  # each phase's valid output: lengths - k + 1
    out: Triple  # the valid output: n - (k - 1) d
    padded: bool  # zeros where a phase is shorter than the FFT shape (past the end of x, or a padded fast length)

    @classmethod
    def of(cls, extent: Sequence[int], w_shape: Sequence[int], dilation: Sequence[int]) -> _Phases:
        k = _triple(w_shape[2:])
        d = _triple(dilation)
        n = _triple(extent)
        lengths = _triple([-(-a // c) for a, c in zip(n, d)])
        shape = phase_shape(n, k, d)
        padded = any(a * c != b for a, c, b in zip(lengths, d, n)) or shape != lengths
        return cls(int(w_shape[0]), int(w_shape[1]), k, d, lengths, shape,
                   _triple([a - b + 1 for a, b in zip(lengths, k)]),
                   _triple([a - (b - 1) * c for a, b, c in zip(n, k, d)]), padded)


def _triple(values: Sequence[int]) -> Triple:
    return (int(values[0]), int(values[1]), int(values[2]))


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
    p = _Phases.of(x.shape[1:], w.shape, dilation)
    if wf is None:
        wf = phase_kernel_spectra(w, p.shape)
    dtype = np.dtype(np.float32) if x.dtype == np.float32 else np.dtype(np.float64)
    d, low, m = p.dilation, p.low, p.out
    per_phase = (p.n_in + p.n_out) * wf.shape[0] * np.dtype(wf.dtype).itemsize * 2
    count = d[0] * d[1] * d[2]
    group = max(1, min(count, group_bytes // max(1, per_phase)))
    # the output voxel (o, z d0 + r0, y d1 + r1, x d2 + r2) is voxel (z, y, x) of phase (r0, r1, r2)
    full = np.empty((p.n_out, low[0], d[0], low[1], d[1], low[2], d[2]), dtype=dtype)
    index = list(np.ndindex(*d))
    for g0 in range(0, count, group):
        _phase_group(x, wf, index[g0:g0 + group], p, full, threads)
    result = full.reshape(p.n_out, low[0] * d[0], low[1] * d[1], low[2] * d[2])
    if result.shape[1:] != m:
        result = np.ascontiguousarray(result[:, :m[0], :m[1], :m[2]])
    return result


def _phase_group(x: np.ndarray, wf: np.ndarray, chosen: Sequence[tuple[int, ...]], p: _Phases, full: np.ndarray,
                 threads: int) -> None:
    """Convolve the phases ``chosen`` of ``x`` and write each one's output into its interleaved place in ``full``."""
    from znn.ops import conv_fft
    from znn.ops.fft import complex_dtype, empty_aligned, irfft3, parallel_chunks, rfft3

    dtype, shape, n_in, n_out, freq = full.dtype, p.shape, p.n_in, p.n_out, wf.shape[0]
    real = empty_aligned((len(chosen), n_in, *shape), dtype)
    if p.padded:
        real.fill(0)
    for j, r in enumerate(chosen):
        phase = x[:, r[0]::p.dilation[0], r[1]::p.dilation[1], r[2]::p.dilation[2]]
        real[j, :, :phase.shape[1], :phase.shape[2], :phase.shape[3]] = phase
    spec = rfft3(real.reshape(len(chosen) * n_in, *shape), threads)
    maps_first = empty_aligned((len(chosen) * n_out, *spec.shape[1:]), complex_dtype(dtype))
    xs, ys = spec.reshape(len(chosen) * n_in, freq), maps_first.reshape(len(chosen) * n_out, freq)

    def products(lo: int, hi: int) -> None:
        # per frequency one (phases x in) @ (in x out) product; the spectra are maps-first, so each chunk of
        # frequencies is turned frequency-major and back while it is in cache, not the whole arrays in memory
        for a in range(lo, hi, _FREQ_CHUNK):
            b = min(hi, a + _FREQ_CHUNK)
            xc = np.ascontiguousarray(xs[:, a:b].T).reshape(b - a, len(chosen), n_in)
            ys[:, a:b] = np.matmul(xc, wf[a:b]).reshape(b - a, len(chosen) * n_out).T

    parallel_chunks(freq, threads, products, _FREQ_CHUNK)
    del spec
    y = irfft3(maps_first, shape, threads).reshape(len(chosen), n_out, *shape)
    offset = conv_fft.output_offset(p.kernel, (1, 1, 1))
    low = p.low
    scale = 1.0 / math.prod(shape)  # FFTW's inverse is unnormalised
    for j, r in enumerate(chosen):
        valid = y[j, :, offset[0]:offset[0] + low[0], offset[1]:offset[1] + low[1], offset[2]:offset[2] + low[2]]
        np.multiply(valid, scale, out=full[:, :, r[0], :, r[1], :, r[2]])
