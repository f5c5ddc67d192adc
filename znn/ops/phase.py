"""Phase-decomposed, tiled FFT convolution: a dilated convolution as many small undilated ones.

A convolution dilated by ``d`` on a dense volume is ``d_z d_y d_x`` independent undilated convolutions, one per
phase (the voxels ``r + d q``). Each phase is cut further into overlapping tiles of one small FFT shape (overlap-
save: a tile of ``T`` inputs gives ``T - k + 1`` valid outputs), so every tile of every phase shares one set of
kernel spectra at that small shape: the spectra of a layer of 80 x 80 maps stay at tens or hundreds of megabytes
whatever the block size, and a block's memory is its activations plus one group of tiles in flight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any
from dataclasses import dataclass
from functools import lru_cache
from itertools import product

import numpy as np

from znn.ops.pointwise import output_array
from znn.types import Triple

# Working memory of one group of tiles (their input and output spectra; the real tiles live in small per-thread
# buffers). Large enough that the per-frequency products run as matrix products of many rows (the kernel spectra
# are read from memory once per group).
PHASE_GROUP_BYTES = 512 << 20
# Frequencies per product chunk: its spectra (tiles x maps x chunk, complex) stay in the core's cache.
_FREQ_CHUNK = 64
# FFTW's time per voxel of one single-map transform (forward and inverse averaged, float32, one core), per cube
# side, measured on the development machine: powers of two, 10, 12, 14, 15 and 20 run at 1.1-1.3 ns per voxel,
# other lengths two to three times slower. A tile takes one of these lengths; whole phases of other lengths cost
# _FFT_NS_OTHER.
_FFT_NS_PER_VOXEL = {8: 1.67, 10: 1.31, 12: 1.16, 14: 1.25, 15: 1.19, 16: 1.10, 18: 3.46, 20: 1.23, 24: 2.58,
                     25: 2.17, 28: 2.59, 30: 2.71, 32: 1.26, 36: 2.40, 40: 2.03, 48: 2.03, 64: 2.63}
_FFT_NS_OTHER = 3.5
_FAST_NS = 1.5  # the lengths above count as fast
_TILE_LENGTHS = tuple(sorted(_FFT_NS_PER_VOXEL))
# Seconds of one complex multiply-add of the per-frequency products of a group of tiles (one core, float32,
# strided BLAS products on the maps-last spectra: 92 GFLOP/s counted as 8 flops each, measured as above on an
# 80 x 80 map layer of 20^3 tiles).
_MAC_SECONDS = 8.0 / 92e9
# Seconds per value moved through memory: each tile's inputs gathered and valid outputs scattered, each output
# spectrum value written by the products (what makes layers of one input map cheaper direct than by FFT).
_MOVE_SECONDS = 1.0e-9
# Seconds of Python and plan dispatch per tile (its gather, two transforms and its scatter are calls, whatever
# their size; measured on the development machine at about 20-30 us): what makes many tiny tiles of a layer of
# few maps slower than a few larger ones.
_TILE_SECONDS = 25e-6
# Default bound on the kernel spectra of one layer: the spectra of every FFT layer are kept for all blocks.
SPECTRA_CAP_BYTES = 256 << 20


def phase_shape(extent: Sequence[int], kernel: Sequence[int], dilation: Sequence[int]) -> Triple:
    """FFT shape of whole phases of a dilated convolution over ``extent``: each phase is ``ceil(extent / d)``."""
    from znn.ops.fft import fast_len

    z, y, x = (fast_len(-(-int(n) // int(d))) for n, d in zip(extent, dilation))
    return (z, y, x)


def phase_kernel_spectra(w: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Undilated kernel spectra at ``shape``, frequency-major ``(F, in, out)``."""
    from znn.ops import conv_fft

    spec = conv_fft.kernel_spectra(w, (1, 1, 1), shape)
    full = np.moveaxis(spec, (0, 1), (3, 4))  # storage order (Z, Y, Xh, in, out): a view
    return np.ascontiguousarray(full).reshape(-1, w.shape[0], w.shape[1])


def _triple(values: Sequence[int]) -> Triple:
    return (int(values[0]), int(values[1]), int(values[2]))


Tile = tuple[slice, int, slice, int]  # along one axis: (input slice, its length, output slice, its length)


