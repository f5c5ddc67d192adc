"""The geometry of dense inference: output volume size, the grid of output blocks, where each input patch starts."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from znn.spec import NetworkSpec
from znn.types import Index, Triple


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


def input_offsets(spec: NetworkSpec, mirror: bool) -> tuple[dict[str, Triple], Triple]:
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
