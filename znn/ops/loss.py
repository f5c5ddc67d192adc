"""Losses with masks and per-voxel weights, class rebalancing, and the pixel error.

Conventions (checked against ZNN's ``python/cost_fn.py``, ``python/train.py`` and ``python/front_end/zsample.py``
in seung-lab/znn-release):

- ``pred`` is the network's *linear* output: logits for the cross-entropy losses, which apply the sigmoid or
  softmax themselves, and the returned gradient is d cost / d pred. That is ZNN's ``prop - lbl`` for both
  cross-entropies: ZNN's ``forward_logistics`` applies the sigmoid forward but passes the gradient through
  unchanged, so its net also receives d cost / d logits; here that sigmoid lives in the loss instead (and
  ``forward_logistics`` is the identity in training, see pointwise.py).
- The cost is a **sum** over voxels and maps, never a mean, as in ZNN; divide by the voxel count for a curve.
- Square loss is ZNN's: cost ``sum (p - t)^2``, gradient ``2 (p - t)`` (no factor 1/2).
- ``mask`` (> 0 is valid) and ``weight`` broadcast against ``pred``; a voxel's cost and gradient are multiplied
  by ``weight`` and zeroed where the mask is 0 (masked voxels cannot produce NaN even if ``target`` is NaN).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from znn.errors import ShapeError
from znn.ops.pointwise import check_volume, sigmoid

__all__ = [
    "square_loss",
    "binomial_cross_entropy",
    "softmax_loss",
    "sigmoid",
    "softmax",
    "rebalance_weights",
    "pixel_error",
    "LOSSES",
]

Array = NDArray[Any]


def _voxel_factor(pred: Array, target: Array, mask: Array | None, weight: Array | None) -> Array | None:
    """Per-voxel multiplier (weight, zero where masked) broadcast to pred's shape; None means all ones."""
    check_volume(pred, "prediction")
    if target.shape != pred.shape:
        raise ShapeError(f"target shape {target.shape} does not match prediction shape {pred.shape}")
    factor: Array | None = None
    for name, arr in (("mask", mask), ("weight", weight)):
        if arr is None:
            continue
        try:
            arr = np.broadcast_to(arr, pred.shape)
        except ValueError:
            raise ShapeError(f"{name} shape {arr.shape} does not broadcast to prediction shape {pred.shape}") from None
        arr = (arr > 0).astype(pred.dtype) if name == "mask" else arr.astype(pred.dtype, copy=False)
        factor = arr if factor is None else factor * arr
    return factor


def _apply(arr: Array, factor: Array | None) -> Array:
    """``arr * factor`` computed only where factor != 0: masked voxels give exactly 0, never 0 * inf = NaN."""
    if factor is None:
        return arr
    out = np.zeros(np.broadcast_shapes(arr.shape, factor.shape), dtype=arr.dtype)
    np.multiply(arr, factor, out=out, where=factor != 0)
    return out


def _weighted_sum(term: Array, factor: Array | None) -> float:
    return float(np.sum(_apply(term, factor), dtype=np.float64))


def square_loss(
    pred: Array, target: Array, mask: Array | None = None, weight: Array | None = None
) -> tuple[float, Array]:
    """ZNN's square loss: cost ``sum w (p - t)^2``, gradient ``2 w (p - t)``; shapes ``(maps, z, y, x)``."""
    factor = _voxel_factor(pred, target, mask, weight)
    diff = pred - target.astype(pred.dtype, copy=False)
    return _weighted_sum(np.square(diff), factor), _apply(2 * diff, factor)


def binomial_cross_entropy(
    pred: Array, target: Array, mask: Array | None = None, weight: Array | None = None
) -> tuple[float, Array]:
    """Binary cross-entropy of ``sigmoid(pred)`` against ``target`` in [0, 1], per map independently.

    Cost ``sum w (softplus(z) - t z)`` (= ``-t log p - (1-t) log(1-p)`` without overflow), gradient
    ``w (sigmoid(z) - t)``.
    """
    factor = _voxel_factor(pred, target, mask, weight)
    t = target.astype(pred.dtype, copy=False)
    # softplus(z) = max(z, 0) + log1p(exp(-|z|)) never overflows
    softplus = np.maximum(pred, 0) + np.log1p(np.exp(-np.abs(pred)))
    return _weighted_sum(softplus - t * pred, factor), _apply(sigmoid(pred) - t, factor)


