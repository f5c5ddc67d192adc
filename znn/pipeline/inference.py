"""Dense inference over volumes far larger than memory: tiled, seam-free, resumable.

The output volume is cut into output blocks of one patch size (the last block along an axis is shifted back to end
at the border, and writes only its own part). Each block is one dask task that

1. reads its input region with the FOV halo from the input files (lazily: zarr/h5/tif regions), mirrored at the
   volume border when ``mirror`` is on (then the output has the input's size) or valid-only otherwise (the output is
   smaller by FOV - 1), and applies the sample's preprocessing with statistics computed beforehand over the whole
   volume (so a block sees exactly what a whole-volume run sees);
2. runs the network's forward graph in-process on one thread (single-threaded kernels), taking the kernel spectra
   from a per-process :class:`~znn.pipeline.cache.SpectraCache` shared by every block (or recomputing them per block
   when the memory plan says they do not fit);
3. applies the output transform (softmax or sigmoid over channels) and writes its region into the zarr output,
   whose chunks are the output blocks (no two tasks write one chunk), then marks the block done in the manifest
   (:mod:`znn.pipeline.manifest`). Chunks are written atomically (:class:`~znn.io.atomic_store.AtomicLocalStore`:
   a temporary file renamed into place), so a worker killed mid-write never leaves a half-written chunk.

On a dask.distributed cluster, blocks lost with a dead worker (running, or finished but not yet collected) are
recomputed on the remaining workers by the scheduler; rewriting a block gives the same bytes, and its marker is
written after its chunk, so the output and the manifest stay right whatever dies when.

Blocks are a dask graph whose tasks return only small statistics, so at most one block per worker thread is in
memory: memory is bounded by the block size times the blocks in flight, never by the volume.

Output layout (``<prefix>`` is the job's ``output_prefix``)::

    <prefix>_sample<id>_output.zarr/<node>     float32 (maps, z, y, x), one array per network output node group
    <prefix>_sample<id>_output.zarr/znn-manifest/{run.json, done/<i>_<j>_<k>}
    <prefix>_sample<id>_output.h5:/<node>      with output_format = h5 (copied from the zarr at the end)
    <prefix>_sample<id>_output.tif             with output_format = tif (``..._output_<node>.tif`` for several)
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
from dask.callbacks import Callback
from dask.optimization import cull

from znn.errors import ConfigError, ShapeError, VolumeError, ZnnFileNotFoundError
from znn.network import Network
from znn.pipeline.cache import SpectraCache
from znn.pipeline.graph import forward_graph
from znn.pipeline.manifest import Manifest, digest_of, weights_digest
from znn.pipeline.plan import NetPlan, make_plan
from znn.pipeline.schedulers import single_threaded_kernels
from znn.spec import NetworkSpec, Triple

__all__ = [
    "InputFile",
    "InferenceResult",
    "BlockForward",
    "PhaseForward",
    "phase_conv_fft",
    "max_filter_values",
    "TRANSFORMS",
    "PP_TYPES",
    "mirror_indices",
    "block_grid",
    "output_shape",
    "resolve_transform",
    "apply_transform",
    "preprocess_stats",
    "infer_volume",
    "output_paths",
]

log = logging.getLogger("znn.forward")

TRANSFORMS = ("auto", "none", "softmax", "sigmoid")
PP_TYPES = ("none", "standard2D", "standard3D", "symetric_rescale")
Index = tuple[int, int, int]


# ---------------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class InputFile:
    """One input volume file (``path`` in the syntax of :func:`znn.io.volume.parse_volume_path`) and its
    preprocessing (a ``pp_types`` name of the .spec file)."""

    path: str
    pp: str = "none"


@dataclass(frozen=True)
class _Source:
    """A preprocessed input channel group: the file, its (c, z, y, x) shape, and per-z ``offset``/``scale`` such that
    the network sees ``(raw - offset[z]) * scale[z]``."""

    path: str
    shape: tuple[int, int, int, int]
    offset: np.ndarray
    scale: np.ndarray


def _as_4d(shape: Sequence[int], path: str) -> tuple[int, int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        return (1, 1, *shape)  # type: ignore[return-value]
    if len(shape) == 3:
        return (1, *shape)  # type: ignore[return-value]
    if len(shape) == 4:
        return shape  # type: ignore[return-value]
    raise VolumeError(f"{path}: a {len(shape)}D volume; inputs are 2D to 4D (channels, z, y, x)")


def preprocess_stats(path: str, pp: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-z ``(offset, scale)`` of preprocessing ``pp`` over the whole volume at ``path``, computed out of core.

    ``standard2D``: per slice zero mean, unit (population) std; ``standard3D``: the same over the whole volume;
    ``symetric_rescale``: min..max to -1..1; ``none``: identity. A constant slice/volume gets scale 1.
    """
    from znn.io.volume import open_volume

    if pp not in PP_TYPES:
        raise ConfigError(f"{path}: preprocessing {pp!r} is not known; use one of {', '.join(PP_TYPES)}")
    arr = open_volume(path)
    c, z, _, _ = _as_4d(arr.shape, path)
    if pp == "none":
        return np.zeros(z), np.ones(z)
    vol = arr.reshape((c, z, *arr.shape[-2:])).astype(np.float64)
    with dask.config.set(scheduler="threads"):
        if pp == "standard2D":
            mean, sq = dask.compute(vol.mean(axis=(0, 2, 3)), (vol * vol).mean(axis=(0, 2, 3)))
        elif pp == "standard3D":
            m, s = dask.compute(vol.mean(), (vol * vol).mean())
            mean, sq = np.full(z, m), np.full(z, s)
        else:
            lo, hi = dask.compute(vol.min(), vol.max())
            span = float(hi - lo)
            scale = 2.0 / span if span > 0 else 1.0
            # 2 (x - lo) / span - 1 = (x - (lo + span / 2)) * 2 / span
            return np.full(z, float(lo) + span / 2), np.full(z, scale)
    std = np.sqrt(np.maximum(np.asarray(sq) - np.asarray(mean) ** 2, 0.0))
    return np.asarray(mean, np.float64), np.where(std > 0, 1.0 / np.where(std > 0, std, 1.0), 1.0)


