"""The geometry of dense inference: output volume size, the grid of output blocks, where each input patch starts."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from znn.spec import NetworkSpec
from znn.types import Index, Triple

#: one block of the output grid: ``(index, origin, write_lo, write_hi)`` (see :func:`block_grid`)
OutputBlock = tuple[Index, Triple, Triple, Triple]

# ---------------------------------------------------------------------------------------------------- geometry
def _triple(values: Sequence[int]) -> Triple:
    z, y, x = (int(v) for v in values)
    return (z, y, x)


def output_shape(volume: Sequence[int], fov: Sequence[int], mirror: bool) -> Triple:
    """Output (z, y, x) of a volume: its own size when mirrored, smaller by FOV - 1 when valid-only."""
    if mirror:
        return _triple(volume)
    return _triple([int(v) - int(f) + 1 for v, f in zip(volume, fov)])


def block_grid(out_shape: Sequence[int], patch: Sequence[int]) -> list[OutputBlock]:
    """``(index, origin, write_lo, write_hi)`` of every block: the block computes ``patch`` voxels from ``origin``
    and writes ``[write_lo, write_hi)``, one chunk of the ``patch`` grid (the last one along an axis is computed
    shifted back so it stays inside the volume)."""
    counts = [math.ceil(o / p) for o, p in zip(out_shape, patch)]
    blocks: list[OutputBlock] = []
    for index in np.ndindex(*counts):
        lo = _triple([i * p for i, p in zip(index, patch)])
        hi = _triple([min(a + p, o) for a, p, o in zip(lo, patch, out_shape)])
        origin = _triple([min(a, o - p) for a, p, o in zip(lo, patch, out_shape)])
        blocks.append((_triple(index), origin, lo, hi))
    return blocks


def input_offsets(spec: NetworkSpec, mirror: bool) -> tuple[dict[str, Triple], Triple]:
    """Per input node, where its patch starts relative to the output origin, and the largest FOV.

    All inputs are centred on the same output voxel: an input with a smaller FOV than the largest is cropped
    centrally from the largest window (ZNN's rule where branches meet). Mirroring puts the FOV's centre
    ``(fov - 1) // 2`` voxels after the window's start on the output voxel."""
    layout = spec.layout((1, 1, 1))
    fovs = layout.input_fov
    big = _triple([max(f[a] for f in fovs.values()) for a in range(3)])
    start = [-((b - 1) // 2) if mirror else 0 for b in big]
    return {n: _triple([s + (b - f) // 2 for s, b, f in zip(start, big, fov)]) for n, fov in fovs.items()}, big