def softmax(x: Array, axis: int = 0) -> Array:
    """Softmax over ``axis`` (the map axis by default), shifted by the max for stability; keeps the dtype."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    probabilities: Array = e / e.sum(axis=axis, keepdims=True)
    return probabilities


def _log_softmax(x: Array) -> Array:
    shifted = x - x.max(axis=0, keepdims=True)
    log_probabilities: Array = shifted - np.log(np.exp(shifted).sum(axis=0, keepdims=True))
    return log_probabilities


def softmax_loss(
    pred: Array, target: Array, mask: Array | None = None, weight: Array | None = None
) -> tuple[float, Array]:
    """Softmax over the map axis followed by cross-entropy ``-sum w t log softmax(z)``.

    ``target`` is one-hot (e.g. ZNN's ``binary_class`` labels: boundary and its complement). The gradient is
    ``softmax(z) * sum_c (w t)_c - w t``, which reduces to ZNN's ``w (softmax(z) - t)`` for one-hot targets with
    a weight shared by the maps, and is exact for any target and per-map weight.
    """
    factor = _voxel_factor(pred, target, mask, weight)
    t = target.astype(pred.dtype, copy=False)
    wt = _apply(t, factor)
    log_p = _log_softmax(pred)
    cost = -_weighted_sum(log_p, wt)
    grad = np.exp(log_p) * wt.sum(axis=0, keepdims=True) - wt
    return cost, grad.astype(pred.dtype, copy=False)


#: cost_fn names of the job file -> loss function
LOSSES = {
    "square_loss": square_loss,
    "binomial_cross_entropy": binomial_cross_entropy,
    "softmax_loss": softmax_loss,
}


# --------------------------------------------------------------------------------------------------------------
# rebalancing


def rebalance_weights(
    target: Array, mask: Array | None = None, norm: Literal["half", "fraction"] = "half"
) -> Array:
    """Per-voxel weights giving the two classes (target > 0 and target == 0) equal total weight, per map.

    ``target`` is ``(maps, z, y, x)``; each map is balanced on its own (for affinities: z, y and x separately,
    as ZNN does). Only voxels where ``mask > 0`` are counted and they alone get a weight; masked voxels get 0.
    Pass a whole label volume for ZNN's global rebalancing, or one patch for its patch rebalancing.

    ``norm`` chooses ZNN's normalisation (``zsample.py``): ``"half"`` (``_get_balance_weight``) gives the
    positives ``0.5 N / n_pos`` and the negatives ``0.5 N / n_neg``, so the weights average 1 and the cost keeps
    its scale; ``"fraction"`` (``_get_balance_weight_v1``, used by ZNN for affinities and patch rebalancing)
    gives ``(1/n_pos) / (1/n_pos + 1/n_neg)`` and its complement. When a map has only one class all its counted
    voxels get weight 1, as in ZNN.
    """
    check_volume(target, "target")
    valid = np.ones(target.shape, dtype=bool) if mask is None else _valid(mask, target.shape)
    positive = target > 0
    n_all = valid.sum(axis=(1, 2, 3)).astype(np.float64)
    n_pos = (positive & valid).sum(axis=(1, 2, 3)).astype(np.float64)
    n_neg = n_all - n_pos
    w_pos, w_neg = np.ones_like(n_all), np.ones_like(n_all)
    both = (n_pos > 0) & (n_neg > 0)
    if norm == "half":
        w_pos[both] = 0.5 * n_all[both] / n_pos[both]
        w_neg[both] = 0.5 * n_all[both] / n_neg[both]
    elif norm == "fraction":
        inv_pos, inv_neg = 1 / n_pos[both], 1 / n_neg[both]
        w_pos[both] = inv_pos / (inv_pos + inv_neg)
        w_neg[both] = inv_neg / (inv_pos + inv_neg)
    else:
        raise ValueError(f"rebalance norm must be 'half' or 'fraction', got {norm!r}")
    dtype = target.dtype if np.issubdtype(target.dtype, np.floating) else np.float32
    weights: Array = np.where(positive, w_pos[:, None, None, None], w_neg[:, None, None, None]).astype(dtype)
    return np.where(valid, weights, weights.dtype.type(0)) if mask is not None else weights


def _valid(mask: Array, shape: tuple[int, ...]) -> NDArray[np.bool_]:
    try:
        return np.broadcast_to(mask > 0, shape)
    except ValueError:
        raise ShapeError(f"mask shape {mask.shape} does not broadcast to shape {shape}") from None


def pixel_error(pred_prob: Array, target: Array, mask: Array | None = None) -> float:
    """Fraction of valid voxels where ``pred_prob > 0.5`` disagrees with ``target > 0.5``.

    ZNN counts the disagreements (``cost_fn.get_cls``) and its learning curve divides by the number of voxels;
    this returns that ratio directly (0.0 when no voxel is valid).
    """
    if pred_prob.shape != target.shape:
        raise ShapeError(f"target shape {target.shape} does not match prediction shape {pred_prob.shape}")
    wrong = (pred_prob > 0.5) != (target > 0.5)
    if mask is None:
        return float(wrong.mean()) if wrong.size else 0.0
    valid = _valid(mask, wrong.shape)
    n = int(valid.sum())
    return float((wrong & valid).sum() / n) if n else 0.0
