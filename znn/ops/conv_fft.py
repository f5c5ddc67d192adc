"""FFT-mode valid convolution (ZNN's FFT convolution), split into pieces a task graph can schedule by blocks.

Conventions (``S = (Z, Y, X)`` is the padded FFT shape from :func:`znn.ops.fft.fft_shape`, ``Xh = X // 2 + 1``):

* Input maps are zero-padded to ``S`` at offset 0; a dilated kernel tap ``t`` sits at ``t * d`` (no flip), so
  the circular product ``X * W`` is the true convolution, whose valid part starts at ``(k - 1) * d``.
* The output gradient is placed at that same offset ``(k - 1) * d`` before its transform; then
  ``GY * conj(W)`` is the input gradient (read at offset 0) and ``GY * conj(X)`` the kernel gradient (read at
  the dilated taps).

Spectra are complex arrays of logical shape ``(maps, Z, Y, Xh)`` (kernels: ``(in, out, Z, Y, Xh)``) but are
stored frequency-major (maps last) so that the sum over input maps is one small matrix product per frequency
(``np.matmul`` over a batch of frequencies). They are ordinary NumPy arrays (transposed views): blocks can be
added, sliced along the map axes and pickled; any layout is accepted back, a non-frequency-major one costs a
copy.

The kernel spectra and the kernel gradient need ``in * out`` transforms but only ``kz * ky * kx`` of each
kernel's voxels are non-zero, so by default they are computed as separable *pruned* DFTs (three matrix
products through BLAS) instead of full FFTs; ``method="fft"`` runs the ZNN way (one FFTW transform per
kernel) for comparison and where it is cheaper (large 2D kernels).

A dilated convolution is also ``P = dz * dy * dx`` undilated ones, one per phase (the voxels ``r + d * q``):
:func:`phase_spectra` transforms the phases of the maps (logical maps ``P * n``, phase-major) at the small
:func:`phase_fft_shape`, the kernels are transformed undilated once at that shape, and the products, the input
gradient and the kernel gradient take ``phases=P`` (each frequency's product is then ``(P x in) @ (in x out)``,
not ``(1 x in) @ (in x out)``: the kernel spectra are ``P`` times smaller and each is read once for ``P`` rows).
:func:`merge_phases` puts the phases of a result back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from znn.errors import ShapeError
from znn.ops.fft import (
    is_compact,
    check_conv_shapes,
    complex_dtype,
    count_transforms,
    empty_aligned,
    fft_shape,
    irfft3,
    parallel_chunks,
    rfft3,
    spectrum_shape,
)
from znn.types import Triple

__all__ = [
    "Spectra",
    "conv_forward_fft",
    "conv_backward_fft",
    "input_spectra",
    "grad_output_spectra",
    "kernel_spectra",
    "multiply_accumulate",
    "join_map_spectra",
    "joins_blocks",
    "join_kernel_spectra",
    "inverse_valid",
    "grad_input_spectra",
    "grad_kernel",
    "output_offset",
    "transform_method",
    "phase_fft_shape",
    "phase_lengths",
    "phase_split",
    "phase_spectra",
    "merge_phases",
]

# Frequencies per matmul chunk handed to one thread: big enough to hide Python overhead, small enough to
# balance two threads.
_MIN_FREQ_CHUNK = 256
# Frequency columns per step of the kernel-gradient contraction.
_COLS_PER_STEP = 8
# At most this many (in, out) map pairs: the kernel gradient's lead stage is products then one DFT GEMM
# (:func:`_lead_by_products`), over chunks of this many product values.
_PAIRS_BY_PRODUCT = 16
_PRODUCT_CHUNK = 1 << 18


@dataclass
class Spectra:
    """Spectra of one conv layer, kept from the forward pass for the backward pass and later iterations.

    ``x_spec`` (``(in, Z, Y, Xh)``) belongs to one input patch; ``w_spec`` (``(in, out, Z, Y, Xh)``) stays
    valid until the kernels change, and the caller must drop it then.
    """

    shape: Triple
    in_spatial: Triple
    kernel_size: Triple
    dilation: Triple
    dtype: np.dtype[Any]
    x_spec: np.ndarray | None = None
    w_spec: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        """Memory held by the cached spectra, in bytes."""
        return sum(a.nbytes for a in (self.x_spec, self.w_spec) if a is not None)

    def matches(self, in_spatial: Sequence[int], kernel_size: Sequence[int], dilation: Sequence[int],
                dtype: np.dtype[Any]) -> bool:
        """Whether these spectra were made for this problem (shape, kernel, dilation, dtype)."""
        return (self.in_spatial == tuple(in_spatial) and self.kernel_size == tuple(kernel_size)
                and self.dilation == tuple(dilation) and self.dtype == np.dtype(dtype))


# ----------------------------------------------------------------------------------------------- layout


def _freq_major(spec: np.ndarray, nmaps: int) -> np.ndarray:
    """``(maps..., Z, Y, Xh)`` -> C-contiguous ``(F, maps...)``: a free view for our own spectra."""
    moved = np.moveaxis(spec, tuple(range(nmaps)), tuple(range(-nmaps, 0)))
    flat = np.ascontiguousarray(moved)
    return flat.reshape(math.prod(spec.shape[nmaps:]), *spec.shape[:nmaps])


def _maps_first(flat: np.ndarray, spatial: Sequence[int], nmaps: int) -> np.ndarray:
    """Inverse of :func:`_freq_major`: ``(F, maps...)`` -> logical ``(maps..., Z, Y, Xh)`` view."""
    maps = flat.shape[1:]
    full = flat.reshape(*spatial, *maps)
    return np.moveaxis(full, tuple(range(3, 3 + nmaps)), tuple(range(nmaps)))


def output_offset(kernel_size: Sequence[int], dilation: Sequence[int]) -> Triple:
    """Where the valid output starts in the circular result: ``(k - 1) * d`` per axis."""
    o = [(int(k) - 1) * int(d) for k, d in zip(kernel_size, dilation)]
    return (o[0], o[1], o[2])


# ----------------------------------------------------------------------------------------------- forward


def input_spectra(x_block: np.ndarray, shape: Sequence[int], threads: int = 1,
                  offset: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Spectra of maps ``(n, z, y, x)`` zero-padded to ``shape`` at ``offset``: complex ``(n, Z, Y, Xh)``.

    float32 maps give complex64 spectra, float64 give complex128. ``n`` transforms, one batched plan.
    """
    shape3 = (int(shape[0]), int(shape[1]), int(shape[2]))
    n = x_block.shape[0]
    sl = tuple(slice(o, o + e) for o, e in zip(offset, x_block.shape[1:]))
    if any(s.stop > e for s, e in zip(sl, shape3)):
        raise ShapeError(f"maps {x_block.shape} at offset {tuple(offset)} do not fit the FFT shape {shape3}")
    real = empty_aligned((n, *shape3), _real_dtype(x_block))
    real.fill(0)
    real[(slice(None), *sl)] = x_block
    return _spectra_of(real, threads)


