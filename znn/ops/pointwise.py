"""Element-wise and shape-only kernels: dropout, crop, maxout, biases and transfer functions.

Arrays are ``(maps, z, y, x)`` float32 or float64 and every function returns the dtype it was given. Each forward
has a backward that maps the gradient of its output to the gradient of its input, as ZNN's edges and transfer
nodes do (``src/include/network/parallel/{dropout,crop,maxout}_edge.hpp``, ``src/include/transfer_function``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from znn.errors import NetworkSpecError, ShapeError, closest
from znn.ops.parallel import parallel_chunks
from znn.types import Triple

# Bytes of one piece of :func:`bias_transfer_inplace`: a bias and a transfer in one pass through the cache.
_PIECE_BYTES = 256 << 10

__all__ = [
    "output_array",
    "bias_transfer_inplace",
    "dropout",
    "dropout_backward",
    "crop",
    "crop_backward",
    "maxout",
    "maxout_backward",
    "add_bias",
    "bias_gradient",
    "transfer_forward",
    "transfer_backward",
    "TRANSFER_FUNCTIONS",
]

Array = NDArray[Any]


# --------------------------------------------------------------------------------------------------------------
# shared argument checks (also used by pooling.py and loss.py)


def check_volume(x: Array, what: str = "input") -> None:
    """Raise ShapeError unless ``x`` is a 4D ``(maps, z, y, x)`` floating-point array."""
    if x.ndim != 4:
        raise ShapeError(f"{what} must be 4D (maps, z, y, x), got shape {x.shape}; reshape 3D volumes to (1, z, y, x)")
    if not np.issubdtype(x.dtype, np.floating):
        raise ShapeError(f"{what} must be float32 or float64, got {x.dtype}; convert with .astype(np.float32)")


def output_array(out: Array | None, shape: Sequence[int], dtype: Any, *inputs: Array) -> Array:
    """``out`` checked as the place a kernel writes its result of ``shape`` and ``dtype`` (C-contiguous, sharing
    no memory with any of ``inputs``: a result never overwrites what it is computed from), or a new array."""
    shape = tuple(int(v) for v in shape)
    if out is None:
        return np.empty(shape, dtype=dtype)
    if out.shape != shape or out.dtype != np.dtype(dtype) or not out.flags.c_contiguous:
        raise ShapeError(f"out must be a C-contiguous {np.dtype(dtype)} array of shape {shape}, got "
                         f"{out.dtype} {out.shape}{'' if out.flags.c_contiguous else ' (not contiguous)'}")
    if any(np.may_share_memory(out, x) for x in inputs):
        raise ShapeError("out shares memory with an input of the kernel: a result must not overwrite its input")
    return out


def as_triple(value: Sequence[int] | int, name: str, minimum: int) -> Triple:
    """Normalise a (z, y, x) size/offset/dilation to a tuple of three ints >= ``minimum``."""
    if isinstance(value, (int, np.integer)):
        value = (int(value),) * 3
    triple = tuple(int(v) for v in value)
    if len(triple) != 3 or any(v < minimum for v in triple):
        raise ShapeError(f"{name} must be three integers >= {minimum} (z, y, x), got {tuple(value)}")
    return triple


# --------------------------------------------------------------------------------------------------------------
# dropout


def dropout(
    x: Array, ratio: float, rng: np.random.Generator, training: bool = True
) -> tuple[Array, NDArray[np.bool_] | None]:
    """ZNN dropout of a ``(maps, z, y, x)`` array; returns ``(y, keep_mask)`` of the same shape.

    ``ratio`` is ZNN's *keeping* ratio (``dropout_edge.hpp``: ``ratio_ // keeping ratio``, a Bernoulli(ratio)
    mask): each voxel is kept with probability ``ratio`` and dropped otherwise, independently per voxel (ZNN
    draws a mask per voxel, not per map). Scaling is inverted dropout, as in ZNN: kept voxels are multiplied by
    ``1 / ratio`` in training so that inference is the identity (``keep_mask`` is then ``None``). With the
    default 0.5 keep and drop probabilities coincide.
    """
    check_volume(x)
    if not 0.0 < ratio <= 1.0:
        raise ShapeError(f"dropout ratio is the keep probability and must be in (0, 1], got {ratio}")
    if not training:
        return x.copy(), None
    keep = rng.random(x.shape, dtype=np.float32) < ratio
    return _apply_keep(x, keep, ratio), keep


def dropout_backward(grad_y: Array, keep_mask: NDArray[np.bool_] | None, ratio: float) -> Array:
    """Gradient through :func:`dropout`: the same mask and scale as the forward pass (identity in inference)."""
    if keep_mask is None:
        return grad_y.copy()
    if keep_mask.shape != grad_y.shape:
        raise ShapeError(f"dropout mask shape {keep_mask.shape} does not match gradient shape {grad_y.shape}")
    return _apply_keep(grad_y, keep_mask, ratio)


def _apply_keep(x: Array, keep: NDArray[np.bool_], ratio: float) -> Array:
    scale = x.dtype.type(1.0 / ratio)
    kept: Array = np.where(keep, x * scale, x.dtype.type(0))
    return kept


# --------------------------------------------------------------------------------------------------------------
# crop


def crop(x: Array, offset: Sequence[int] | int) -> Array:
    """Remove ``offset`` voxels from both sides of each spatial axis: ``(m, z, y, x) -> (m, z-2oz, y-2oy, x-2ox)``."""
    check_volume(x)
    oz, oy, ox = as_triple(offset, "crop offset", 0)
    out = tuple(n - 2 * o for n, o in zip(x.shape[1:], (oz, oy, ox)))
    if min(out) < 1:
        raise ShapeError(f"crop offset {(oz, oy, ox)} leaves nothing of input shape {x.shape}; use a smaller offset")
    return x[:, oz : oz + out[0], oy : oy + out[1], ox : ox + out[2]].copy()


def crop_backward(grad_y: Array, offset: Sequence[int] | int) -> Array:
    """Gradient through :func:`crop`: zero-pad ``offset`` voxels back on both sides of each spatial axis."""
    check_volume(grad_y, "gradient")
    oz, oy, ox = as_triple(offset, "crop offset", 0)
    return np.pad(grad_y, ((0, 0), (oz, oz), (oy, oy), (ox, ox)))


# --------------------------------------------------------------------------------------------------------------
# maxout


def maxout(xs: Sequence[Array]) -> tuple[Array, NDArray[np.uint8] | NDArray[np.int32]]:
    """Element-wise maximum over equally shaped inputs; returns ``(y, which)`` with ``which`` the winning input.

    Ties go to the earliest input in ``xs``.
    """
    if len(xs) == 0:
        raise ShapeError("maxout needs at least one input")
    shapes = {x.shape for x in xs}
    dtypes = {x.dtype for x in xs}
    if len(shapes) != 1 or len(dtypes) != 1:
        raise ShapeError(f"maxout inputs must share shape and dtype, got shapes {[x.shape for x in xs]}")
    check_volume(xs[0])
    y = xs[0].copy()
    which = np.zeros(y.shape, dtype=np.uint8 if len(xs) < 256 else np.int32)
    for i, x in enumerate(xs[1:], start=1):
        # strict comparison keeps the earliest input on ties
        better = x > y
        np.copyto(y, x, where=better)
        which[better] = i
    return y, which


def maxout_backward(grad_y: Array, which: NDArray[np.integer], n: int) -> list[Array]:
    """Gradient through :func:`maxout`: each input receives the gradient where it won, zero elsewhere."""
    if which.shape != grad_y.shape:
        raise ShapeError(f"maxout index shape {which.shape} does not match gradient shape {grad_y.shape}")
    zero = grad_y.dtype.type(0)
    return [np.where(which == i, grad_y, zero) for i in range(n)]


# --------------------------------------------------------------------------------------------------------------
# biases


def _check_bias(x: Array, bias: Array) -> None:
    check_volume(x)
    if bias.shape != (x.shape[0],):
        raise ShapeError(f"bias shape {bias.shape} does not match {x.shape[0]} maps of input {x.shape}")


def add_bias(x: Array, bias: Array) -> Array:
    """Add one bias per map: ``x (m, z, y, x) + bias (m,)``."""
    _check_bias(x, bias)
    biased: Array = x + bias.astype(x.dtype, copy=False)[:, None, None, None]
    return biased


def bias_gradient(grad: Array) -> Array:
    """Gradient of the per-map bias: the sum of ``grad (m, z, y, x)`` over each map, shape ``(m,)``."""
    check_volume(grad, "gradient")
    # accumulate in float64: a float32 sum over 1e6 voxels would lose several digits
    per_map: Array = grad.sum(axis=(1, 2, 3), dtype=np.float64).astype(grad.dtype)
    return per_map


# --------------------------------------------------------------------------------------------------------------
# transfer functions (formats.md; ZNN's src/include/transfer_function/*.hpp)
#
# As in ZNN, each derivative is written in terms of the output y = f(x), so the backward pass needs only the
# stored output. ``forward_logistics`` is a sigmoid applied only in inference; in training it is the identity
# both ways, so the loss sees logits and applies the sigmoid itself (loss.py). ZNN instead applies the sigmoid
# forward and skips its derivative backward; with the cross-entropy losses both give the same gradient (the
# cost's ``prop - lbl``), with square_loss they would not.


def _linear_args(args: Sequence[float]) -> tuple[float, float]:
    if not 1 <= len(args) <= 2:
        raise NetworkSpecError(f"function linear takes 1 or 2 function_args (a,b), got {list(args)}")
    return float(args[0]), float(args[1]) if len(args) == 2 else 0.0


def _tanh_args(args: Sequence[float]) -> tuple[float, float]:
    if len(args) != 2 or float(args[0]) == 0.0:
        raise NetworkSpecError(f"function tanh takes 2 function_args (a,b) with a != 0, got {list(args)}")
    return float(args[0]), float(args[1])


def sigmoid(x: Array) -> Array:
    """Logistic function 1 / (1 + exp(-x)), numerically stable for large |x|; keeps the dtype."""
    # exp of a non-positive number only: no overflow for large |x|
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


Forward = Callable[[Array, Sequence[float], bool], Array]
Backward = Callable[[Array, Array, Sequence[float], bool], Array]


def _fwd_linear(x: Array, args: Sequence[float], training: bool) -> Array:
    a, b = _linear_args(args)
    y: Array = x * x.dtype.type(a) + x.dtype.type(b)
    return y


def _bwd_linear(y: Array, g: Array, args: Sequence[float], training: bool) -> Array:
    a, _ = _linear_args(args)
    grad_x: Array = g * g.dtype.type(a)
    return grad_x


def _fwd_relu(x: Array, args: Sequence[float], training: bool) -> Array:
    y: Array = np.maximum(x, x.dtype.type(0))
    return y


def _bwd_relu(y: Array, g: Array, args: Sequence[float], training: bool) -> Array:
    # g times the mask: 3x faster than np.where(y > 0, g, 0), the same values (a -0.0 where g < 0 is masked)
    out: Array = np.multiply(g, y > 0, dtype=g.dtype)
    return out


def _fwd_tanh(x: Array, args: Sequence[float], training: bool) -> Array:
    a, b = _tanh_args(args)
    y: Array = x.dtype.type(a) * np.tanh(x * x.dtype.type(b))
    return y


def _bwd_tanh(y: Array, g: Array, args: Sequence[float], training: bool) -> Array:
    a, b = _tanh_args(args)
    t = g.dtype.type
    grad_x: Array = g * (t(b / a) * (t(a) - y) * (t(a) + y))
    return grad_x


def _fwd_soft_sign(x: Array, args: Sequence[float], training: bool) -> Array:
    y: Array = x / (1 + np.abs(x))
    return y


def _bwd_soft_sign(y: Array, g: Array, args: Sequence[float], training: bool) -> Array:
    grad_x: Array = g * np.square(1 - np.abs(y))
    return grad_x


def _fwd_logistics(x: Array, args: Sequence[float], training: bool) -> Array:
    return sigmoid(x)


def _bwd_logistics(y: Array, g: Array, args: Sequence[float], training: bool) -> Array:
    grad_x: Array = g * y * (1 - y)
    return grad_x


def _fwd_forward_logistics(x: Array, args: Sequence[float], training: bool) -> Array:
    return x.copy() if training else sigmoid(x)


def _bwd_identity(y: Array, g: Array, args: Sequence[float], training: bool) -> Array:
    # ZNN's forward_logistics has no grad(): the gradient passes through unchanged
    return g.copy()


#: name -> (forward, backward, default function_args)
TRANSFER_FUNCTIONS: dict[str, tuple[Forward, Backward, tuple[float, ...]]] = {
    "linear": (_fwd_linear, _bwd_linear, (1.0, 0.0)),
    "rectify_linear": (_fwd_relu, _bwd_relu, ()),
    "tanh": (_fwd_tanh, _bwd_tanh, (1.0, 1.0)),
    "soft_sign": (_fwd_soft_sign, _bwd_soft_sign, ()),
    "logistics": (_fwd_logistics, _bwd_logistics, ()),
    "forward_logistics": (_fwd_forward_logistics, _bwd_identity, ()),
}


def _lookup(name: str, args: Sequence[float] | None) -> tuple[Forward, Backward, Sequence[float]]:
    if name not in TRANSFER_FUNCTIONS:
        raise NetworkSpecError(f"unknown transfer function {name!r}; {closest(name, TRANSFER_FUNCTIONS)}")
    fwd, bwd, default = TRANSFER_FUNCTIONS[name]
    if args is None or len(args) == 0:
        args = default
    elif not default:
        raise NetworkSpecError(f"function {name} takes no function_args, got {list(args)}")
    return fwd, bwd, args


def transfer_forward(name: str, x: Array, args: Sequence[float] | None = None, training: bool = True) -> Array:
    """Apply transfer function ``name`` (formats.md) element-wise; ``args`` are the ``function_args``."""
    fwd, _, args = _lookup(name, args)
    return fwd(x, args, training)


def bias_transfer_inplace(y: Array, bias: Array, name: str, args: Sequence[float] | None = None,
                          threads: int = 1) -> Array:
    """``transfer_forward(name, add_bias(y, bias), training=False)`` written into ``y`` itself (which the caller
    owns), in pieces of a few hundred kilobytes of one map: each piece gets its bias and its transfer while in the
    core's cache (one pass through memory, not two), ``threads`` pieces side by side."""
    _check_bias(y, bias)
    if not y.flags.c_contiguous:
        raise ShapeError("bias_transfer_inplace writes into its input, which must be one C-contiguous array")
    fwd, _, args = _lookup(name, args)
    flat = y.reshape(y.shape[0], -1)  # a view (y is contiguous)
    values = bias.astype(y.dtype, copy=False)
    step = max(1, _PIECE_BYTES // y.itemsize)
    pieces = -(-flat.shape[1] // step)

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            c, p = divmod(i, pieces)
            piece = flat[c, p * step:(p + 1) * step]
            piece += values[c]
            if name == "rectify_linear":
                np.maximum(piece, y.dtype.type(0), out=piece)
            else:
                piece[...] = fwd(piece, args, False)

    parallel_chunks(y.shape[0] * pieces, threads, work)
    return y


def transfer_backward(
    name: str,
    y: Array,
    grad_y: Array,
    args: Sequence[float] | None = None,
    x: Array | None = None,
    training: bool = True,
) -> Array:
    """Gradient through transfer function ``name``, computed from its output ``y`` as ZNN does.

    ``x`` (the input) is accepted for callers that keep it but is not needed by any supported function.
    """
    _, bwd, args = _lookup(name, args)
    if y.shape != grad_y.shape:
        raise ShapeError(f"transfer output shape {y.shape} does not match gradient shape {grad_y.shape}")
    return bwd(y, grad_y, args, training)
