"""Max filtering (dense, dilated, stride 1) and non-overlapping max pooling, with argmax-based backward passes.

Both forwards return ``(y, argmax)`` where ``argmax`` holds, for every output voxel, the flat index (into the
whole ``(maps, z, y, x)`` input, C order) of the input voxel that won. The backward passes scatter-add the
output gradient to those voxels, which is exactly the subgradient ZNN uses (``max_pooling_edge.hpp``).

Ties: the winner is the first tap of the window in (z, y, x) lexicographic order, i.e. the one with the smallest
z offset, then y, then x. Both kernels keep the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from znn.errors import ShapeError
from znn.ops.pointwise import as_triple, check_volume
from znn.types import Triple

# Bytes of input maps one running maximum of :func:`max_filter_values` works on at a time.
_MAX_FILTER_CHUNK_BYTES = 32 << 20

__all__ = ["max_filter", "max_filter_backward", "max_pool", "max_pool_backward"]

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
    # put the window taps last, in (z, y, x) order, so argmax's first-occurrence rule gives our tie order
    blocks = x.reshape(m, oz, sz, oy, sy, ox, sx).transpose(0, 1, 3, 5, 2, 4, 6).reshape(m, oz, oy, ox, -1)
    tap = blocks.argmax(axis=-1)
    y = np.take_along_axis(blocks, tap[..., None], axis=-1)[..., 0]
    return np.ascontiguousarray(y), _pool_flat_index(tap, x.shape, (sz, sy, sx))


def _pool_flat_index(tap: IndexArray, in_shape: tuple[int, ...], size: Triple) -> IndexArray:
    """Turn the winning tap number within each window into a flat index into the input."""
    sz, sy, sx = size
    m, oz, oy, ox = tap.shape
    dt = _index_dtype(int(np.prod(in_shape)))
    tz, rest = np.divmod(tap.astype(dt), sy * sx)
    ty, tx = np.divmod(rest, sx)
    z = np.arange(oz, dtype=dt)[:, None, None] * sz + tz
    y = np.arange(oy, dtype=dt)[None, :, None] * sy + ty
    xx = np.arange(ox, dtype=dt)[None, None, :] * sx + tx
    maps = np.arange(m, dtype=dt)[:, None, None, None]
    _, nz, ny, nx = in_shape
    return np.ascontiguousarray(((maps * nz + z) * ny + y) * nx + xx)


def max_pool_backward(grad_y: Array, argmax: IndexArray, in_shape: Sequence[int]) -> Array:
    """Route ``grad_y`` to the winning input voxels (zero elsewhere); windows do not overlap, so no summing."""
    if argmax.shape != grad_y.shape:
        raise ShapeError(f"argmax shape {argmax.shape} does not match gradient shape {grad_y.shape}")
    grad_x = np.zeros(tuple(in_shape), dtype=grad_y.dtype)
    grad_x.ravel()[argmax.ravel()] = grad_y.ravel()
    return grad_x


def max_filter_values(x: np.ndarray, size: Sequence[int], dilation: Sequence[int]) -> np.ndarray:
    """The values of :func:`znn.ops.pooling.max_filter` (no winner indices: inference needs none), one running
    maximum over views per axis, a few maps at a time straight into the result (so a block's pooling holds its
    input, its output and a few maps' temporaries, not three volumes of all maps)."""
    if all(int(w) == 1 for w in size):
        return np.ascontiguousarray(x)
    out_shape = [x.shape[0]] + [n - (int(w) - 1) * int(d) for n, w, d in zip(x.shape[1:], size, dilation)]
    out = np.empty(out_shape, dtype=x.dtype)
    per_map = max(1, x[:1].nbytes)
    step = max(1, _MAX_FILTER_CHUNK_BYTES // per_map)
    for c0 in range(0, x.shape[0], step):
        out[c0:c0 + step] = _max_values(x[c0:c0 + step], size, dilation)
    return out


def _max_values(x: np.ndarray, size: Sequence[int], dilation: Sequence[int]) -> np.ndarray:
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
    return y
