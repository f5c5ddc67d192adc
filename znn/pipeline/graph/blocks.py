"""How feature maps are grouped into blocks, so that a task is worth far more than the scheduler's overhead.

The partition depends only on the layer's shape (never on the number of workers), so sums over blocks happen in
the same order on every scheduler and the numbers are identical whatever runs them.
"""

from __future__ import annotations

import math

# A task should cost at least a few milliseconds: the threaded scheduler costs ~0.1 ms per task and the
# distributed one ~1 ms (design.md). An FFT-convolution block of this many map-voxels runs in a few ms here.
MIN_BLOCK_WORK = 2_000_000
# More blocks than this give no extra parallelism on the machines we target and multiply the per-pair tasks.
MAX_BLOCKS = 8

Block = tuple[int, int]


def map_blocks(maps: int, voxels: int, min_work: int = MIN_BLOCK_WORK, max_blocks: int = MAX_BLOCKS) -> list[Block]:
    """Split ``maps`` feature maps of ``voxels`` voxels each into contiguous ``(start, stop)`` blocks."""
    wanted = max(1, min(maps, max_blocks, (maps * voxels) // max(1, min_work)))
    bounds = [round(i * maps / wanted) for i in range(wanted + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(wanted)]


def block_count_for(maps: int, voxels: int) -> int:
    return len(map_blocks(maps, voxels))


def voxels_of(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