def _sources(files: Sequence[InputFile]) -> list[_Source]:
    from znn.io.volume import volume_shape_dtype

    out = []
    for f in files:
        shape, _ = volume_shape_dtype(f.path)
        offset, scale = preprocess_stats(f.path, f.pp)
        out.append(_Source(f.path, _as_4d(shape, f.path), offset, scale))
    return out


def mirror_indices(start: int, stop: int, n: int) -> np.ndarray:
    """Source indices of positions ``start..stop-1`` of an axis of length ``n`` extended by mirroring (NumPy's
    ``reflect``: the border voxel is not repeated; repeated reflection where the extension exceeds ``n``)."""
    i = np.arange(start, stop)
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    m = np.mod(i, period)
    return np.where(m >= n, period - m, m)


_OPENED: dict[str, Any] = {}
_OPENED_LOCK = threading.Lock()


def _opened(path: str) -> Any:
    """The lazily opened volume at ``path`` (one per process)."""
    from znn.io.volume import open_volume

    with _OPENED_LOCK:
        if path not in _OPENED:
            _OPENED[path] = open_volume(path)
        return _OPENED[path]


def _read_region(src: _Source, lo: Sequence[int], size: Sequence[int], mirror: bool, dtype: np.dtype) -> np.ndarray:
    """Preprocessed channels ``(c, *size)`` of ``src`` starting at volume position ``lo`` (may be negative or past
    the end when mirroring)."""
    shape3 = src.shape[1:]
    idx = [mirror_indices(a, a + s, n) if mirror else np.arange(a, a + s) for a, s, n in zip(lo, size, shape3)]
    if not mirror and any(i[0] < 0 or i[-1] >= n for i, n in zip(idx, shape3)):
        raise ShapeError(f"{src.path}: block reads outside the volume {shape3}; enable is_bd_mirror")
    box = [(int(i.min()), int(i.max()) + 1) for i in idx]
    arr = _opened(src.path)
    sl = tuple(slice(a, b) for a, b in box)
    if arr.ndim == 2:
        raw = np.asarray(arr[sl[1:]].compute(scheduler="sync"))[None, None]
    elif arr.ndim == 3:
        raw = np.asarray(arr[sl].compute(scheduler="sync"))[None]
    else:
        raw = np.asarray(arr[(slice(None), *sl)].compute(scheduler="sync"))
    z0, z1 = box[0]
    offset = src.offset[z0:z1].astype(dtype)[None, :, None, None]
    scale = src.scale[z0:z1].astype(dtype)[None, :, None, None]
    data = (raw.astype(dtype) - offset) * scale
    local = [i - a for i, (a, _) in zip(idx, box)]
    if all(len(li) == b - a and (li == np.arange(b - a)).all() for li, (a, b) in zip(local, box)):
        return np.ascontiguousarray(data)
    return np.ascontiguousarray(data[np.ix_(np.arange(data.shape[0]), *local)])


# ---------------------------------------------------------------------------------------------------- geometry
def output_shape(volume: Sequence[int], fov: Sequence[int], mirror: bool) -> Triple:
    """Output (z, y, x) of a volume: its own size when mirrored, smaller by FOV - 1 when valid-only."""
    if mirror:
        return tuple(int(v) for v in volume)  # type: ignore[return-value]
    return tuple(int(v) - int(f) + 1 for v, f in zip(volume, fov))  # type: ignore[return-value]


