"""Max filtering (dense, dilated, stride 1) and non-overlapping max pooling, with argmax-based backward passes.

Both forwards return ``(y, argmax)`` where ``argmax`` holds, for every output voxel, the flat index (into the
whole ``(maps, z, y, x)`` input, C order) of the input voxel that won. The backward passes scatter-add the
output gradient to those voxels, which is exactly the subgradient ZNN uses (``max_pooling_edge.hpp``).

Ties: the winner is the first tap of the window in (z, y, x) lexicographic order, i.e. the one with the smallest
z offset, then y, then x. Both kernels keep the input dtype.

Training's max filter keeps no indices: its forward is :func:`max_filter_values` and :func:`max_filter_gradient`
finds each window's winner again from the input and the output (the same winner as ``max_filter``'s argmax, at a
tenth of the forward's cost and without an index array the size of the output).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from znn.errors import ShapeError
from znn.ops.parallel import parallel_chunks
from znn.ops.pointwise import as_triple, check_volume, output_array
from znn.types import Triple

# Bytes of one slab of :func:`max_filter_values`'s output: its running maxima stay in a core's cache.
MAX_FILTER_SLAB_BYTES = 256 << 10
# Bytes of input per slab of :func:`max_filter_gradient`, whose slabs take several whole maps where they fit: its
# passes are many NumPy calls on a slab, and fewer, larger ones cost less (interleaved training steps at 2 threads,
# 1 MiB against 256 KiB: N4_relu 1x100x100 0.95 of the step, VD2D3D 4x40x40 0.98; 4 MiB was slower on one core).
GRADIENT_SLAB_BYTES = 1 << 20

__all__ = ["max_filter", "max_filter_backward", "max_filter_gradient", "max_filter_values", "max_pool",
           "max_pool_backward"]

Array = NDArray[Any]
IndexArray = NDArray[np.integer]  # flat indices of the winning inputs (argmax)


def _index_dtype(n: int) -> type[np.integer]:
    # int32 halves the memory of the argmax array whenever the input is small enough
    return np.int32 if n < 2**31 else np.int64


def max_filter(
    x: Array, size: Sequence[int] | int, dilation: Sequence[int] | int = (1, 1, 1)
) -> tuple[Array, IndexArray]:
    """Sliding-window max at stride 1 over ``size`` taps spaced ``dilation`` apart (valid mode).

    ``x`` is ``(m, Z, Y, X)``; ``y`` and ``argmax`` are ``(m, Z-(sz-1)dz, Y-(sy-1)dy, X-(sx-1)dx)``.
    The filter is separable: a 1D running max along x, then y, then z, each carrying the winner's flat index.
    """
    check_volume(x)
    size_ = as_triple(size, "max_filter size", 1)
    dil = as_triple(dilation, "max_filter dilation", 1)
    out = tuple(n - (s - 1) * d for n, s, d in zip(x.shape[1:], size_, dil))
    if min(out) < 1:
        raise ShapeError(
            f"max_filter window {size_} with dilation {dil} spans {tuple((s - 1) * d + 1 for s, d in zip(size_, dil))}"
            f" voxels, more than input shape {x.shape}; use a larger input patch"
        )
    vals: Array = x
    idx: IndexArray = np.arange(x.size, dtype=_index_dtype(x.size)).reshape(x.shape)
    # x first: the later (z) pass decides between rows already reduced, which yields (z, y, x) tie order
    for axis in (3, 2, 1):
        vals, idx = _running_max(vals, idx, axis, size_[axis - 1], dil[axis - 1])
    return np.ascontiguousarray(vals), np.ascontiguousarray(idx)


def _running_max(vals: Array, idx: IndexArray, axis: int, size: int, dilation: int) -> tuple[Array, IndexArray]:
    """1D valid running max along ``axis`` by doubling: O(log size) whole-array passes instead of O(size).

    After the loop each position holds the max over ``p`` taps; the final step merges two windows of ``p`` taps
    offset by ``size - p`` taps, which overlap and cover exactly ``size`` taps.
    """
    if size == 1:
        return vals, idx
    span = 1
    while 2 * span <= size:
        vals, idx = _merge(vals, idx, axis, span * dilation)
        span *= 2
    if span < size:
        vals, idx = _merge(vals, idx, axis, (size - span) * dilation)
    return vals, idx


def _merge(vals: Array, idx: IndexArray, axis: int, shift: int) -> tuple[Array, IndexArray]:
    """Combine the window at each position with the window ``shift`` voxels later; the earlier wins ties."""
    n = vals.shape[axis] - shift
    left = [slice(None)] * vals.ndim
    right = [slice(None)] * vals.ndim
    left[axis] = slice(0, n)
    right[axis] = slice(shift, shift + n)
    lv, rv = vals[tuple(left)], vals[tuple(right)]
    # strict '>' keeps the earlier window on ties, which is what makes the tie rule 'first in window order'
    better = rv > lv
    return np.where(better, rv, lv), np.where(better, idx[tuple(right)], idx[tuple(left)])


def max_filter_backward(grad_y: Array, argmax: IndexArray, in_shape: Sequence[int]) -> Array:
    """Scatter-add ``grad_y`` to the winning input voxels; returns an array of ``in_shape`` and grad's dtype.

    Overlapping windows can share a winner, so contributions are summed (``np.bincount``).
    """
    if argmax.shape != grad_y.shape:
        raise ShapeError(f"argmax shape {argmax.shape} does not match gradient shape {grad_y.shape}")
    total = int(np.prod(in_shape))
    summed = np.bincount(argmax.ravel(), weights=grad_y.ravel(), minlength=total)
    return summed.astype(grad_y.dtype, copy=False).reshape(tuple(in_shape))


def max_filter_gradient(grad_y: Array, x: Array, y: Array, size: Sequence[int], dilation: Sequence[int]) -> Array:
    """The gradient wrt ``x`` of ``y = max_filter_values(x, size, dilation)``: each output voxel's gradient goes
    to the first tap of its window, in (z, y, x) order, whose input equals the output (the voxel
    :func:`max_filter`'s argmax names); where the window holds a NaN (``y`` is NaN there) to its first NaN.
    Overlapping windows that share a winner add up. ``x`` may be a view; the result is a new array of its shape
    and ``grad_y``'s dtype.

    Separable, as :func:`max_filter`: slab by slab (planes of one map, or several whole maps), the running maxima
    along x and then y are taken again, and the gradient goes back through the z, y and x passes in turn, each
    routing a voxel's gradient to the first of its window's taps that equals it. That is ``wz + wy + wx`` taps'
    passes, not ``wz * wy * wx``, and no index array the size of the output is made or kept."""
    if grad_y.shape != y.shape:
        raise ShapeError(f"max filter output shape {y.shape} does not match gradient shape {grad_y.shape}")
    size, dilation = as_triple(size, "size", 1), as_triple(dilation, "dilation", 1)
    grad_x = np.zeros(x.shape, dtype=grad_y.dtype)
    out_shape = y.shape[1:]
    halo = (size[0] - 1) * dilation[0]
    plane = max(1, x.shape[2] * x.shape[3] * x.itemsize)
    depth = max(1, min(out_shape[0], GRADIENT_SLAB_BYTES // plane))
    # where a map's planes fit one slab, a slab holds several maps: fewer, larger NumPy calls (every pass holds the
    # GIL between its calls, which another worker of a threaded step then waits for)
    group = max(1, GRADIENT_SLAB_BYTES // (plane * (out_shape[0] + halo))) if depth == out_shape[0] else 1
    route = _Router(nan=bool(np.isnan(y).any()), finite=bool(np.isfinite(grad_y).all()))
    for c0 in range(0, y.shape[0], group):
        c = slice(c0, min(y.shape[0], c0 + group))
        for z0 in range(0, out_shape[0], depth):
            z1 = min(out_shape[0], z0 + depth)
            xs = x[c, z0:z1 + halo]
            along_x = _running_max_values(xs, 3, size[2], dilation[2])
            along_xy = _running_max_values(along_x, 2, size[1], dilation[1])
            g = route(grad_y[c, z0:z1], along_xy, y[c, z0:z1], 1, size[0], dilation[0])
            g = route(g, along_x, along_xy, 2, size[1], dilation[1])
            route(g, xs, along_x, 3, size[2], dilation[2], out=grad_x[c, z0:z1 + halo])
    return grad_x


def _running_max_values(a: Array, axis: int, size: int, dilation: int) -> Array:
    n = a.shape[axis] - (size - 1) * dilation
    return a if size == 1 else _max_of([_along(a, axis, t * dilation, n) for t in range(size)])


def _along(a: Array, axis: int, start: int, n: int) -> Array:
    index = [slice(None)] * a.ndim
    index[axis] = slice(start, start + n)
    return a[tuple(index)]


class _Router:
    """One separable pass of the max filter's backward: the gradient of ``b``, the running maximum of ``a``
    along one axis, routed to ``a``."""

    def __init__(self, nan: bool, finite: bool):
        self.nan, self.finite = nan, finite

    def __call__(self, g: Array, a: Array, b: Array, axis: int, size: int, dilation: int,
                 out: Array | None = None) -> Array:
        """``out`` (a new zero array of ``a``'s shape if None) plus the gradient wrt ``a``."""
        if size == 1:
            if out is None:
                return g
            out += g
            return out
        if out is None:
            out = np.zeros(a.shape, dtype=g.dtype)
        n = b.shape[axis]
        won = np.empty(b.shape, dtype=bool)
        part = np.empty(b.shape, dtype=g.dtype)
        if size == 2 and self.finite and not self.nan:  # the second tap wins what the first does not: g - part
            np.equal(_along(a, axis, 0, n), b, out=won)
            np.multiply(g, won, out=part)
            first = _along(out, axis, 0, n)
            first += part
            np.subtract(g, part, out=part)  # exact: g - g and g - 0
            second = _along(out, axis, dilation, n)
            second += part
            return out
        claimed = np.zeros(b.shape, dtype=bool)
        for t in range(size):
            tap = _along(a, axis, t * dilation, n)
            if t == size - 1:  # b is one of its taps' values exactly: what no earlier tap claimed is the last's
                np.logical_not(claimed, out=won)
            else:
                np.equal(tap, b, out=won)
                if self.nan:  # NaN equals nothing: a NaN maximum is won by the window's first NaN
                    won |= np.isnan(tap) & np.isnan(b)
                if t:
                    np.greater(won, claimed, out=won)  # won and not claimed by an earlier tap
                claimed |= won
            if self.finite:
                np.multiply(g, won, out=part)  # 2x faster than a masked copy, but 0 * inf would be NaN
            else:
                part.fill(0)
                np.copyto(part, g, where=won)
            target = _along(out, axis, t * dilation, n)
            target += part
        return out


def max_pool(x: Array, size: Sequence[int] | int) -> tuple[Array, IndexArray]:
    """Non-overlapping max pooling: ``(m, Z, Y, X) -> (m, Z/sz, Y/sy, X/sx)``; each extent must divide evenly."""
    check_volume(x)
    sz, sy, sx = as_triple(size, "max_pool size", 1)
    m, nz, ny, nx = x.shape
    if nz % sz or ny % sy or nx % sx:
        raise ShapeError(
            f"max_pool size {(sz, sy, sx)} does not divide input shape {x.shape[1:]} (of {x.shape}); "
            "choose a patch whose extent is a multiple of the pool size"
        )
    oz, oy, ox = nz // sz, ny // sy, nx // sx
    taps = list(itertools.product(range(sz), range(sy), range(sx)))  # (z, y, x) order: the tie order
    views = [x[:, dz::sz, dy::sy, dx::sx] for dz, dy, dx in taps]
    y, tap = _pool_winners(views)
    if np.isnan(y).any():  # NaN in a window: its output is NaN, and the first NaN of the window won
        blocks = x.reshape(m, oz, sz, oy, sy, ox, sx).transpose(0, 1, 3, 5, 2, 4, 6).reshape(m, oz, oy, ox, -1)
        tap = blocks.argmax(axis=-1)  # argmax takes the first NaN as the maximum
    return y, _pool_flat_index(tap, x.shape, (sz, sy, sx))


def _pool_winners(views: list[Array]) -> tuple[Array, NDArray[np.integer]]:
    """The maximum over one strided view per tap and the tap that won, the first among equal values. A few
    passes over output-sized arrays (an argmax over a transposed copy of the input was ~8x slower): the values
    by ``maximum``, the taps by a maximum of marks (taps come in increasing order, so a win sets the largest tap
    so far), 3x faster than masked copies."""
    y = views[0].copy()
    tap = np.zeros(y.shape, dtype=np.uint8 if len(views) < 256 else np.int32)
    won = np.empty(y.shape, dtype=bool)
    marked = np.empty_like(tap)
    for t, v in enumerate(views[1:], start=1):
        np.greater(v, y, out=won)  # strict: among equal values the first tap stays the winner
        np.maximum(y, v, out=y)
        np.multiply(won, t, out=marked, dtype=marked.dtype)
        np.maximum(tap, marked, out=tap)
    return y, tap


def _pool_flat_index(tap: IndexArray, in_shape: tuple[int, ...], size: Triple) -> IndexArray:
    """Turn the winning tap number within each window into a flat index into the input: the flat index of the
    window's first voxel plus the tap's offset from it."""
    sz, sy, sx = size
    m, oz, oy, ox = tap.shape
    _, nz, ny, nx = in_shape
    dt = _index_dtype(int(np.prod(in_shape)))
    offsets = np.array([(dz * ny + dy) * nx + dx for dz in range(sz) for dy in range(sy) for dx in range(sx)],
                       dtype=dt)
    corner = (((np.arange(m, dtype=dt)[:, None, None, None] * nz + np.arange(oz, dtype=dt)[:, None, None] * sz)
               * ny + np.arange(oy, dtype=dt)[:, None] * sy) * nx + np.arange(ox, dtype=dt) * sx)
    index: IndexArray = offsets[tap]
    index += corner
    return index


def max_pool_backward(grad_y: Array, argmax: IndexArray, in_shape: Sequence[int]) -> Array:
    """Route ``grad_y`` to the winning input voxels (zero elsewhere); windows do not overlap, so no summing."""
    if argmax.shape != grad_y.shape:
        raise ShapeError(f"argmax shape {argmax.shape} does not match gradient shape {grad_y.shape}")
    grad_x = np.zeros(tuple(in_shape), dtype=grad_y.dtype)
    grad_x.ravel()[argmax.ravel()] = grad_y.ravel()
    return grad_x


def max_filter_values(x: np.ndarray, size: Sequence[int], dilation: Sequence[int], threads: int = 1,
                      out: np.ndarray | None = None) -> np.ndarray:
    """The values of :func:`znn.ops.pooling.max_filter` (no winner indices: inference needs none), straight into
    the result.

    The output is cut into slabs of a few z planes of one map; each slab takes its running maxima over z, then y,
    then x while they are in the core's cache, so the pass reads the input once and writes the output once (not
    three volume-sized passes through memory), and ``threads`` take slabs side by side. ``x`` may be any view;
    ``out``: see :func:`~znn.ops.pointwise.output_array` (a 1x1x1 window with no ``out`` returns ``x`` itself,
    made contiguous)."""
    if all(int(w) == 1 for w in size) and out is None:
        return np.ascontiguousarray(x)
    size, dilation = as_triple(size, "size", 1), as_triple(dilation, "dilation", 1)
    maps = x.shape[0]
    out_shape = [n - (w - 1) * d for n, w, d in zip(x.shape[1:], size, dilation)]
    out = output_array(out, [maps, *out_shape], x.dtype, x)
    plane = max(1, math.prod(x.shape[2:]) * x.itemsize)
    depth = max(1, min(out_shape[0], MAX_FILTER_SLAB_BYTES // plane))
    slabs = -(-out_shape[0] // depth)

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            c, z0 = divmod(i, slabs)
            z0 *= depth
            z1 = min(out_shape[0], z0 + depth)
            _slab_max(x[c], out[c, z0:z1], z0, size, dilation)

    parallel_chunks(maps * slabs, threads, work)
    return out


def _slab_max(x: np.ndarray, out: np.ndarray, z0: int, size: Triple, dilation: Triple) -> None:
    """``out`` (planes ``z0..`` of one map's max filter) from that map ``x``: one running maximum per axis."""
    (wz, wy, wx), (dz, dy, dx) = size, dilation
    nz, ny, nx = out.shape
    y = x[z0:z0 + nz]
    if wz > 1:
        y = _max_of([x[z0 + t * dz:z0 + t * dz + nz] for t in range(wz)])
    if wy > 1:
        y = _max_of([y[:, t * dy:t * dy + ny] for t in range(wy)])
    if wx > 1:
        _max_of([y[:, :, t * dx:t * dx + nx] for t in range(wx)], out)
    else:
        out[...] = y[:, :ny]


def _max_of(parts: Sequence[np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
    if out is None:
        out = np.empty_like(parts[0])
    np.maximum(parts[0], parts[1], out=out)
    for part in parts[2:]:
        np.maximum(out, part, out=out)
    return out