@dataclass(frozen=True)
class _Axis:
    """One axis of a tiled phase convolution: its tiles in bundles, one bundle per tile position holding that
    tile of every phase (residue ``r`` of the dilation). The tiles of one bundle read and write one contiguous run
    of the axis between them, so taking them together uses every value of each cache line it loads."""

    bundles: tuple[tuple[Tile, ...], ...]

    @property
    def tiles(self) -> tuple[Tile, ...]:
        return tuple(t for bundle in self.bundles for t in bundle)

    @classmethod
    def of(cls, n: int, k: int, d: int, length: int) -> _Axis:
        out = n - (k - 1) * d
        step = length - k + 1
        longest = -(-n // d) - k + 1  # valid outputs of the longest phase
        bundles = []
        for q0 in range(0, longest, step):
            found = []
            for r in range(d):
                a, b = r + d * q0, min(n, r + d * (q0 + length))
                c, e = r + d * q0, min(out, r + d * (q0 + step))
                if e > c:
                    found.append((slice(a, b, d), len(range(a, b, d)), slice(c, e, d), len(range(c, e, d))))
            bundles.append(tuple(found))
        return cls(tuple(bundles))


@dataclass(frozen=True)
class TileGeometry:
    """The tiles of a phase-decomposed convolution of ``(in, n...)`` by ``(in, out, k...)`` dilated by ``d``, each
    transformed at ``shape``."""

    n_in: int
    n_out: int
    kernel: Triple
    dilation: Triple
    extent: Triple
    shape: Triple

    @classmethod
    def of(cls, extent: Sequence[int], w_shape: Sequence[int], dilation: Sequence[int],
           tile: Sequence[int] | None = None) -> TileGeometry:
        k, d, n = _triple(w_shape[2:]), _triple(dilation), _triple(extent)
        shape = phase_shape(n, k, d) if tile is None else _triple(tile)
        if any(t < kk for t, kk in zip(shape, k)):
            raise ValueError(f"tile {shape} is smaller than the kernel {k}")
        return cls(int(w_shape[0]), int(w_shape[1]), k, d, n, shape)

    @property
    def out(self) -> Triple:
        return _triple([a - (b - 1) * c for a, b, c in zip(self.extent, self.kernel, self.dilation)])

    @property
    def freq(self) -> int:
        return self.shape[0] * self.shape[1] * (self.shape[2] // 2 + 1)

    def axes(self) -> list[_Axis]:
        return [_Axis.of(n, k, d, t) for n, k, d, t in zip(self.extent, self.kernel, self.dilation, self.shape)]

    def count(self) -> int:
        """Tiles over all phases (as many as :meth:`axes` lists, counted without listing them)."""
        total = 1
        for n, k, d, t in zip(self.extent, self.kernel, self.dilation, self.shape):
            out, step = n - (k - 1) * d, t - k + 1
            # phase r has len(range(r, out, d)) valid outputs, cut into tiles of ``step``
            total *= sum(-(-len(range(r, out, d)) // step) for r in range(min(d, out)))
        return total

    def item_bytes(self, itemsize: int) -> int:
        """Working bytes of one tile in a group: its input and output spectra."""
        return (self.n_in + self.n_out) * self.freq * 2 * itemsize

    def thread_bytes(self, itemsize: int) -> int:
        """Working bytes of each thread: the real buffers of one bundle of tiles' inputs and outputs (the tiles of
        every x phase at one position)."""
        return self.dilation[2] * (self.n_in + self.n_out) * math.prod(self.shape) * itemsize

    def spectra_bytes(self, itemsize: int) -> int:
        """Bytes of the kernel spectra at the tile shape."""
        return self.n_in * self.n_out * self.freq * 2 * itemsize

    def group(self, itemsize: int, group_bytes: int = PHASE_GROUP_BYTES) -> int:
        """Tiles transformed and multiplied together."""
        return max(1, min(self.count(), group_bytes // max(1, self.item_bytes(itemsize))))

    def seconds(self, cached: bool = True) -> float:
        """Modelled seconds on one core: transforms of every tile's inputs and outputs, the per-frequency
        products and (without the cache) making the kernel spectra."""
        vox = math.prod(self.shape)
        fft = vox * _fft_ns_per_voxel(self.shape) * 1e-9
        valid = math.prod(t - k + 1 for t, k in zip(self.shape, self.kernel))
        moved = self.n_in * vox + self.n_out * (valid + self.freq)
        per_tile = ((self.n_in + self.n_out) * fft + self.n_in * self.n_out * self.freq * _MAC_SECONDS
                    + moved * _MOVE_SECONDS + _TILE_SECONDS)
        seconds = self.count() * per_tile
        if not cached:
            seconds += self.n_in * self.n_out * fft
        return seconds


def _fft_ns_per_voxel(shape: Triple) -> float:
    """Modelled FFTW time per voxel of one transform of ``shape``: that of its slowest side longer than 1."""
    sides = [n for n in shape if n > 1]
    return max((_FFT_NS_PER_VOXEL.get(n, _FFT_NS_OTHER) for n in sides), default=_FFT_NS_PER_VOXEL[8])


def choose_tile(extent: Sequence[int], w_shape: Sequence[int], dilation: Sequence[int],
                spectra_cap: int = SPECTRA_CAP_BYTES, itemsize: int = 4) -> Triple:
    """The tile shape with the least modelled time whose kernel spectra fit ``spectra_cap`` bytes (the whole phase
    when that is cheapest and fits; the smallest tile that holds the kernel when nothing fits). Tiles are cubes
    clipped to the next fast length above the whole phase, so a short axis (a 2D network's z) keeps its length."""
    return _choose_tile(_triple(extent), tuple(int(v) for v in w_shape), _triple(dilation), int(spectra_cap),
                        int(itemsize))


@lru_cache(maxsize=4096)
def _choose_tile(extent: Triple, w_shape: tuple[int, ...], dilation: Triple, spectra_cap: int,
                 itemsize: int) -> Triple:
    k = _triple(w_shape[2:])
    whole = phase_shape(extent, k, dilation)
    # a tile may be longer than its phase (zero-padded) up to the next length FFTW is fast at: a phase of 18
    # runs faster in one tile of 20 than in one of 18
    longest = [w if w == 1 else min((t for t in _TILE_LENGTHS if t >= w and _FFT_NS_PER_VOXEL[t] <= _FAST_NS),
                                    default=w) for w in whole]
    shapes = {whole} | {_triple([max(kk, min(t, w)) for kk, w in zip(k, longest)]) for t in _TILE_LENGTHS}
    best: tuple[float, Triple] | None = None
    smallest: tuple[int, Triple] | None = None
    for shape in sorted(shapes):
        geometry = TileGeometry.of(extent, w_shape, dilation, shape)
        size = geometry.spectra_bytes(itemsize)
        if smallest is None or size < smallest[0]:
            smallest = (size, geometry.shape)
        if size > spectra_cap:
            continue
        seconds = geometry.seconds()
        if best is None or seconds < best[0]:
            best = (seconds, geometry.shape)
    if best is not None:
        return best[1]
    assert smallest is not None
    return smallest[1]


def phase_conv_fft(x: np.ndarray, w: np.ndarray, dilation: Sequence[int], wf: np.ndarray | None = None,
                   group_bytes: int = PHASE_GROUP_BYTES, threads: int = 1,
                   tile: Sequence[int] | None = None, out: np.ndarray | None = None,
                   spectra: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Valid true convolution ``(in, z, y, x) * (in, out, k...)`` dilated by ``dilation``, through FFTs of tiles of
    its phases.

    ``tile``: the FFT shape of each tile (None: each whole phase is one tile). ``wf`` are
    :func:`phase_kernel_spectra` at that shape (computed here if not given). Per frequency the sum over input maps
    of a group of tiles is one matrix product ``(tiles x in) @ (in x out)``. ``threads`` split the transforms, the
    products and the copies. ``x`` may be any view (a crop of a larger map): each tile is read from it straight
    into the FFT buffer, and each tile's valid output written straight into its interleaved place in the result
    (``out`` if given: see :func:`~znn.ops.pointwise.output_array`). ``spectra``: the groups' input and output
    spectra to work in (:func:`group_spectra`; made here if not given).
    """
    from znn.ops.fft import complex_dtype

    geometry = TileGeometry.of(x.shape[1:], w.shape, dilation, tile)
    if wf is None:
        wf = phase_kernel_spectra(w, geometry.shape)
    if wf.shape != (geometry.freq, geometry.n_in, geometry.n_out):
        raise ValueError(f"kernel spectra {wf.shape} do not match tiles {geometry.shape} of kernels {w.shape}")
    dtype = np.dtype(np.float32) if x.dtype == np.float32 else np.dtype(np.float64)
    out = output_array(out, (geometry.n_out, *geometry.out), dtype, x)
    z_axis, y_axis, x_axis = geometry.axes()
    items = list(product(z_axis.tiles, y_axis.tiles, x_axis.bundles))
    per_group = _per_group(geometry, dtype.itemsize, group_bytes)
    # the group spectra are made once for all groups: a fresh pair per group would cost the kernel's page
    # faults on every group (about half a second per gigabyte on the development machine)
    if spectra is None:
        spectra = group_spectra(geometry, dtype, group_bytes)
    slots = _slots(geometry, dtype.itemsize, group_bytes)
    if any(a.shape[0] < slots or a.shape[1:] != (geometry.freq, n) or a.dtype != complex_dtype(dtype)
           for a, n in zip(spectra, (geometry.n_in, geometry.n_out))):
        raise ValueError(f"group spectra {[a.shape for a in spectra]} do not hold {slots} tiles of {geometry}")
    for g0 in range(0, len(items), per_group):
        _tile_group(x, wf, items[g0:g0 + per_group], geometry, out, threads, spectra)
    return out


def group_spectra(geometry: TileGeometry, dtype: np.dtype[Any],
                  group_bytes: int = PHASE_GROUP_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """The input and output spectra ``(slots, freq, maps)`` one group of :func:`phase_conv_fft`'s tiles is
    transformed into (``dtype``: of the real data)."""
    from znn.ops.fft import complex_dtype, empty_aligned

    slots = _slots(geometry, dtype.itemsize, group_bytes)
    return (empty_aligned((slots, geometry.freq, geometry.n_in), complex_dtype(dtype)),
            empty_aligned((slots, geometry.freq, geometry.n_out), complex_dtype(dtype)))


def _per_group(geometry: TileGeometry, itemsize: int, group_bytes: int) -> int:
    """Items (a z tile, a y tile, a bundle of x tiles) of :func:`phase_conv_fft` transformed together."""
    return max(1, geometry.group(itemsize, group_bytes) // geometry.dilation[2])


def _slots(geometry: TileGeometry, itemsize: int, group_bytes: int) -> int:
    """Tile spectra of the largest group."""
    z_axis, y_axis, x_axis = geometry.axes()
    items = len(z_axis.tiles) * len(y_axis.tiles) * len(x_axis.bundles)
    return min(_per_group(geometry, itemsize, group_bytes), items) * geometry.dilation[2]


Item = tuple[Tile, Tile, tuple[Tile, ...]]  # a z tile, a y tile and a bundle of x tiles


def _tile_group(x: np.ndarray, wf: np.ndarray, items: Sequence[Item], g: TileGeometry, out: np.ndarray,
                threads: int, spectra: tuple[np.ndarray, np.ndarray]) -> None:
    """Convolve the tiles ``items`` of ``x`` and write each one's valid output into its place in ``out``.

    Each thread transforms whole bundles through its own small real buffers (the FFTW plan of one tile's maps is
    made once and reused for every tile), so only the group's spectra are large. Gathers and scatters go map by
    map through the whole bundle, so the few hundred kilobytes of one map's run stay in cache while every phase
    takes its values (phase by phase over all maps, each cache line would be loaded once per phase)."""
    from znn.ops.fft import drop_plans, empty_aligned, irfft3, parallel_chunks, rfft3, spectrum_shape

    dtype, shape, n_in, n_out, freq = out.dtype, g.shape, g.n_in, g.n_out, g.freq
    half = spectrum_shape(shape)
    first = [0]
    for _, _, bundle in items:  # the first spectrum slot of each item's bundle
        first.append(first[-1] + len(bundle))
    count = first[-1]
    spec_in, spec_out = spectra[0][:count], spectra[1][:count]
    phases = g.dilation[2]

    def transform_in(lo: int, hi: int) -> None:
        real = empty_aligned((phases, n_in, *shape), dtype)
        held: list[tuple[int, int, int] | None] = [None] * phases  # what each buffer's last tile filled
        for j in range(lo, hi):
            (sz, lz, _, _), (sy, ly, _, _), bundle = items[j]
            for r, (_, lx, _, _) in enumerate(bundle):
                if (lz, ly, lx) != shape and held[r] != (lz, ly, lx):
                    real[r].fill(0)  # zero padding; a tile of the same lengths as the last one keeps it
                held[r] = (lz, ly, lx)
            _gather(x, sz, lz, sy, ly, bundle, real)
            for r in range(len(bundle)):
                rfft3(real[r], 1, out=_maps_first(spec_in[first[j] + r], half))
        drop_plans()  # the plan holds a view of spec_in: let the group's spectra go when the group is done

    def products(lo: int, hi: int) -> None:
        # per frequency one (tiles x in) @ (in x out) product, straight on the maps-last spectra: the rows of one
        # frequency are one tile's maps apart, which BLAS reads with a leading dimension, no copies
        if n_in == 1:  # an outer product per frequency: broadcast, no matrix products of inner size 1
            np.multiply(spec_in[:, lo:hi, :], wf[lo:hi, 0, :][None], out=spec_out[:, lo:hi, :])
            return
        for a in range(lo, hi, _FREQ_CHUNK):
            b = min(hi, a + _FREQ_CHUNK)
            np.matmul(spec_in[:, a:b].transpose(1, 0, 2), wf[a:b], out=spec_out[:, a:b].transpose(1, 0, 2))

    scale = dtype.type(1.0 / math.prod(shape))  # FFTW's inverse is unnormalised

    def transform_out(lo: int, hi: int) -> None:
        real = empty_aligned((phases, n_out, *shape), dtype)
        for j in range(lo, hi):
            (_, _, oz, mz), (_, _, oy, my), bundle = items[j]
            for r in range(len(bundle)):
                irfft3(_maps_first(spec_out[first[j] + r], half), shape, 1, out=real[r])
            _scatter(real, oz, mz, oy, my, bundle, g.kernel, scale, out)
        drop_plans()

    parallel_chunks(len(items), threads, transform_in)
    parallel_chunks(freq, threads, products, _FREQ_CHUNK)
    parallel_chunks(len(items), threads, transform_out)


def _maps_first(spectrum: np.ndarray, half: Triple) -> np.ndarray:
    """A tile's spectra kept maps-last ``(freq, maps)`` as the ``(maps, Z, Y, Xh)`` view the transforms take."""
    return spectrum.reshape(*half, spectrum.shape[-1]).transpose(3, 0, 1, 2)


def _gather(x: np.ndarray, sz: slice, lz: int, sy: slice, ly: int, bundle: Sequence[Tile],
            real: np.ndarray) -> None:
    """Copy each x tile of ``bundle`` (rows ``sz``, ``sy``: ``lz`` and ``ly`` of them) of every map of ``x`` into
    ``real[r]``, map by map."""
    if len(bundle) == 1:
        sx, lx, _, _ = bundle[0]
        real[0, :, :lz, :ly, :lx] = x[:, sz, sy, sx]
        return
    run = _run([(sx, lx) for sx, lx, _, _ in bundle])
    for c in range(x.shape[0]):
        rows = x[c, sz, sy]
        if run is not None:  # one contiguous run of every phase: one copy splits it into the phases
            start, length = run
            split = rows[:, :, start:start + len(bundle) * length].reshape(lz, ly, length, len(bundle))
            real[:len(bundle), c, :lz, :ly, :length] = split.transpose(3, 0, 1, 2)
            continue
        for r, (sx, lx, _, _) in enumerate(bundle):
            real[r, c, :lz, :ly, :lx] = rows[:, :, sx]


def _scatter(real: np.ndarray, oz: slice, mz: int, oy: slice, my: int, bundle: Sequence[Tile], kernel: Triple,
             scale: np.floating, out: np.ndarray) -> None:
    """Write the valid part of each tile ``real[r]`` of ``bundle``, scaled, into its interleaved place in
    ``out``, map by map."""
    z0, y0, x0 = (k - 1 for k in kernel)  # the valid part of a circular convolution
    valid = real[:, :, z0:z0 + mz, y0:y0 + my]
    if len(bundle) == 1:
        _, _, ox, mx = bundle[0]
        np.multiply(valid[0, :, :, :, x0:x0 + mx], scale, out=out[:, oz, oy, ox])
        return
    run = _run([(ox, mx) for _, _, ox, mx in bundle])
    if run is not None:  # interleave the phases in a small contiguous buffer, then copy whole rows
        start, length = run
        woven = np.empty((mz, my, length, len(bundle)), dtype=out.dtype)
    for c in range(out.shape[0]):
        rows = out[c, oz, oy]
        if run is not None:
            np.multiply(valid[:len(bundle), c, :, :, x0:x0 + length].transpose(1, 2, 3, 0), scale, out=woven)
            rows[:, :, start:start + len(bundle) * length] = woven.reshape(mz, my, -1)
            continue
        for r, (_, _, ox, mx) in enumerate(bundle):
            np.multiply(valid[r, c, :, :, x0:x0 + mx], scale, out=rows[:, :, ox])


def _run(runs: Sequence[tuple[slice, int]]) -> tuple[int, int] | None:
    """``(start, length)`` when the tiles ``runs`` (slice, length) of a bundle are one of every phase, all of one
    length and starting at consecutive indices, so together they are one contiguous run of the axis with the
    phases interleaved; else None."""
    starts = [int(sl.start) for sl, _ in runs]
    lengths = {length for _, length in runs}
    if len(runs) != runs[0][0].step or len(lengths) != 1 or starts != list(range(starts[0], starts[0] + len(runs))):
        return None
    return starts[0], lengths.pop()
