"""The one dispatch on edge type for the edges that are not convolutions: max filter, max pool, dropout, crop and
the pass-through of maxout edges (the node takes the maximum).

Every evaluator runs these edges through :func:`one_to_one_forward` (the sequential reference, the phase evaluator
of dense inference, and the graph's tasks); the training graph runs their backward through
:func:`one_to_one_backward`. Convolutions stay each evaluator's own strategy.

The max filter is always the value-only running maximum over views of its input
(:func:`~znn.ops.pooling.max_filter_values`, no copy of a cropped input first). Inference (``draw`` None) keeps
no backward data. Training (``draw`` the step's randomness) keeps the max filter's input and output (its backward,
:func:`~znn.ops.pooling.max_filter_gradient`, finds each window's winner from them), the max pool's winner indices
and the dropout mask, drawn from ``draw``, so a step's numbers do not depend on which worker runs the edge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from znn.ops import pointwise, pooling
from znn.spec import EdgeGroup
from znn.types import Triple

# The seed of a training step's randomness for one edge block: (seed, step, edge, block).
Draw = tuple[int, ...]


@dataclass(frozen=True)
class OneToOne:
    """A one-to-one edge as its forward needs it: type, window, dilation (the sparsity of its input), crop offset
    and dropout keep ratio. Frozen and small: graph tasks carry it to the workers."""

    kind: str
    size: Triple = (1, 1, 1)
    dilation: Triple = (1, 1, 1)
    offset: Triple = (0, 0, 0)
    ratio: float = 0.5

    @classmethod
    def of(cls, edge: EdgeGroup, dilation: Triple) -> OneToOne:
        return cls(edge.type, edge.size, dilation, edge.offset, edge.ratio)

    @property
    def keeps_backward_data(self) -> bool:
        """Whether the forward's result is ``(values, backward data)`` (winners or a mask) rather than values."""
        return _KINDS[self.kind].keeps


Forward = Callable[[OneToOne, np.ndarray, "Draw | None", int], tuple[np.ndarray, Any]]
Backward = Callable[[OneToOne, np.ndarray, Any, Triple], np.ndarray]


@dataclass(frozen=True)
class _Kind:
    forward: Forward  # (edge, cropped input, draw, threads) -> (values, backward data or None)
    backward: Backward  # (edge, output gradient, backward data, input extent) -> input gradient
    keeps: bool


def one_to_one_forward(edge: OneToOne, x: np.ndarray, draw: Draw | None = None,
                       threads: int = 1) -> tuple[np.ndarray, Any]:
    """``(values, backward data)`` of ``edge`` on its input ``x`` (already cropped to what the edge reads; may be a
    view). ``draw`` None: inference, backward data None. The values are a new array, or ``x`` itself (made
    contiguous) for edges that pass their input through: callers that write in place check for that. ``threads``:
    threads the inference max filter may split its maps over (the others are cheap and run on one)."""
    return _KINDS[edge.kind].forward(edge, x, draw, threads)


def one_to_one_backward(edge: OneToOne, grad: np.ndarray, kept: Any, need: Triple) -> np.ndarray:
    """The gradient wrt the cropped input (extent ``need``) from the output gradient and the forward's backward
    data (``kept``; None for edges that keep none)."""
    return _KINDS[edge.kind].backward(edge, grad, kept, need)


def _max_filter(edge: OneToOne, x: np.ndarray, draw: Draw | None, threads: int) -> tuple[np.ndarray, Any]:
    # values only, read from the view (no contiguous copy of the crop first); training keeps the input and the
    # output, from which the backward finds each window's winner again (no index array)
    y = pooling.max_filter_values(x, edge.size, edge.dilation, threads)
    return y, (None if draw is None else (x, y))


def _max_pool(edge: OneToOne, x: np.ndarray, draw: Draw | None, threads: int) -> tuple[np.ndarray, Any]:
    y, winners = pooling.max_pool(np.ascontiguousarray(x), edge.size)
    return y, (winners if draw is not None else None)


def _dropout(edge: OneToOne, x: np.ndarray, draw: Draw | None, threads: int) -> tuple[np.ndarray, Any]:
    rng = np.random.default_rng(list(draw) if draw is not None else 0)  # inference draws nothing
    return pointwise.dropout(np.ascontiguousarray(x), edge.ratio, rng, training=draw is not None)


def _crop(edge: OneToOne, x: np.ndarray, draw: Draw | None, threads: int) -> tuple[np.ndarray, Any]:
    return np.ascontiguousarray(pointwise.crop(x, edge.offset)), None


def _pass_through(edge: OneToOne, x: np.ndarray, draw: Draw | None, threads: int) -> tuple[np.ndarray, Any]:
    return np.ascontiguousarray(x), None


def _max_filter_back(edge: OneToOne, grad: np.ndarray, kept: Any, need: Triple) -> np.ndarray:
    x, y = kept
    return pooling.max_filter_gradient(grad, x, y, edge.size, edge.dilation)


def _max_pool_back(edge: OneToOne, grad: np.ndarray, kept: Any, need: Triple) -> np.ndarray:
    return pooling.max_pool_backward(grad, kept, (grad.shape[0], *need))


def _dropout_back(edge: OneToOne, grad: np.ndarray, kept: Any, need: Triple) -> np.ndarray:
    return pointwise.dropout_backward(grad, kept, edge.ratio)


def _crop_back(edge: OneToOne, grad: np.ndarray, kept: Any, need: Triple) -> np.ndarray:
    return pointwise.crop_backward(grad, edge.offset)


def _pass_back(edge: OneToOne, grad: np.ndarray, kept: Any, need: Triple) -> np.ndarray:
    return grad  # maxout: the node routed the gradient to the edges that won


_KINDS: dict[str, _Kind] = {
    "max_filter": _Kind(_max_filter, _max_filter_back, keeps=True),
    "max_pool": _Kind(_max_pool, _max_pool_back, keeps=True),
    "dropout": _Kind(_dropout, _dropout_back, keeps=True),
    "crop": _Kind(_crop, _crop_back, keeps=False),
    "maxout": _Kind(_pass_through, _pass_back, keeps=False),
}
