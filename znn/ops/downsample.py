"""Downsampling by integer factors, for image pyramids: the mean of each window (maps, predictions) and the most
frequent value of each window or every ``factor``-th voxel (label images, whose ids must never be averaged).

Each function takes an array and one factor per axis and returns an array of ``ceil(n / factor)`` voxels per
axis: a window cut by the border holds only the voxels inside the array (the mean and the mode are taken over
them; striding keeps the window's first voxel). Windows start at index 0, so a block whose start is a multiple of
the factors downsamples to exactly the part of the whole array's result that it covers (pyramid levels are made
block by block).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from znn.errors import ShapeError

__all__ = ["downsample", "downsample_mean", "downsample_mode", "downsample_stride", "METHODS"]

Array = NDArray[Any]


def _check(x: Array, factors: Sequence[int]) -> tuple[int, ...]:
    if len(factors) != x.ndim or any(int(f) < 1 for f in factors):
        raise ShapeError(f"downsampling factors {tuple(factors)} must be one integer >= 1 per axis of the "
                         f"{x.ndim}D array of shape {x.shape}")
    return tuple(int(f) for f in factors)


def _windows(x: Array, factors: tuple[int, ...]) -> tuple[Array, Array]:
    """``x`` edge-padded to whole windows, reshaped so each window's voxels lie along the last axis, and a boolean
    array of the same shape saying which of them are inside ``x`` (not padding)."""
    pad = [(0, -n % f) for n, f in zip(x.shape, factors)]
    inside = np.pad(np.ones(x.shape, dtype=bool), pad)
    padded = np.pad(x, pad, mode="edge")
    split = [d for n, f in zip(padded.shape, factors) for d in (n // f, f)]
    order = [*range(0, 2 * x.ndim, 2), *range(1, 2 * x.ndim, 2)]  # window indices first, then offsets inside one
    out_shape = tuple(n // f for n, f in zip(padded.shape, factors))
    size = math.prod(factors)

    def arrange(a: Array) -> Array:
        return a.reshape(split).transpose(order).reshape(*out_shape, size)

    return arrange(padded), arrange(inside)


def downsample_mean(x: Array, factors: Sequence[int]) -> Array:
    """The mean of each window (in float64, returned in ``x``'s float dtype, or float32 for integer input)."""
    f = _check(x, factors)
    values, inside = _windows(x, f)
    total = np.where(inside, values, 0).sum(axis=-1, dtype=np.float64)
    dtype = x.dtype if x.dtype.kind == "f" else np.dtype(np.float32)
    mean: Array = (total / inside.sum(axis=-1)).astype(dtype)
    return mean


def downsample_mode(x: Array, factors: Sequence[int]) -> Array:
    """The most frequent value of each window (the smallest of the most frequent ones on a tie), in ``x``'s dtype.

    Counting compares every voxel of a window with every other (``prod(factors)**2`` comparisons per window: 64
    for 2x2x2), which beats sorting for the small windows of a pyramid."""
    f = _check(x, factors)
    values, inside = _windows(x, f)
    same = values[..., :, None] == values[..., None, :]
    counts = (same & inside[..., None, :]).sum(axis=-1)
    counts = np.where(inside, counts, -1)  # padding never wins
    best = counts.max(axis=-1, keepdims=True)
    # among the most frequent values, the smallest: others are replaced by the dtype's largest value first
    candidates = np.where(counts == best, values, _largest(x.dtype))
    mode: Array = candidates.min(axis=-1).astype(x.dtype, copy=False)
    return mode


def _largest(dtype: np.dtype[Any]) -> Any:
    return np.finfo(dtype).max if dtype.kind == "f" else np.iinfo(dtype).max


def downsample_stride(x: Array, factors: Sequence[int]) -> Array:
    """The first voxel of each window (``x[::fz, ::fy, ::fx]``), in ``x``'s dtype."""
    f = _check(x, factors)
    strided: Array = np.ascontiguousarray(x[tuple(slice(None, None, s) for s in f)])
    return strided


METHODS = {"mean": downsample_mean, "mode": downsample_mode, "stride": downsample_stride}


def downsample(x: Array, factors: Sequence[int], method: str) -> Array:
    """``x`` downsampled by ``factors`` with ``method`` (one of :data:`METHODS`)."""
    if method not in METHODS:
        raise ValueError(f"downsampling method {method!r} is not known; use {', '.join(METHODS)}")
    return METHODS[method](x, factors)
