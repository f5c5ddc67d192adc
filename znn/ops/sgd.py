"""ZNN's stochastic gradient descent update (momentum, weight decay) and learning-rate annealing.

The rule is ZNN's ``filter::update`` (``src/include/network/filter.hpp`` of seung-lab/znn-release)::

    v <- momentum * v - (eta / patch_size) * grad - eta * weight_decay * w
    w <- w + v

With ``momentum == 0`` ZNN skips the velocity and writes ``w <- w (1 - eta wd) - (eta / patch_size) grad``,
which is the same number. ``patch_size`` is ZNN's "minibatch averaging": its network divides every data
gradient (not the decay) by the number of output voxels of the training patch (``network.hpp``:
``set_patch_size(outsz)``). Pass 1 to use the gradient as given.
"""

from __future__ import annotations

from typing import Any

from numpy.typing import NDArray

from znn.errors import ShapeError

__all__ = ["sgd_update", "anneal"]

Array = NDArray[Any]


def sgd_update(
    param: Array,
    grad: Array,
    velocity: Array,
    eta: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    patch_size: float = 1.0,
) -> None:
    """Update ``param`` and ``velocity`` in place by ZNN's rule (module docstring); arrays of any equal shape.

    ``velocity`` is ZNN's ``momentum_vol`` and is left untouched when ``momentum == 0``, as in ZNN.
    """
    if not (param.shape == grad.shape == velocity.shape):
        raise ShapeError(
            f"sgd_update needs equal shapes, got param {param.shape}, grad {grad.shape}, velocity {velocity.shape}"
        )
    if patch_size <= 0:
        raise ShapeError(f"patch_size must be a positive voxel count, got {patch_size}")
    t = param.dtype.type
    step = t(-eta / patch_size)
    decay = t(-eta * weight_decay)
    if momentum == 0:
        if weight_decay != 0:
            param *= t(1 - eta * weight_decay)
        param += step * grad.astype(param.dtype, copy=False)
        return
    velocity *= t(momentum)
    velocity += step * grad.astype(velocity.dtype, copy=False)
    if weight_decay != 0:
        velocity += decay * param
    param += velocity


def anneal(eta: float, factor: float, iteration: int, every: int) -> float:
    """Learning rate at ``iteration``: ``eta * factor ** (iteration // every)`` (ZNN's ``anneal_factor`` applied
    every ``Num_iter_per_annealing`` iterations); ``every <= 0`` disables annealing."""
    if every <= 0:
        return float(eta)
    return float(eta * factor ** (iteration // every))