def block_grid(out_shape: Sequence[int], patch: Sequence[int]) -> list[tuple[Index, Triple, Triple, Triple]]:
    """``(index, origin, write_lo, write_hi)`` of every block: the block computes ``patch`` voxels from ``origin``
    and writes ``[write_lo, write_hi)``, one chunk of the ``patch`` grid (the last one along an axis is computed
    shifted back so it stays inside the volume)."""
    counts = [math.ceil(o / p) for o, p in zip(out_shape, patch)]
    blocks = []
    for index in np.ndindex(*counts):
        lo = tuple(i * p for i, p in zip(index, patch))
        hi = tuple(min(a + p, o) for a, p, o in zip(lo, patch, out_shape))
        origin = tuple(min(a, o - p) for a, p, o in zip(lo, patch, out_shape))
        blocks.append((tuple(int(i) for i in index), origin, lo, hi))
    return blocks  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------- transforms
def resolve_transform(transform: str, spec: NetworkSpec, out_type: str = "boundary", cost: str = "auto") -> str:
    """``auto``: softmax for a softmax-trained net with several output maps, sigmoid for binomial cross-entropy (or
    one map), none for square loss or when the output node already applies a logistic function."""
    if transform not in TRANSFORMS:
        raise ConfigError(f"--transform {transform!r} is not valid; use one of {', '.join(TRANSFORMS)}")
    if transform != "auto":
        return transform
    if any(spec.nodes[n].function in ("logistics", "forward_logistics") and spec.nodes[n].type == "transfer"
           for n in spec.outputs):
        return "none"
    if cost == "auto":
        cost = "softmax_loss" if out_type == "boundary" else "binomial_cross_entropy"
    if cost == "square_loss":
        return "none"
    maps = min(spec.nodes[n].size for n in spec.outputs)
    return "softmax" if cost == "softmax_loss" and maps > 1 else "sigmoid"


def apply_transform(y: np.ndarray, transform: str) -> np.ndarray:
    """Apply ``none``/``softmax``/``sigmoid`` over the map axis of ``(maps, z, y, x)``."""
    from znn.ops.loss import softmax
    from znn.ops.pointwise import sigmoid

    if transform == "softmax":
        return softmax(y, axis=0)
    if transform == "sigmoid":
        return sigmoid(y)
    return y


