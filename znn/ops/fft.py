"""FFT plumbing for the convolution kernels: padded sizes, cached pyfftw plans, wisdom, transform counters.

Everything here works on batches of 3D volumes ``(n, Z, Y, X)`` (a 2D map is ``Z == 1``) with real-to-complex
transforms over the last three axes, so a spectrum has shape ``(n, Z, Y, X // 2 + 1)``.

Plans are measured once per (direction, batch, shape, dtype, threads, alignment) with ``FFTW_MEASURE`` (or
``ZNN_FFTW_PLANNER``); the measurement lives on in FFTW's wisdom for the process, in the per-user wisdom cache
for later processes on the same machine (:mod:`znn.ops.wisdom`, loaded before the first plan) and in a file
through :func:`save_wisdom`/:func:`load_wisdom`. The pyfftw ``FFTW`` objects are cached per Python thread, because
one is rebound to new arrays before each run (``update_arrays``), which is not safe to share; a second
thread's object is built from wisdom in ~0.3 ms. The caches are bounded in bytes, since an ``FFTW`` object
keeps its last arrays alive.

The thread helpers (:func:`parallel_chunks`, :func:`parallel_map`) live in :mod:`znn.ops.parallel` and are
re-exported here for the kernels that import them with the transforms.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyfftw

from znn.errors import ShapeError
from znn.ops import wisdom
from znn.ops.parallel import blas_single_threaded, parallel_chunks, parallel_map
from znn.ops.wisdom import PLANNER_LOCK, load_wisdom, save_wisdom
from znn.types import Triple

__all__ = [
    "blas_single_threaded",
    "check_conv_shapes",
    "complex_dtype",
    "count_transforms",
    "drop_plans",
    "empty_aligned",
    "fast_len",
    "fft_shape",
    "irfft3",
    "is_compact",
    "load_wisdom",
    "parallel_chunks",
    "parallel_map",
    "reset_transform_counts",
    "rfft3",
    "save_wisdom",
    "spectrum_shape",
    "transform_counts",
]

_LOCAL = threading.local()
# Bytes of arrays that cached FFTW objects may keep alive, per thread.
PLAN_CACHE_BYTES = 256 << 20
_COUNTS_LOCK = threading.Lock()
_COUNTS: dict[str, int] = {"forward": 0, "inverse": 0}

# FFTW is fast for sizes whose only prime factors are these.
_SMOOTH_PRIMES = (2, 3, 5, 7)


def check_conv_shapes(x_shape: Sequence[int], w_shape: Sequence[int], dilation: Sequence[int],
                      grad_y_shape: Sequence[int] | None = None) -> Triple:
    """Validate a valid-convolution problem and return the output's spatial shape ``(z', y', x')``.

    ``x_shape`` is ``(in_maps, z, y, x)``, ``w_shape`` ``(in_maps, out_maps, kz, ky, kx)``, ``dilation``
    ``(dz, dy, dx)``; ``z' = z - (kz - 1) * dz`` etc. Raises :class:`znn.errors.ShapeError` naming the shapes.
    """
    x_shape, w_shape, dil = tuple(x_shape), tuple(w_shape), tuple(dilation)
    if len(x_shape) != 4:
        raise ShapeError(f"input must be (maps, z, y, x), got shape {x_shape}; add a z axis of 1 for 2D")
    if len(w_shape) != 5:
        raise ShapeError(f"kernels must be (in_maps, out_maps, kz, ky, kx), got shape {w_shape}")
    if len(dil) != 3 or any(int(d) < 1 for d in dil):
        raise ShapeError(f"dilation must be three integers >= 1 (dz, dy, dx), got {dilation}")
    if x_shape[0] != w_shape[0]:
        raise ShapeError(f"input has {x_shape[0]} maps but kernels {w_shape} expect {w_shape[0]} input maps")
    if any(k < 1 for k in w_shape[2:]):
        raise ShapeError(f"kernel sizes must be >= 1, got kernels of shape {w_shape}")
    out = tuple(n - (k - 1) * int(d) for n, k, d in zip(x_shape[1:], w_shape[2:], dil))
    if any(o < 1 for o in out):
        raise ShapeError(f"kernel {w_shape[2:]} at dilation {dil} is larger than the input {x_shape[1:]} "
                         f"(input {x_shape}, kernels {w_shape}); enlarge the input patch")
    if grad_y_shape is not None and tuple(grad_y_shape) != (w_shape[1], *out):
        raise ShapeError(f"grad_y has shape {tuple(grad_y_shape)}, expected {(w_shape[1], *out)} for input "
                         f"{x_shape} and kernels {w_shape} at dilation {dil}")
    return (out[0], out[1], out[2])


def fast_len(n: int) -> int:
    """The smallest 7-smooth integer >= ``n`` (FFTW has codelets for 2, 3, 5 and 7)."""
    if n < 1:
        raise ValueError(f"fast_len needs n >= 1, got {n}")
    m = n
    while True:
        r = m
        for p in _SMOOTH_PRIMES:
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def fft_shape(in_spatial: Sequence[int], kernel_size: Sequence[int], dilation: Sequence[int]) -> Triple:
    """Padded FFT shape for a valid convolution of a ``in_spatial`` volume with a dilated kernel.

    A circular convolution of size ``S >= n`` equals the linear one on the valid part: the wrapped-around terms
    land only in the first ``(k - 1) * d`` positions, which the valid output discards. So each axis is the
    input extent rounded up to a fast length; ``kernel_size``/``dilation`` are only checked here.
    """
    if len(in_spatial) != 3 or len(kernel_size) != 3 or len(dilation) != 3:
        raise ShapeError(f"fft_shape takes (z, y, x) triples, got {in_spatial}, {kernel_size}, {dilation}")
    out = []
    for n, k, d in zip(in_spatial, kernel_size, dilation):
        extent = (k - 1) * d + 1
        if extent > n:
            raise ShapeError(f"dilated kernel extent {extent} exceeds input extent {n} (input {tuple(in_spatial)},"
                             f" kernel {tuple(kernel_size)}, dilation {tuple(dilation)})")
        out.append(fast_len(n))
    return (out[0], out[1], out[2])


def spectrum_shape(shape: Sequence[int]) -> Triple:
    """Shape ``(Z, Y, X // 2 + 1)`` of the half spectrum of a real ``(Z, Y, X)`` volume."""
    return (int(shape[0]), int(shape[1]), int(shape[2]) // 2 + 1)


def complex_dtype(dtype: np.dtype[Any] | type) -> np.dtype[Any]:
    """complex64 for float32 input, complex128 for float64."""
    return np.dtype(np.complex64) if np.dtype(dtype) == np.float32 else np.dtype(np.complex128)


def empty_aligned(shape: Sequence[int], dtype: np.dtype[Any] | type) -> np.ndarray:
    """An uninitialised SIMD-aligned C-contiguous array (what FFTW plans are built for)."""
    arr: np.ndarray = pyfftw.empty_aligned(tuple(shape), dtype=dtype)
    return arr


# ----------------------------------------------------------------------------------------------- counters


def count_transforms(kind: str, n: int) -> None:
    """Record ``n`` single-map transforms of ``kind`` (``"forward"`` or ``"inverse"``)."""
    with _COUNTS_LOCK:
        _COUNTS[kind] = _COUNTS.get(kind, 0) + int(n)


def transform_counts() -> dict[str, int]:
    """Number of single-map forward and inverse transforms done since the last reset (for reuse tests)."""
    with _COUNTS_LOCK:
        return dict(_COUNTS)


def reset_transform_counts() -> None:
    """Set the transform counters to zero."""
    with _COUNTS_LOCK:
        for key in _COUNTS:
            _COUNTS[key] = 0




# ----------------------------------------------------------------------------------------------- plans


PLANNER_EFFORTS = ("FFTW_ESTIMATE", "FFTW_MEASURE", "FFTW_PATIENT", "FFTW_EXHAUSTIVE")


def planner_effort() -> str:
    """FFTW planner effort: ``ZNN_FFTW_PLANNER`` from the environment, else FFTW_MEASURE (plans timed once,
    then reused; FFTW_ESTIMATE plans instantly but may run several times slower)."""
    effort = os.environ.get("ZNN_FFTW_PLANNER", "FFTW_MEASURE")
    return effort if effort in PLANNER_EFFORTS else "FFTW_MEASURE"


class _PlanCache:
    """Per-thread LRU of FFTW objects, bounded in bytes: an FFTW object keeps its last arrays alive."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.plans: OrderedDict[tuple[Any, ...], tuple[pyfftw.FFTW, int]] = OrderedDict()
        self.nbytes = 0

    def get(self, key: tuple[Any, ...]) -> pyfftw.FFTW | None:
        hit = self.plans.get(key)
        if hit is None:
            return None
        self.plans.move_to_end(key)
        return hit[0]

    def put(self, key: tuple[Any, ...], plan: pyfftw.FFTW, nbytes: int) -> None:
        if nbytes > self.budget // 4:
            return  # rebuilt from wisdom each time (~0.3 ms), which is nothing next to such a transform
        self.plans[key] = (plan, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.budget:
            _, (_, freed) = self.plans.popitem(last=False)
            self.nbytes -= freed


def _plans() -> _PlanCache:
    cache = getattr(_LOCAL, "plans", None)
    if cache is None:
        cache = _PlanCache(PLAN_CACHE_BYTES)
        _LOCAL.plans = cache
    return cache


def drop_plans() -> None:
    """Forget this thread's cached FFTW objects. Each keeps the last arrays it ran on alive, so after transforming
    into views of a large array (a group of tiles' spectra) the array would outlive its use; rebuilding a plan
    from wisdom costs ~0.3 ms."""
    _LOCAL.plans = None


def _aligned(a: np.ndarray) -> bool:
    return bool(a.ctypes.data % pyfftw.simd_alignment == 0)


def is_compact(a: np.ndarray) -> bool:
    """``a`` fills its memory without gaps, in some axis order."""
    order = sorted(range(a.ndim), key=lambda i: -a.strides[i])
    step = a.itemsize
    for i in reversed(order):
        if a.shape[i] > 1 and a.strides[i] != step:
            return False
        step *= a.shape[i]
    return True


def _scratch_like(a: np.ndarray) -> np.ndarray:
    """A new aligned array with the shape and the axis order in memory of ``a`` (so with its strides when ``a``
    is compact): what FFTW measures a plan on, so the wisdom applies to ``a``."""
    order = sorted(range(a.ndim), key=lambda i: -a.strides[i])
    scratch = empty_aligned([a.shape[i] for i in order], a.dtype)
    return scratch.transpose([order.index(i) for i in range(a.ndim)])


def _plan(direction: str, src: np.ndarray, dst: np.ndarray, shape: Triple, threads: int) -> pyfftw.FFTW:
    """An FFTW object for the batch ``src`` -> ``dst`` (real ``shape`` volumes, any strides: a spectrum may be
    maps-last, as :mod:`znn.ops.phase` keeps them), bound to them.

    Cached per (direction, batch, shape, dtype, threads, alignment). A new one is planned on scratch arrays
    the first time (``FFTW_MEASURE`` runs trial transforms that would overwrite the data) and from then on
    straight from FFTW's wisdom on the caller's arrays.
    """
    aligned = _aligned(src) and _aligned(dst)
    key = (direction, src.shape[0], shape, src.dtype.str, threads, aligned, src.strides, dst.strides)
    cache = _plans()
    plan = cache.get(key)
    if plan is not None:
        plan.update_arrays(src, dst)
        return plan
    effort = planner_effort()
    wisdom.ensure_cache_loaded(effort)  # once per process: what earlier processes planned on this machine
    flags = [effort] if aligned else [effort, "FFTW_UNALIGNED"]
    if direction == "inverse":
        flags.append("FFTW_DESTROY_INPUT")  # multi-dimensional c2r cannot preserve its input anyway
    fftw_dir = "FFTW_FORWARD" if direction == "forward" else "FFTW_BACKWARD"
    with PLANNER_LOCK:
        try:
            plan = pyfftw.FFTW(src, dst, axes=(-3, -2, -1), direction=fftw_dir,
                               flags=(*flags, "FFTW_WISDOM_ONLY"), threads=threads)
        except RuntimeError:  # no wisdom yet: measure on scratch arrays, then plan from the new wisdom
            t0 = time.perf_counter()
            pyfftw.FFTW(_scratch_like(src), _scratch_like(dst),
                        axes=(-3, -2, -1), direction=fftw_dir, flags=tuple(flags), threads=threads)
            saved = src.copy()  # in case the wisdom does not apply and the planner runs trials on src
            plan = pyfftw.FFTW(src, dst, axes=(-3, -2, -1), direction=fftw_dir, flags=tuple(flags),
                               threads=threads)
            np.copyto(src, saved)
            wisdom.note_planned(time.perf_counter() - t0)
    cache.put(key, plan, src.nbytes + dst.nbytes)
    return plan


def _run(direction: str, src: np.ndarray, dst: np.ndarray, shape: Triple, threads: int) -> None:
    """Transform the batch ``src`` into ``dst`` (both C-contiguous), splitting the batch over threads."""
    batch = src.shape[0]
    if batch == 0:
        return

    def work(lo: int, hi: int) -> None:
        # one map but several threads: let FFTW split the transform itself
        _plan(direction, src[lo:hi], dst[lo:hi], shape, threads if batch < threads else 1).execute()

    if batch < threads:
        work(0, batch)
    else:
        parallel_chunks(batch, threads, work)


def rfft3(real: np.ndarray, threads: int = 1, count: bool = True, out: np.ndarray | None = None) -> np.ndarray:
    """Real-to-complex FFT over the last three axes: ``(n, Z, Y, X)`` -> ``(n, Z, Y, X // 2 + 1)``.

    ``real`` must be float32/float64 and C-contiguous (use :func:`empty_aligned` for the fastest plans).
    ``count``: add the ``n`` transforms to :func:`transform_counts`. ``out``: an array of the spectrum's shape and
    dtype to write into, C-contiguous or compact in another axis order (maps last); default: a new aligned one.
    """
    shape = (real.shape[1], real.shape[2], real.shape[3])
    if out is not None and not out.flags.c_contiguous and not is_compact(out):
        raise ValueError("rfft3 writes into a compact spectrum (C-contiguous, or maps last)")
    if out is None:
        out = empty_aligned((real.shape[0], *spectrum_shape(shape)), complex_dtype(real.dtype))
    _run("forward", np.ascontiguousarray(real), out, shape, threads)
    if count:
        count_transforms("forward", real.shape[0])
    return out


def irfft3(spec: np.ndarray, shape: Sequence[int], threads: int = 1, count: bool = True,
           out: np.ndarray | None = None) -> np.ndarray:
    """Unnormalised complex-to-real FFT: ``(n, Z, Y, X // 2 + 1)`` -> ``(n, Z, Y, X)``; DESTROYS ``spec``.

    The result is ``prod(shape)`` times the inverse DFT; callers fold the ``1 / prod(shape)`` into their crop.
    ``spec`` may be C-contiguous or a compact view in another axis order (maps last). ``out``: a C-contiguous real
    array to write into (default: a new aligned one).
    """
    shape3 = (int(shape[0]), int(shape[1]), int(shape[2]))
    dtype = np.dtype(np.float32) if spec.dtype == np.complex64 else np.dtype(np.float64)
    if not spec.flags.c_contiguous and not is_compact(spec):
        raise ValueError("irfft3 needs a compact spectrum (C-contiguous, or maps last)")
    if out is None:
        out = empty_aligned((spec.shape[0], *shape3), dtype)
    _run("inverse", spec, out, shape3, threads)
    if count:
        count_transforms("inverse", spec.shape[0])
    return out
