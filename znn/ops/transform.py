"""Output transforms of dense inference: ``none``, ``softmax`` or ``sigmoid`` over the map axis."""

from __future__ import annotations

import numpy as np

OUTPUT_TRANSFORMS = ("none", "softmax", "sigmoid")


def apply_transform(y: np.ndarray, transform: str) -> np.ndarray:
    """Apply ``none``/``softmax``/``sigmoid`` over the map axis of ``(maps, z, y, x)``."""
    from znn.ops.loss import softmax
    from znn.ops.pointwise import sigmoid

    if transform == "softmax":
        return softmax(y, axis=0)
    if transform == "sigmoid":
        return sigmoid(y)
    return y