# ---------------------------------------------------------------------------------------------------- one block
class BlockForward:
    """One network planned at one output patch, run block after block in this process: the forward graph of a
    block runs on the calling thread; kernel spectra come from a shared cache (when enabled), else each block
    computes them when its layer is reached and drops them after."""

    def __init__(self, net: Network, outsz: Sequence[int], modes: str | Mapping[str, str] = "fft",
                 spectra_cache: bool = True, cache_bytes: int | None = None, threads: int = 1):
        self.net = net
        self.plan: NetPlan = make_plan(net.spec, outsz, modes)
        self.cache = SpectraCache(spectra_cache, cache_bytes)
        self._lock = threading.Lock()

    @property
    def input_patch(self) -> dict[str, Triple]:
        return self.plan.layout.input_patch

    def warm(self) -> None:
        """Compute every FFT conv layer's kernel spectra into the cache once (blocks that start together would
        otherwise each compute their own copy)."""
        from znn.pipeline import tasks

        if not self.cache.enabled:
            return
        with self._lock:
            for name, ep in self.plan.edges.items():
                if ep.mode != "fft" or ep.fft_shape is None or self.cache.get(name, ep.fft_shape) is not None:
                    continue
                edge = self.plan.spec.edges[name]
                kernel = self.net.kernels[name]
                spectra = [[tasks.kernel_spectra(kernel, ib, ob, ep.dilation, ep.fft_shape)
                            for ob in self.plan.blocks[edge.output]] for ib in self.plan.blocks[edge.input]]
                self.cache.put(name, ep.fft_shape, spectra)

    def forward(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from znn.pipeline import tasks

        g = forward_graph(self.plan, self.net, inputs, training=False, cache=self.cache)
        keep = dict(g.new_kspec) if self.cache.enabled else {}
        if not self.cache.enabled:
            # each output block's task makes the kernel spectra of its column itself and drops them after, so
            # at most one column of a layer's kernel spectra is alive, whatever order the scheduler picks
            for edge, rows in g.new_kspec.items():
                for j, conv_key in enumerate(g.fwd[edge]):
                    task = g.dsk[conv_key]
                    column = [g.dsk[rows[i][j]] for i in range(len(rows))]
                    g.dsk[conv_key] = (task[0], task[1], column, *task[3:])
        outputs = {n: g.act[n] for n in self.plan.spec.outputs}
        flat = [k for ks in outputs.values() for k in ks] + [k for rows in keep.values() for row in rows for k in row]
        needed, _ = cull(g.dsk, flat)
        values = dict(zip(flat, dask.get(needed, flat)))
        for edge, rows in keep.items():
            spectra = [[values[k] for k in row] for row in rows]
            self.cache.put(edge, self.plan.edges[edge].fft_shape, spectra)  # type: ignore[arg-type]
        return {n: tasks.concat_maps([values[k] for k in ks]) for n, ks in outputs.items()}


# ---------------------------------------------------------------------------------------------------- phases
# Working memory of one group of phases in a phase-decomposed FFT convolution (input and output spectra).
PHASE_GROUP_BYTES = 96 << 20
# Frequencies per product chunk: its spectra (phases x maps x chunk, complex) stay in the core's L2 cache.
_FREQ_CHUNK = 128


def max_filter_values(x: np.ndarray, size: Sequence[int], dilation: Sequence[int]) -> np.ndarray:
    """The values of :func:`znn.ops.pooling.max_filter` (no winner indices: inference needs none), one running
    maximum over views per axis."""
    y = x
    for axis in (1, 2, 3):
        w, d = int(size[axis - 1]), int(dilation[axis - 1])
        if w == 1:
            continue
        m = y.shape[axis] - (w - 1) * d

        def part(t: int, y: np.ndarray = y, axis: int = axis, d: int = d, m: int = m) -> np.ndarray:
            index = [slice(None)] * 4
            index[axis] = slice(t * d, t * d + m)
            return y[tuple(index)]

        out = np.array(part(0), copy=True)
        for t in range(1, w):
            np.maximum(out, part(t), out=out)
        y = out
    return np.ascontiguousarray(y)


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


class PhaseForward:
    """Inference-only forward pass of one block, node group by node group on the calling thread.

    Conv edges in ``fft`` mode run :func:`phase_conv_fft` with kernel spectra kept per edge (``spectra_cache``) or
    made per block; ``direct`` edges run the BLAS direct convolution; max filters keep no winner indices. Extents,
    crops and dilations come from the same plan as the graph engine's, so the result is the same network.
    """

    def __init__(self, net: Network, outsz: Sequence[int], modes: str | Mapping[str, str] = "fft",
                 spectra_cache: bool = True, cache_bytes: int | None = None, threads: int = 1):
        self.net = net
        self.plan: NetPlan = make_plan(net.spec, outsz, modes)
        self.spectra_cache = spectra_cache
        self.threads = max(1, int(threads))
        self._kspec: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    @property
    def input_patch(self) -> dict[str, Triple]:
        return self.plan.layout.input_patch

    def _shape(self, name: str) -> Triple:
        ep = self.plan.edges[name]
        return phase_shape(ep.need, self.plan.spec.edges[name].size, ep.dilation)

    def _fft_edges(self) -> list[str]:
        return [e for e in self.plan.spec.conv_edges() if self.plan.edges[e].mode == "fft"]

    def warm(self) -> None:
        """Make the kernel spectra of every FFT conv edge once (when caching)."""
        if not self.spectra_cache:
            return
        with self._lock:
            for name in self._fft_edges():
                if name not in self._kspec:
                    self._kspec[name] = phase_kernel_spectra(self.net.kernels[name], self._shape(name))

    @property
    def cache_nbytes(self) -> int:
        return sum(a.nbytes for a in self._kspec.values())

    def forward(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from znn.ops import conv as convops
        from znn.ops import pointwise, pooling
        from znn.pipeline.tasks import central

        spec, plan, net = self.plan.spec, self.plan, self.net
        self.warm()
        values: dict[str, np.ndarray] = {n: np.asarray(inputs[n], dtype=net.dtype) for n in spec.inputs}
        readers = {n: len(spec.outgoing[n]) for n in spec.nodes}
        for node in spec.order():
            group = spec.nodes[node]
            if group.type == "input":
                continue
            parts, sources = [], []
            for name in spec.incoming[node]:
                edge, ep = spec.edges[name], plan.edges[name]
                sources.append(values[edge.input])
                x = central(values[edge.input], ep.crop_lo, ep.need)
                if edge.type == "conv":
                    if ep.mode == "fft":  # reads its phases from the crop: no contiguous copy first
                        parts.append(phase_conv_fft(x, net.kernels[name], ep.dilation, self._kspec.get(name),
                                                    threads=self.threads))
                    else:
                        parts.append(convops.conv_forward_direct(np.ascontiguousarray(x), net.kernels[name],
                                                                 ep.dilation, self.threads))
                elif edge.type == "max_filter":
                    parts.append(max_filter_values(x, edge.size, ep.dilation))
                elif edge.type == "max_pool":
                    parts.append(pooling.max_pool(np.ascontiguousarray(x), edge.size)[0])
                elif edge.type == "dropout":
                    parts.append(pointwise.dropout(np.ascontiguousarray(x), edge.ratio, np.random.default_rng(0),
                                                   training=False)[0])
                elif edge.type == "crop":
                    parts.append(np.ascontiguousarray(pointwise.crop(x, edge.offset)))
                else:
                    parts.append(np.ascontiguousarray(x))
                readers[edge.input] -= 1
                if readers[edge.input] == 0 and edge.input not in spec.outputs:
                    del values[edge.input]  # free activations as soon as their last reader ran
            if any(spec.edges[e].type == "maxout" for e in spec.incoming[node]):
                y = pointwise.maxout(parts)[0]
            else:
                y = parts[0] if len(parts) == 1 else parts[0] + sum(parts[1:])
            del parts
            if group.type == "transfer":
                owned = not any(np.may_share_memory(y, source) for source in sources)  # not an input's memory
                y = _bias_and_transfer(y, net.biases[node], group.function, group.function_args, owned)
            del sources
            values[node] = y
        return {n: values[n] for n in spec.outputs}


def _bias_and_transfer(y: np.ndarray, bias: np.ndarray, function: str, args: Sequence[float],
                       in_place: bool) -> np.ndarray:
    """:func:`~znn.ops.pointwise.add_bias` then the transfer function, in ``y`` itself when ``in_place`` (the pass
    made ``y`` and nothing else reads it): two fewer volume-sized arrays per layer, for ReLU, the common case."""
    from znn.ops import pointwise

    if not in_place:
        return pointwise.transfer_forward(function, pointwise.add_bias(y, bias), args, training=False)
    y += bias.astype(y.dtype, copy=False)[:, None, None, None]
    if function == "rectify_linear":
        return np.maximum(y, y.dtype.type(0), out=y)
    return pointwise.transfer_forward(function, y, args, training=False)


EVALUATORS = {"phases": PhaseForward, "graph": BlockForward}


@dataclass
class _Context:
    """Everything a block task needs (picklable; shipped once per worker on a cluster)."""

    token: str
    net: Network
    outsz: Triple
    modes: Any
    spectra_cache: bool
    cache_bytes: int | None
    sources: dict[str, list[_Source]]
    input_lo: dict[str, Triple]  # volume position of input patch start for output origin 0
    mirror: bool
    transform: str
    store: str
    outputs: list[str]
    out_shape: Triple
    digest: str
    layout: str
    dtype: str
    evaluator: str = "phases"
    block_threads: int = 1


_ENGINES: dict[str, Any] = {}
_ENGINES_LOCK = threading.Lock()


def _engine(ctx: _Context) -> Any:
    with _ENGINES_LOCK:
        engine = _ENGINES.get(ctx.token)
        if engine is None:
            _ENGINES.clear()  # one network at a time per process: free the previous one's spectra
            engine = EVALUATORS[ctx.evaluator](ctx.net, ctx.outsz, ctx.modes, ctx.spectra_cache, ctx.cache_bytes,
                                               ctx.block_threads)
            _ENGINES[ctx.token] = engine
    engine.warm()
    return engine


_ARRAYS: dict[tuple[str, str], Any] = {}


def _out_array(store: str, node: str) -> Any:
    import zarr

    from znn.io.atomic_store import AtomicLocalStore

    key = (store, node)
    with _OPENED_LOCK:
        if key not in _ARRAYS:
            _ARRAYS[key] = zarr.open_array(AtomicLocalStore(store), path=node, mode="r+")
        return _ARRAYS[key]


def run_block(ctx: _Context, index: Index, origin: Triple, lo: Triple, hi: Triple) -> dict[str, Any]:
    """The task of one block: read, forward, transform, write its chunk, mark done. Returns small statistics."""
    started, t0 = time.time(), time.perf_counter()
    engine = _engine(ctx)
    dtype = np.dtype(ctx.dtype)
    inputs = {}
    for node, srcs in ctx.sources.items():
        patch = engine.input_patch[node]
        start = tuple(o + s for o, s in zip(origin, ctx.input_lo[node]))
        parts = [_read_region(s, start, patch, ctx.mirror, dtype) for s in srcs]
        inputs[node] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    t1 = time.perf_counter()
    outs = engine.forward(inputs)
    t2 = time.perf_counter()
    cut = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin))
    for node in ctx.outputs:
        y = apply_transform(outs[node], ctx.transform)
        region = (slice(None), *(slice(a, b) for a, b in zip(lo, hi)))
        _out_array(ctx.store, node)[region] = np.ascontiguousarray(y[(slice(None), *cut)])
    Manifest(ctx.store, ctx.digest, ctx.layout).mark_done(index)
    t3 = time.perf_counter()
    return {"index": index, "voxels": int(np.prod([b - a for a, b in zip(lo, hi)])), "read_s": t1 - t0,
            "forward_s": t2 - t1, "write_s": t3 - t2, "started": started, "finished": started + (t3 - t0),
            "pid": os.getpid()}