def _real_dtype(x: np.ndarray) -> type:
    return np.float32 if x.dtype == np.float32 else np.float64


def _spectra_of(real: np.ndarray, threads: int) -> np.ndarray:
    """Spectra of the padded maps ``real`` (destroyed), in frequency-major storage: the products over maps then
    run on contiguous (maps) rows. FFTW writes them there (maps last), which is faster than a transposed copy."""
    n = real.shape[0]
    spatial = spectrum_shape(real.shape[1:])
    flat = empty_aligned((math.prod(spatial), n), complex_dtype(real.dtype))
    rfft3(real, threads, out=_maps_first(flat, spatial, 1))
    return _maps_first(flat, spatial, 1)


def phase_lengths(extent: Sequence[int], dilation: Sequence[int]) -> Triple:
    """The extent of the longest phase of ``extent`` dilated by ``dilation``: ``ceil(extent / d)``."""
    n = [-(-int(e) // int(d)) for e, d in zip(extent, dilation)]
    return (n[0], n[1], n[2])


def phase_fft_shape(extent: Sequence[int], kernel_size: Sequence[int], dilation: Sequence[int]) -> Triple:
    """FFT shape of the undilated convolutions of the phases of a convolution over ``extent`` dilated by
    ``dilation``."""
    return fft_shape(phase_lengths(extent, dilation), kernel_size, (1, 1, 1))


def phase_split(extent: Sequence[int], kernel_size: Sequence[int], dilation: Sequence[int]) -> Triple:
    """How a convolution over ``extent`` is split into phases: by its dilation, and along z by every plane when
    the kernel is one plane thick (2D kernels on a 3D patch: no transform along z, more rows per product)."""
    z = int(extent[0]) if int(kernel_size[0]) == 1 else int(dilation[0])
    return (z, int(dilation[1]), int(dilation[2]))


def _phases(dilation: Sequence[int]) -> list[tuple[int, int, int]]:
    """The phases ``(rz, ry, rx)`` of ``dilation``, in the order of the phase-major maps."""
    return [(int(a), int(b), int(c)) for a, b, c in np.ndindex(*(int(v) for v in dilation))]


def phase_spectra(maps: np.ndarray, dilation: Sequence[int], shape: Sequence[int], threads: int = 1,
                  offset: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Spectra of the phases of ``maps`` ``(n, z, y, x)``: phase ``(rz, ry, rx)`` holds ``maps[:, rz::dz, ry::dy,
    rx::dx]``, zero-padded to ``shape`` at ``offset``. Complex ``(P * n, Z, Y, Xh)``, phase-major (map ``p * n +
    i`` is phase ``p`` of map ``i``, phases in C order of ``dilation``)."""
    shape3 = (int(shape[0]), int(shape[1]), int(shape[2]))
    n = maps.shape[0]
    longest = phase_lengths(maps.shape[1:], dilation)
    if any(o + e > s for o, e, s in zip(offset, longest, shape3)):
        raise ShapeError(f"phases {longest} of maps {maps.shape} at offset {tuple(offset)} do not fit the FFT "
                         f"shape {shape3}")
    phases = _phases(dilation)
    real = empty_aligned((len(phases) * n, *shape3), _real_dtype(maps))
    real.fill(0)
    for p, (rz, ry, rx) in enumerate(phases):
        part = maps[:, rz::int(dilation[0]), ry::int(dilation[1]), rx::int(dilation[2])]
        real[(slice(p * n, (p + 1) * n), *(slice(o, o + e) for o, e in zip(offset, part.shape[1:])))] = part
    return _spectra_of(real, threads)


def merge_phases(phase_maps: np.ndarray, dilation: Sequence[int], extent: Sequence[int]) -> np.ndarray:
    """Maps ``(n, *extent)`` from their phases ``(P * n, z', y', x')`` (phase-major, as :func:`phase_spectra`
    orders them; each phase's part beyond the extent is dropped)."""
    phases = _phases(dilation)
    n = phase_maps.shape[0] // len(phases)
    out = np.empty((n, *(int(e) for e in extent)), dtype=phase_maps.dtype)
    for p, (rz, ry, rx) in enumerate(phases):
        view = out[:, rz::int(dilation[0]), ry::int(dilation[1]), rx::int(dilation[2])]
        view[...] = phase_maps[p * n:(p + 1) * n, :view.shape[1], :view.shape[2], :view.shape[3]]
    return out


def grad_output_spectra(grad_y: np.ndarray, shape: Sequence[int], kernel_size: Sequence[int],
                        dilation: Sequence[int], threads: int = 1) -> np.ndarray:
    """Spectra of output gradients ``(out, z', y', x')`` placed where the valid output sits in the circle."""
    return input_spectra(grad_y, shape, threads, output_offset(kernel_size, dilation))


@lru_cache(maxsize=256)
def _dft_matrix(size: int, taps: int, dilation: int, half: bool, sign: int, dtype_str: str) -> np.ndarray:
    """``E[f, t] = exp(sign * 2j*pi * f * t * dilation / size)`` for ``f`` over the full or half axis."""
    nf = size // 2 + 1 if half else size
    f = np.arange(nf, dtype=np.float64)[:, None]
    t = np.arange(taps, dtype=np.float64)[None, :] * dilation
    # reduce the phase index modulo size first: exact integers keep float64 phases accurate
    phase = np.mod(f * t, size) * (2.0 * np.pi / size)
    mat = np.exp(sign * 1j * phase)
    out: np.ndarray = mat.astype(dtype_str)
    out.flags.writeable = False
    return out


def _pruned_kernel_spectra(w: np.ndarray, dilation: Sequence[int], shape: Triple, threads: int,
                           out: np.ndarray | None) -> np.ndarray:
    """Pruned forward DFT of dilated kernels: three matrix products, result C-contiguous (Z, Y, Xh, in, out).

    The y and z stages run fused over chunks of y frequencies, so the only big array written is the result
    (into ``out``, a C-contiguous ``(Z, Y, Xh * in * out)`` buffer, when given).
    """
    n_in, n_out, kz, ky, kx = w.shape
    cdt = complex_dtype(w.dtype).str
    Z, Y, X = shape
    Xh = X // 2 + 1
    nio = n_in * n_out
    ex = _dft_matrix(X, kx, int(dilation[2]), True, -1, cdt)   # (Xh, kx)
    ey = _dft_matrix(Y, ky, int(dilation[1]), False, -1, cdt)  # (Y, ky)
    ez = _dft_matrix(Z, kz, int(dilation[0]), False, -1, cdt)  # (Z, kz)
    # x stage on the few non-zero rows as a real GEMM whose output columns interleave (re, im): it *is* the
    # complex result; then put the maps last (small array) for the big products
    ex_ri = np.ascontiguousarray(ex.T).view(w.dtype)  # (kx, 2*Xh) real
    a = np.matmul(w.reshape(nio * kz * ky, kx), ex_ri).view(cdt)  # (nio*kz*ky, Xh) complex
    b = np.ascontiguousarray(a.reshape(nio, kz, ky, Xh).transpose(1, 2, 3, 0))  # (kz, ky, Xh, nio)
    width = Xh * nio
    b = b.reshape(kz, ky, width)
    if out is None:
        out = np.empty((Z, Y, width), dtype=cdt)

    def work(y0: int, y1: int) -> None:
        if Z == 1:
            np.matmul(ey[y0:y1], b[0], out=out[0, y0:y1])
            return
        c = np.matmul(ey[y0:y1], b)  # (kz, yc, width)
        np.matmul(ez, c.reshape(kz, (y1 - y0) * width), out=_rows(out[:, y0:y1, :]))

    parallel_chunks(Y, threads, work, 1, 4)
    return out.reshape(Z, Y, Xh, n_in, n_out)


def _rows(a: np.ndarray) -> np.ndarray:
    """View ``(r, m, n)`` with contiguous trailing ``(m, n)`` as the matrix ``(r, m * n)`` (never a copy)."""
    v = a.reshape(a.shape[0], a.shape[1] * a.shape[2])
    assert v.size == 0 or np.shares_memory(v, a), "internal: expected a view"
    return v


def _fftw_kernel_spectra(w: np.ndarray, dilation: Sequence[int], shape: Triple, threads: int) -> np.ndarray:
    """ZNN's way: zero-pad every dilated kernel to ``shape`` and FFT it; result (Z, Y, Xh, in, out)."""
    n_in, n_out, kz, ky, kx = w.shape
    dz, dy, dx = (int(d) for d in dilation)
    real = empty_aligned((n_in * n_out, *shape), w.dtype)
    real.fill(0)
    real[:, 0:(kz - 1) * dz + 1:dz, 0:(ky - 1) * dy + 1:dy, 0:(kx - 1) * dx + 1:dx] = \
        w.reshape(n_in * n_out, kz, ky, kx)
    spec = rfft3(real, threads, count=False)  # kernel_spectra counts them, whichever way they are made
    flat = np.ascontiguousarray(spec.reshape(n_in * n_out, math.prod(spec.shape[1:])).T)
    return flat.reshape(*spectrum_shape(shape), n_in, n_out)


def kernel_spectra(w_block: np.ndarray, dilation: Sequence[int], shape: Sequence[int], threads: int = 1,
                   method: str = "auto", out: np.ndarray | None = None) -> np.ndarray:
    """Spectra of kernels ``(in, out, kz, ky, kx)`` dilated and zero-padded to ``shape``.

    Returns complex ``(in, out, Z, Y, Xh)`` (frequency-major storage). ``method``: ``"pruned"`` (matrix
    products), ``"fft"`` (one FFTW transform per kernel) or ``"auto"``. ``out``: stale spectra returned by
    an earlier call for kernels of the same shape, overwritten in place (after a weight update this skips
    allocating, and the kernel zeroing the pages of, the largest array of the layer).
    """
    shape3 = (int(shape[0]), int(shape[1]), int(shape[2]))
    n_in, n_out = w_block.shape[:2]
    storage = None if out is None else _kernel_storage(out, w_block, shape3)
    if transform_method(method, w_block.shape[2:], shape3) == "fft":
        full = _fftw_kernel_spectra(w_block, dilation, shape3, threads)
        if storage is not None:
            np.copyto(storage.reshape(full.shape), full)
            full = storage.reshape(full.shape)
    else:
        full = _pruned_kernel_spectra(w_block, dilation, shape3, threads, storage)
    count_transforms("forward", n_in * n_out)
    return np.moveaxis(full, (3, 4), (0, 1))


def _kernel_storage(out: np.ndarray, w: np.ndarray, shape: Triple) -> np.ndarray:
    """The frequency-major buffer ``(Z, Y, Xh * in * out)`` behind kernel spectra ``out`` (checked)."""
    n_in, n_out = w.shape[:2]
    expect = (n_in, n_out, *spectrum_shape(shape))
    if out.shape != expect or out.dtype != complex_dtype(w.dtype):
        raise ShapeError(f"out has shape {out.shape} and dtype {out.dtype}; kernel spectra here are {expect} "
                         f"{complex_dtype(w.dtype)}")
    base = np.moveaxis(out, (0, 1), (3, 4))
    if not base.flags.c_contiguous:
        raise ShapeError("out must be kernel spectra returned by kernel_spectra (frequency-major storage)")
    return base.reshape(shape[0], shape[1], spectrum_shape(shape)[2] * n_in * n_out)


def transform_method(method: str, kernel_size: Sequence[int], shape: Triple) -> str:
    """Pick pruned matrix-product DFTs or full FFTs for the ``in * out`` kernel transforms.

    The pruned way costs about 8 * k_lead complex flops per spectrum value (k_lead: kernel size along the
    first axis longer than 1) at BLAS speed; an FFT about 2.5 * log2(N) flops per voxel at FFTW speed, which
    on the development machine is ~8x slower per flop. So pruning wins unless the lead kernel is long.
    """
    if method not in ("auto", "pruned", "fft"):
        raise ValueError(f"method must be 'auto', 'pruned' or 'fft', got {method!r}")
    if method != "auto":
        return method
    k_lead = kernel_size[0] if shape[0] > 1 else kernel_size[1]
    fft_cost = 8.0 * 2.5 * math.log2(max(2, math.prod(shape)))
    return "pruned" if 8.0 * k_lead <= fft_cost else "fft"


# A product over blocks of maps of an edge split into phases runs block by block (summed) when every block holds at
# least this many maps, else the blocks are joined first (join_map_spectra, join_kernel_spectra: one product over
# all maps per frequency, but the join copies the column's or row's kernel spectra). One core, N4_relu's conv2 (48
# maps, 4 phases, 96x96) at 1x100x100, forward products of one output block: blocks of 24 maps 11.0 ms summed vs
# 14.8 joined, of 12 4.0 vs 7.0, of 6 9.0 vs 6.7 (input gradient 15.7 vs 22.1, 10.5 vs 15.3, 11.4 vs 12.7).
SUM_BLOCKS_FROM_MAPS = 12


def joins_blocks(block_maps: Sequence[int], phases: int) -> bool:
    """Whether a product over blocks of ``block_maps`` maps each joins them first (edges split into ``phases``
    phases with small blocks; see :data:`SUM_BLOCKS_FROM_MAPS`) rather than summing block by block."""
    return phases > 1 and len(block_maps) > 1 and min(block_maps) < SUM_BLOCKS_FROM_MAPS


def join_map_spectra(specs: Sequence[np.ndarray], phases: int = 1) -> np.ndarray:
    """Spectra of blocks of maps (each ``(P * n_b, F...)``, phase-major) joined into the spectra of all their
    maps (``(P * n, F...)``, phase-major), in frequency-major storage: one product over all maps runs as one
    matrix product per frequency, where a sum of per-block products ran many small ones."""
    if len(specs) == 1:
        return specs[0]
    spatial = specs[0].shape[1:]
    parts = [_freq_major(s, 1).reshape(-1, phases, s.shape[0] // phases) for s in specs]
    flat = np.concatenate(parts, axis=2)
    return _maps_first(flat.reshape(flat.shape[0], -1), spatial, 1)


def join_kernel_spectra(specs: Sequence[np.ndarray], axis: int) -> np.ndarray:
    """Kernel spectra of blocks ``(in_b, out_b, F...)`` joined along their input (``axis`` 0) or output (1) maps,
    in frequency-major storage."""
    if len(specs) == 1:
        return specs[0]
    spatial = specs[0].shape[2:]
    flat = np.concatenate([_freq_major(s, 2) for s in specs], axis=1 + axis)
    full = flat.reshape(*spatial, *flat.shape[1:])
    return np.moveaxis(full, (3, 4), (0, 1))


def multiply_accumulate(x_spec: np.ndarray, w_spec: np.ndarray, threads: int = 1, phases: int = 1) -> np.ndarray:
    """Sum over input maps in the frequency domain: ``(in, F...)``, ``(in, out, F...)`` -> ``(out, F...)``;
    with ``phases = P`` (:func:`phase_spectra`), ``(P * in, F...)`` -> ``(P * out, F...)``.

    One ``(P x in) @ (in x out)`` product per frequency; partial sums of input blocks are added by the caller.
    """
    _check_spec_pair(x_spec, w_spec, phases)
    xf = _freq_major(x_spec, 1)
    wf = _freq_major(w_spec, 2)
    nf, n_out = xf.shape[0], wf.shape[2]
    out = empty_aligned((nf, phases, n_out), np.result_type(xf, wf))  # aligned: the inverse FFT runs on it
    x3 = xf.reshape(nf, phases, xf.shape[1] // phases)

    def work(lo: int, hi: int) -> None:
        np.matmul(x3[lo:hi], wf[lo:hi], out=out[lo:hi])

    parallel_chunks(nf, threads, work, _MIN_FREQ_CHUNK, 4)
    return _maps_first(out.reshape(nf, phases * n_out), x_spec.shape[1:], 1)


def inverse_valid(spec: np.ndarray, shape: Sequence[int], out_spatial: Sequence[int],
                  offset: Sequence[int] = (0, 0, 0), threads: int = 1, destroy: bool = False) -> np.ndarray:
    """One inverse FFT per map, cropped: ``(n, Z, Y, Xh)`` -> real ``(n, *out_spatial)`` from ``offset``.

    For a forward output pass ``offset=output_offset(kernel_size, dilation)``; for an input gradient 0.
    ``spec`` is left unchanged (the transform runs on a copy), unless ``destroy``: then a compact ``spec`` (the
    frequency-major spectra this module makes) is transformed where it is, which saves the copy.
    """
    shape3 = (int(shape[0]), int(shape[1]), int(shape[2]))
    n = spec.shape[0]
    if spec.shape[1:] != spectrum_shape(shape3):
        raise ShapeError(f"spectrum {spec.shape} does not belong to FFT shape {shape3}")
    if destroy and (spec.flags.c_contiguous or is_compact(spec)):
        buf = spec
    else:
        buf = empty_aligned(spec.shape, spec.dtype)
        np.copyto(buf, spec)  # maps-first copy for the batched plan (and c2r destroys its input)
    real = irfft3(buf, shape3, threads)
    crop = real[(slice(None), *(slice(o, o + e) for o, e in zip(offset, out_spatial)))]
    out = np.empty((n, *out_spatial), dtype=real.dtype)
    np.multiply(crop, 1.0 / math.prod(shape3), out=out)  # FFTW's inverse is unnormalised
    return out


# ----------------------------------------------------------------------------------------------- backward


def grad_input_spectra(gy_spec: np.ndarray, w_spec: np.ndarray, threads: int = 1, phases: int = 1) -> np.ndarray:
    """Input-gradient spectra ``sum_o GY[o] * conj(W[i, o])``: ``(out, F...)``, ``(in, out, F...)`` -> ``(in, F...)``;
    with ``phases = P``, ``(P * out, F...)`` -> ``(P * in, F...)``.

    Computed as ``conj(W @ conj(GY))`` (phases: ``conj(conj(GY) @ W^T)``) so that only the small arrays are
    conjugated.
    """
    if gy_spec.shape[0] != phases * w_spec.shape[1] or gy_spec.shape[1:] != w_spec.shape[2:]:
        raise ShapeError(f"output-gradient spectra {gy_spec.shape} do not match kernel spectra {w_spec.shape}"
                         + (f" in {phases} phases" if phases > 1 else ""))
    if phases > 1:
        return _phase_grad_input_spectra(gy_spec, w_spec, threads, phases)
    gf = np.conj(_freq_major(gy_spec, 1))[:, :, None]  # (F, out, 1)
    wf = _freq_major(w_spec, 2)  # (F, in, out)
    nf, n_in = wf.shape[0], wf.shape[1]
    out = empty_aligned((nf, n_in, 1), np.result_type(gf, wf))

    def work(lo: int, hi: int) -> None:
        np.matmul(wf[lo:hi], gf[lo:hi], out=out[lo:hi])
        np.conjugate(out[lo:hi], out=out[lo:hi])

    parallel_chunks(nf, threads, work, _MIN_FREQ_CHUNK, 4)
    return _maps_first(out.reshape(nf, n_in), gy_spec.shape[1:], 1)


def _phase_grad_input_spectra(gy_spec: np.ndarray, w_spec: np.ndarray, threads: int, phases: int) -> np.ndarray:
    """:func:`grad_input_spectra` of ``phases`` phases: one ``(P x out) @ (out x in)`` product per frequency."""
    wf = _freq_major(w_spec, 2)  # (F, in, out)
    nf, n_in, n_out = wf.shape
    gf = np.conj(_freq_major(gy_spec, 1)).reshape(nf, phases, n_out)
    wt = wf.transpose(0, 2, 1)  # (F, out, in): column-major matrices, which BLAS reads transposed
    out = empty_aligned((nf, phases, n_in), np.result_type(gf, wf))

    def work(lo: int, hi: int) -> None:
        np.matmul(gf[lo:hi], wt[lo:hi], out=out[lo:hi])
        np.conjugate(out[lo:hi], out=out[lo:hi])

    parallel_chunks(nf, threads, work, _MIN_FREQ_CHUNK, 4)
    return _maps_first(out.reshape(nf, phases * n_in), gy_spec.shape[1:], 1)


def grad_kernel(x_spec: np.ndarray, gy_spec: np.ndarray, shape: Sequence[int], kernel_size: Sequence[int],
                dilation: Sequence[int], threads: int = 1, method: str = "auto", phases: int = 1) -> np.ndarray:
    """Kernel gradient from input spectra ``(in, F...)`` and output-gradient spectra ``(out, F...)``.

    The inverse transform of ``GY[o] * conj(X[i])`` read at the dilated taps ``t * d``: real
    ``(in, out, kz, ky, kx)``. ``method`` as for :func:`kernel_spectra` (pruned: only the taps are computed).
    With ``phases = P`` the spectra are of ``P * in`` and ``P * out`` phase maps (``dilation`` is then the
    phases' own, ones) and the products of all phases are summed (always pruned).
    """
    shape3 = (int(shape[0]), int(shape[1]), int(shape[2]))
    k3 = (int(kernel_size[0]), int(kernel_size[1]), int(kernel_size[2]))
    if x_spec.shape[1:] != gy_spec.shape[1:] or x_spec.shape[1:] != spectrum_shape(shape3):
        raise ShapeError(f"input spectra {x_spec.shape} and output-gradient spectra {gy_spec.shape} do not "
                         f"share the FFT shape {shape3}")
    xf = _freq_major(x_spec, 1)
    gf = _freq_major(gy_spec, 1)
    if phases == 1 and transform_method(method, k3, shape3) == "fft":
        g = _fftw_grad_kernel(xf, gf, shape3, k3, dilation, threads)
    else:
        g = _pruned_grad_kernel(xf, gf, shape3, k3, dilation, threads, phases)
    count_transforms("inverse", xf.shape[1] * gf.shape[1] // phases ** 2)
    return g


def _pruned_grad_kernel(xf: np.ndarray, gf: np.ndarray, shape: Triple, k3: Triple,
                        dilation: Sequence[int], threads: int, phases: int = 1) -> np.ndarray:
    """Pruned inverse DFT of ``GY * conj(X)`` at the kernel taps, as matrix products.

    Lead stage: along the first axis longer than 1 (z, or y for 2D) the product and the inverse DFT to the
    ``k`` taps are one contraction per remaining frequency ``c``:
    ``Q[c, i, t, o] = sum_l conj(X[l, c, i]) * e[l, t] * GY[l, c, o]``, i.e. ``(in x L) @ (L x k*out)``.
    Then the other axes shrink to their taps with single large matrix products, x last (half spectrum, real).
    With ``phases = P`` the lead contraction runs over the lead index and the phase together (``L * P`` long).
    """
    Z, Y, _ = shape
    kz, ky, _ = k3
    n_in, n_out = xf.shape[1] // phases, gf.shape[1] // phases
    cdt = xf.dtype.str
    lead_z = Z > 1
    L = Z if lead_z else Y
    k_lead = kz if lead_z else ky
    e_lead = _dft_matrix(L, k_lead, int(dilation[0] if lead_z else dilation[1]), False, +1, cdt)  # (L, k)
    ncol = xf.shape[0] // L  # remaining frequencies per lead index
    if phases > k_lead:  # summing the phases' products first is the smaller contraction
        q = _summed_phases_lead(xf, gf, e_lead, phases, threads)
        return _pruned_tail(q, shape, k3, dilation, n_out)
    # contiguous per-column matrices: strided ones make BLAS thrash the cache for power-of-two sizes
    xc = np.ascontiguousarray(xf.reshape(L, ncol, phases, n_in).transpose(1, 3, 0, 2))  # (ncol, in, L, P)
    xc = xc.reshape(ncol, n_in, L * phases)
    np.conjugate(xc, out=xc)
    gc = np.ascontiguousarray(gf.reshape(L, ncol, phases, n_out).transpose(1, 0, 2, 3))  # (ncol, L, P, out)
    gc = gc.reshape(ncol, L * phases, n_out)
    if phases > 1:
        e_lead = np.repeat(e_lead, phases, axis=0)  # row l * P + p: every phase of lead index l
        L *= phases
    q = np.empty((ncol, n_in, k_lead * n_out), dtype=xf.dtype)
    if n_in * n_out <= _PAIRS_BY_PRODUCT:
        _lead_by_products(xc, gc, e_lead, q, threads)
        return _pruned_tail(q, shape, k3, dilation, n_out)
    e4 = e_lead[None, :, :, None]

    def work(lo: int, hi: int) -> None:
        for a in range(lo, hi, _COLS_PER_STEP):  # small steps keep the weighted copy of GY in cache
            b = min(hi, a + _COLS_PER_STEP)
            gw = (gc[a:b, :, None, :] * e4).reshape(b - a, L, k_lead * n_out)
            np.matmul(xc[a:b], gw, out=q[a:b])

    parallel_chunks(ncol, threads, work, _COLS_PER_STEP, 4)
    return _pruned_tail(q, shape, k3, dilation, n_out)


def _summed_phases_lead(xf: np.ndarray, gf: np.ndarray, e_lead: np.ndarray, phases: int,
                        threads: int) -> np.ndarray:
    """The lead stage of many phases: ``G[f, i, o] = sum_p conj(X[f, p, i]) GY[f, p, o]`` (one ``(in x P) @ (P x
    out)`` product per frequency), then the lead axis's DFT to its taps as one GEMM; ``q`` as
    :func:`_pruned_tail` takes it. The fused contraction would weigh every phase by every tap first: ``k``
    times the products."""
    nf = xf.shape[0]
    L, k = e_lead.shape
    n_in, n_out = xf.shape[1] // phases, gf.shape[1] // phases
    xc = np.conj(xf.reshape(nf, phases, n_in))
    gr = gf.reshape(nf, phases, n_out)
    g = np.empty((nf, n_in, n_out), dtype=xf.dtype)

    def work(lo: int, hi: int) -> None:
        np.matmul(xc[lo:hi].transpose(0, 2, 1), gr[lo:hi], out=g[lo:hi])

    parallel_chunks(nf, threads, work, _MIN_FREQ_CHUNK, 4)
    ncol = nf // L
    taps = np.matmul(np.ascontiguousarray(e_lead.T), g.reshape(L, ncol * n_in * n_out))  # (k, ncol*in*out)
    q = taps.reshape(k, ncol, n_in, n_out).transpose(1, 2, 0, 3)
    return np.ascontiguousarray(q).reshape(ncol, n_in, k * n_out)


def _lead_by_products(xc: np.ndarray, gc: np.ndarray, e_lead: np.ndarray, q: np.ndarray, threads: int) -> None:
    """The lead stage for few map pairs: the products ``conj(X) * GY`` of every pair over a chunk of columns,
    then one ``(columns*in*out x L) @ (L x k)`` DFT. Per-column GEMMs of 2 x 60 by 60 x 15 spent their time in
    call overhead (a 3d_5 step planned for 16 workers: 6.3 s of kernel gradients against 0.76 s for 2)."""
    ncol, n_in, L = xc.shape
    n_out = gc.shape[2]
    k = e_lead.shape[1]
    step = max(1, _PRODUCT_CHUNK // max(1, n_in * n_out * L))  # a block may hold no maps
    q4 = q.reshape(ncol, n_in, k, n_out)

    def work(lo: int, hi: int) -> None:
        for a in range(lo, hi, step):
            b = min(hi, a + step)
            prod = xc[a:b, :, None, :] * gc[a:b].transpose(0, 2, 1)[:, None, :, :]  # (c, in, out, L)
            taps = np.matmul(prod.reshape(-1, L), e_lead).reshape(b - a, n_in, n_out, k)
            q4[a:b] = taps.transpose(0, 1, 3, 2)

    parallel_chunks(ncol, threads, work, step, 4)


def _pruned_tail(q: np.ndarray, shape: Triple, k3: Triple, dilation: Sequence[int], n_out: int) -> np.ndarray:
    """The pruned kernel gradient's stages after the lead one (see :func:`_pruned_grad_kernel`) on its result
    ``q`` ``(columns, in, k_lead * out)``."""
    Z, Y, X = shape
    n_in, cdt, lead_z = q.shape[1], q.dtype.str, Z > 1
    Xh = X // 2 + 1
    kz, ky, kx = k3
    scale = 1.0 / (Z * Y * X)
    ex = _dft_matrix(X, kx, int(dilation[2]), True, +1, cdt).T * scale  # (kx, Xh)
    ex[:, 1:(X + 1) // 2] *= 2  # the conjugate half of the spectrum, folded in
    if lead_z:  # q is (Y, Xh, in, kz, out): y stage, then x stage per y tap
        ey = _dft_matrix(Y, ky, int(dilation[1]), False, +1, cdt).T  # (ky, Y)
        r = np.matmul(ey, q.reshape(Y, Xh * n_in * kz * n_out))
        taps = np.matmul(ex, r.reshape(ky, Xh, n_in * kz * n_out)).real  # (ky, kx, in*kz*out)
        g = taps.reshape(ky, kx, n_in, kz, n_out).transpose(2, 4, 3, 0, 1)
    else:  # 2D: q is (Xh, in, ky, out)
        taps = np.matmul(ex, q.reshape(Xh, n_in * ky * n_out)).real  # (kx, in*ky*out)
        g = taps.reshape(kx, n_in, 1, ky, n_out).transpose(1, 4, 2, 3, 0)
    return np.ascontiguousarray(g, dtype=np.float32 if q.dtype == np.complex64 else np.float64)


def _fftw_grad_kernel(xf: np.ndarray, gf: np.ndarray, shape: Triple, k3: Triple,
                      dilation: Sequence[int], threads: int) -> np.ndarray:
    """ZNN's way: one full inverse FFT per (in, out) pair, then pick the dilated taps."""
    n_in, n_out = xf.shape[1], gf.shape[1]
    sp = spectrum_shape(shape)
    rdt = np.float32 if xf.dtype == np.complex64 else np.float64
    out = np.empty((n_in, n_out, *k3), dtype=rdt)
    taps = tuple(slice(0, (k - 1) * int(d) + 1, int(d)) for k, d in zip(k3, dilation))
    gmaps = np.ascontiguousarray(gf.T)  # (out, F)
    scale = 1.0 / math.prod(shape)

    def work(lo: int, hi: int) -> None:
        buf = empty_aligned((n_out, *sp), xf.dtype)
        flat = buf.reshape(n_out, math.prod(sp))
        for i in range(lo, hi):
            np.multiply(gmaps, np.conj(xf[:, i])[None, :], out=flat)
            real = irfft3(buf, shape, 1, count=False)  # grad_kernel counts them
            np.multiply(real[(slice(None), *taps)], scale, out=out[i])

    parallel_chunks(n_in, threads, work)
    return out


# ----------------------------------------------------------------------------------------------- whole layer


def _check_spec_pair(x_spec: np.ndarray, w_spec: np.ndarray, phases: int = 1) -> None:
    if w_spec.ndim != 5 or x_spec.ndim != 4 or x_spec.shape[0] != phases * w_spec.shape[0] \
            or x_spec.shape[1:] != w_spec.shape[2:]:
        maps = "in" if phases == 1 else f"{phases} * in"
        raise ShapeError(f"input spectra {x_spec.shape} do not match kernel spectra {w_spec.shape} "
                         f"(expected ({maps}, Z, Y, Xh) and (in, out, Z, Y, Xh))")


def _spectra_for(x: np.ndarray, w: np.ndarray, dilation: Triple, spectra: Spectra | None) -> Spectra:
    """Reuse ``spectra`` if they belong to this problem, else start a fresh empty record."""
    if spectra is not None and spectra.matches(x.shape[1:], w.shape[2:], dilation, x.dtype):
        return spectra
    if spectra is not None:
        raise ShapeError(f"spectra were made for input {spectra.in_spatial}, kernel {spectra.kernel_size}, "
                         f"dilation {spectra.dilation}, {spectra.dtype}; got input {x.shape[1:]}, kernel "
                         f"{w.shape[2:]}, dilation {dilation}, {x.dtype}: pass spectra=None")
    shape = fft_shape(x.shape[1:], w.shape[2:], dilation)
    return Spectra(shape, tuple(x.shape[1:]), tuple(w.shape[2:]), dilation, np.dtype(x.dtype))


def _as_dilation(dilation: Sequence[int]) -> Triple:
    d = [int(v) for v in dilation]  # length checked by check_conv_shapes
    return (d[0], d[1], d[2])


def conv_forward_fft(x: np.ndarray, w: np.ndarray, dilation: Sequence[int] = (1, 1, 1),
                     spectra: Spectra | None = None, keep: bool = True, threads: int = 1,
                     kernels_changed: bool = False) -> tuple[np.ndarray, Spectra]:
    """Valid true convolution ``(in, z, y, x) * (in, out, kz, ky, kx) -> (out, z', y', x')`` through FFTs.

    Kernel spectra found in ``spectra`` are reused (same kernels, new input), or, with ``kernels_changed``
    (the weights were updated since), recomputed into the same buffer. The returned record holds the kernel
    spectra and, with ``keep``, this input's spectra for :func:`conv_backward_fft`.
    """
    out_spatial = check_conv_shapes(x.shape, w.shape, dilation)
    x, w = _same_dtype(x, w)
    d = _as_dilation(dilation)
    rec = _spectra_for(x, w, d, spectra)
    w_spec = rec.w_spec
    if w_spec is None or kernels_changed:
        w_spec = kernel_spectra(w, d, rec.shape, threads, out=w_spec)
    x_spec = input_spectra(x, rec.shape, threads)
    y_spec = multiply_accumulate(x_spec, w_spec, threads)
    y = inverse_valid(y_spec, rec.shape, out_spatial, output_offset(w.shape[2:], d), threads)
    return y, Spectra(rec.shape, rec.in_spatial, rec.kernel_size, d, rec.dtype, x_spec if keep else None, w_spec)


def conv_backward_fft(x: np.ndarray, w: np.ndarray, grad_y: np.ndarray, dilation: Sequence[int] = (1, 1, 1),
                      spectra: Spectra | None = None, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Gradients ``(grad_x (in, z, y, x), grad_w (in, out, kz, ky, kx))`` of the valid convolution.

    Input and kernel spectra present in ``spectra`` (from :func:`conv_forward_fft` with this ``x`` and ``w``)
    are reused, not recomputed; only ``grad_y`` is transformed.
    """
    check_conv_shapes(x.shape, w.shape, dilation, grad_y.shape)
    x, w = _same_dtype(x, w)
    grad_y = grad_y.astype(x.dtype, copy=False)
    d = _as_dilation(dilation)
    rec = _spectra_for(x, w, d, spectra)
    x_spec = rec.x_spec if rec.x_spec is not None else input_spectra(x, rec.shape, threads)
    w_spec = rec.w_spec if rec.w_spec is not None else kernel_spectra(w, d, rec.shape, threads)
    gy_spec = grad_output_spectra(grad_y, rec.shape, w.shape[2:], d, threads)
    gx_spec = grad_input_spectra(gy_spec, w_spec, threads)
    grad_x = inverse_valid(gx_spec, rec.shape, x.shape[1:], (0, 0, 0), threads)
    grad_w = grad_kernel(x_spec, gy_spec, rec.shape, w.shape[2:], d, threads)
    return grad_x, grad_w


def _same_dtype(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float32 or float64 throughout (the input's dtype wins; integers become float64)."""
    dt = x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    return x.astype(dt, copy=False), w.astype(dt, copy=False)