# ---------------------------------------------------------------------------------------------------- the run
@dataclass
class InferenceResult:
    """What :func:`infer_volume` did: where the output is and how many blocks it ran or skipped."""

    store: Path
    arrays: dict[str, str]
    out_shape: Triple
    outsz: Triple
    blocks_total: int
    blocks_skipped: int
    blocks_run: int
    seconds: float
    voxels_run: int
    transform: str
    spectra_cache: bool
    modes: Any
    stats: list[dict[str, Any]] = field(default_factory=list)

    @property
    def voxels_per_second(self) -> float:
        return self.voxels_run / self.seconds if self.seconds > 0 else 0.0


def _input_offsets(spec: NetworkSpec, mirror: bool) -> tuple[dict[str, Triple], Triple]:
    """Per input node, where its patch starts relative to the output origin, and the largest FOV.

    All inputs are centred on the same output voxel: an input with a smaller FOV than the largest is cropped
    centrally from the largest window (ZNN's rule where branches meet). Mirroring puts the FOV's centre
    ``(fov - 1) // 2`` voxels after the window's start on the output voxel."""
    layout = spec.layout((1, 1, 1))
    fovs = layout.input_fov
    big = tuple(max(f[a] for f in fovs.values()) for a in range(3))
    start = tuple(-((b - 1) // 2) if mirror else 0 for b in big)
    return ({n: tuple(s + (b - f) // 2 for s, b, f in zip(start, big, fov)) for n, fov in fovs.items()},  # type: ignore[misc]
            big)  # type: ignore[return-value]


class _Progress(Callback):  # type: ignore[misc]
    def __init__(self, report: Callable[[dict[str, Any]], None]):
        super().__init__()
        self.report = report

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:  # noqa: A002
        if isinstance(result, dict) and "voxels" in result:
            self.report(result)


def _model_settings(net: Network, sources: Mapping[str, list[_Source]], mirror: bool, transform: str,
                    dtype: str) -> dict[str, Any]:
    spec = net.spec
    structure = {
        "nodes": {n: [g.type, g.size, g.function, list(g.function_args), g.dense] for n, g in spec.nodes.items()},
        "edges": {e: [g.type, g.input, g.output, list(g.size), list(g.stride), list(g.offset), g.ratio]
                  for e, g in spec.edges.items()},
    }
    inputs = {n: [{"path": str(Path(s.path).resolve()) if "://" not in s.path else s.path, "shape": list(s.shape),
                   "offset": s.offset, "scale": s.scale} for s in srcs] for n, srcs in sources.items()}
    return {"weights": weights_digest(net.kernels, net.biases), "structure": structure, "inputs": inputs,
            "mirror": mirror, "transform": transform, "dtype": dtype}


def _prepare_store(store: Path, outputs: Mapping[str, int], out_shape: Triple, outsz: Triple, dtype: str,
                   manifest: Manifest) -> dict[str, str]:
    """Create the output arrays (chunks = output blocks) unless the store already holds them with this layout."""
    import zarr
    from zarr.storage import LocalStore

    from znn.io.atomic_store import AtomicLocalStore, clear_partial

    clear_partial(store)  # temporary files of writers killed mid-write in an earlier run
    arrays = {n: f"{store}/{n}" for n in outputs}
    fresh = not manifest.layout_matches()
    if not fresh:
        try:
            for n, maps in outputs.items():
                z = zarr.open_array(LocalStore(store), path=n, mode="r")
                if tuple(z.shape) != (maps, *out_shape) or tuple(z.chunks) != (maps, *outsz):
                    fresh = True
        except Exception:  # noqa: BLE001 - any unreadable array means: start over
            fresh = True
    if fresh:
        manifest.reset()
        root = zarr.open_group(AtomicLocalStore(store), mode="a")
        for n, maps in outputs.items():
            root.create_array(n, shape=(maps, *out_shape), chunks=(maps, *outsz), dtype=dtype, fill_value=0,
                              overwrite=True)
    return arrays


def infer_volume(net: Network, inputs: Mapping[str, Sequence[InputFile | str]], store: str | Path,
                 outsz: Sequence[int], *, mirror: bool = True, modes: str | Mapping[str, str] = "fft",
                 transform: str = "none", scheduler: Any = "threads", num_threads: int = 0,
                 spectra_cache: bool = True, cache_bytes: int | None = None,
                 progress: bool | Any = True, fresh: bool = False, evaluator: str = "phases",
                 block_threads: int = 1) -> InferenceResult:
    """Run ``net`` densely over the input volumes and write its outputs into the zarr ``store``.

    ``inputs`` maps each network input node to its files (one per channel group, in order). ``outsz`` is the output
    block (clipped to the output volume). ``transform`` is ``none``/``softmax``/``sigmoid`` (resolve ``auto`` with
    :func:`resolve_transform`). ``scheduler`` is ``threads``, ``synchronous``, ``local``, an address or a
    :class:`~znn.pipeline.schedulers.Runner`. Blocks finished earlier with the same model and settings are skipped
    (``fresh=True`` redoes everything). ``progress`` is a bool or a :class:`~znn.pipeline.progress.Progress`-like
    factory ``(total, initial) -> reporter``. ``evaluator``: ``phases`` (:class:`PhaseForward`, the fast
    inference path) or ``graph`` (:class:`BlockForward`, the training engine's forward graph). ``block_threads``
    threads work on each block (FFTs, products, BLAS), and ``threads / block_threads`` blocks run at once: more
    threads per block for networks whose blocks are too big to have one per thread in memory.
    """
    from znn.pipeline.progress import Progress
    from znn.pipeline.schedulers import Runner, make_runner

    spec = net.spec
    if transform not in TRANSFORMS[1:]:
        raise ConfigError(f"transform {transform!r} must be none, softmax or sigmoid here (resolve auto first)")
    missing = [n for n in spec.inputs if n not in inputs]
    if missing:
        raise ConfigError(f"no input volume for network input(s) {', '.join(missing)}; the network's inputs are "
                          f"{', '.join(spec.inputs)} (give input1, input2, ... in the sample's [sampleN] section)")
    files = {n: [f if isinstance(f, InputFile) else InputFile(str(f)) for f in inputs[n]] for n in spec.inputs}
    for n, fs in files.items():
        for f in fs:
            from znn.io.volume import parse_volume_path

            if not parse_volume_path(f.path).file.exists():
                raise ZnnFileNotFoundError(f"{f.path}: input volume for network input {n!r} not found")
    sources = {n: _sources(fs) for n, fs in files.items()}
    for n, srcs in sources.items():
        maps = sum(s.shape[0] for s in srcs)
        if maps != spec.nodes[n].size:
            raise ShapeError(f"network input {n!r} takes {spec.nodes[n].size} map(s) but its volume(s) "
                             f"{', '.join(s.path for s in srcs)} have {maps} channel(s)")
    shapes = {s.shape[1:] for srcs in sources.values() for s in srcs}
    if len(shapes) != 1:
        raise ShapeError(f"input volumes differ in size ({sorted(shapes)}); every input of a sample must have the "
                         "same z,y,x size (crop them, or use is_auto_crop)")
    volume = shapes.pop()
    offsets, fov = _input_offsets(spec, mirror)
    out_shape = output_shape(volume, fov, mirror)
    if min(out_shape) < 1:
        first = next(iter(sources.values()))[0].path
        raise ShapeError(f"{first}: volume {volume} is smaller than the network's field of view {fov}; with "
                         "is_bd_mirror = no the output would be empty. Set is_bd_mirror = yes, or use a larger volume")
    patch: Triple = tuple(min(int(p), o) for p, o in zip(outsz, out_shape))  # type: ignore[assignment]
    dtype = np.dtype(net.dtype).name
    settings = _model_settings(net, sources, mirror, transform, dtype)
    digest = digest_of(settings)
    outputs = {n: spec.nodes[n].size for n in spec.outputs}
    layout = digest_of({"outputs": outputs, "shape": out_shape, "patch": patch, "dtype": dtype})
    store = Path(store)
    manifest = Manifest(store, digest, layout)
    if fresh:
        manifest.reset()
    arrays = _prepare_store(store, outputs, out_shape, patch, dtype, manifest)
    manifest.begin({"out_shape": out_shape, "outsz": patch, "mirror": mirror, "transform": transform,
                    "weights": settings["weights"], "inputs": {n: [s.path for s in v] for n, v in sources.items()}})
    grid = block_grid(out_shape, patch)
    done = manifest.done_blocks()
    todo = [b for b in grid if b[0] not in done]
    skipped = len(grid) - len(todo)
    log.info("%s: %d blocks of %s, %d already done (skipped), %d to run", store, len(grid), patch, skipped, len(todo))
    if evaluator not in EVALUATORS:
        raise ConfigError(f"evaluator {evaluator!r} is not known; use {' or '.join(EVALUATORS)}")
    token = digest_of({"digest": digest, "outsz": patch, "modes": modes, "cache": spectra_cache, "ev": evaluator})
    # absolute paths: a worker on another machine (with a shared file system) may run in another directory
    ctx = _Context(token, net, patch, modes, spectra_cache, cache_bytes, _absolute(sources), offsets, mirror,
                   transform, str(store.absolute()), list(outputs), out_shape, digest, layout, dtype, evaluator,
                   max(1, block_threads))
    runner = scheduler if isinstance(scheduler, Runner) else make_runner(scheduler, num_threads)
    voxels_todo = sum(int(np.prod([b - a for a, b in zip(lo, hi)])) for _, _, lo, hi in todo)
    if callable(progress) and not isinstance(progress, bool):
        reporter = progress(len(grid), skipped)
    else:
        reporter = Progress(len(grid), "blocks", f"forward {store.name}", initial=skipped, enabled=bool(progress))
    if progress is not False and runner.distributed and runner.dashboard and not runner.started_cluster:
        print(f"dask dashboard: {runner.dashboard}", file=getattr(reporter, "stream", None) or sys.stderr, flush=True)
    stats: list[dict[str, Any]] = []
    lock = threading.Lock()

    def report(result: dict[str, Any]) -> None:
        with lock:
            stats.append(result)
        reporter.update(1, voxels=result["voxels"])

    name = "forward-block-" + token
    ctx_key = "forward-context-" + token
    dsk: dict[Any, Any] = {ctx_key: ctx}
    keys = []
    for index, origin, lo, hi in todo:
        key = (name, *index)
        dsk[key] = (run_block, ctx_key, index, origin, lo, hi)
        keys.append(key)
    t0 = time.perf_counter()
    try:
        if keys:
            _run_blocks(runner, dsk, keys, report, max(1, block_threads))
    finally:
        reporter.close()
        if not isinstance(scheduler, Runner):
            runner.close()
    seconds = time.perf_counter() - t0
    return InferenceResult(store, arrays, out_shape, patch, len(grid), skipped, len(todo), seconds, voxels_todo,
                           transform, spectra_cache, modes, stats)


def _absolute(sources: Mapping[str, list[_Source]]) -> dict[str, list[_Source]]:
    """``sources`` with the file of every volume path made absolute (URLs stay as they are)."""
    from dataclasses import replace

    from znn.io.volume import parse_volume_path

    def absolute(path: str) -> str:
        if "://" in path:
            return path
        vp = parse_volume_path(path)
        return str(replace(vp, file=vp.file.absolute()))

    return {n: [replace(s, path=absolute(s.path)) for s in srcs] for n, srcs in sources.items()}


def _run_blocks(runner: Any, dsk: dict[Any, Any], keys: list[Any], report: Callable[[dict[str, Any]], None],
                block_threads: int) -> None:
    """Run the block graph: at most one block per ``block_threads`` worker threads at a time (a block task returns
    only statistics, so nothing else accumulates)."""
    if runner.distributed:
        from distributed import as_completed

        # Each result is released once collected: the scheduler then forgets it, so a worker dying later costs
        # only its running block (recomputed on another worker), not blocks already reported.
        pending = as_completed(runner.client.get(dsk, keys, sync=False, workers=runner.only_workers))
        for future in pending:
            result = future.result()
            future.release()
            report(result)
        return
    # BLAS single-threaded for the whole run (threadpoolctl is process-wide): a block's threads are the evaluator's
    # own, splitting its transforms, products and direct-convolution tiles. OpenBLAS's threads, called from the
    # scheduler's threads, spin: n337's 32^3 blocks on two threads took 17.5 s with them against 12 s without.
    with single_threaded_kernels(), _Progress(report):
        if runner.kind == "synchronous":
            dask.get(dsk, keys)
        else:
            dask.threaded.get(dsk, keys, num_workers=max(1, runner.workers // block_threads))


# ---------------------------------------------------------------------------------------------------- outputs
def output_paths(prefix: str | Path, sample: int, fmt: str, outputs: Sequence[str]) -> dict[str, str]:
    """Where sample ``sample``'s outputs go for ``fmt`` (zarr, h5, tif): output node -> volume path."""
    base = f"{prefix}_sample{sample}_output"
    if fmt == "zarr":
        return {n: f"{base}.zarr/{n}" for n in outputs}
    if fmt == "h5":
        return {n: f"{base}.h5:/{n}" for n in outputs}
    if fmt == "tif":
        if len(outputs) == 1:
            return {outputs[0]: f"{base}.tif"}
        return {n: f"{base}_{n}.tif" for n in outputs}
    raise ConfigError(f"output_format {fmt!r} is not valid; use zarr, h5 or tif")


def export_outputs(result: InferenceResult, targets: Mapping[str, str]) -> None:
    """Copy the zarr outputs into h5 or tif files (block by block, never the whole volume at once for h5)."""
    from znn.io.volume import open_volume, parse_volume_path, write_volume

    for node, target in targets.items():
        vp = parse_volume_path(target)
        src = open_volume(result.arrays[node])
        if vp.format == "h5":
            _write_h5(vp.file, vp.key or node, src)
        else:
            write_volume(target, src, overwrite=True)


def _write_h5(path: Path, key: str, src: Any) -> None:
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "a") as f:
        if key in f:
            del f[key]
        chunks = tuple(min(c, s) for c, s in zip(src.chunksize, src.shape))
        dset = f.create_dataset(key, shape=src.shape, dtype=src.dtype, chunks=chunks)
        from znn.io.volume import iter_blocks

        for sl, block in iter_blocks(src, batch=1):
            dset[sl] = block
