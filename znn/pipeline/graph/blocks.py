"""How a layer's work is split into tasks: feature maps into contiguous blocks, a direct layer's output into slabs.

A split depends only on the layer's shape and on the number of workers ``W`` the graph is planned for (never on
the scheduler that runs it), so sums over blocks happen in the same order on every scheduler and a graph planned
for ``W`` workers gives the same numbers whatever runs it. Graphs planned for different ``W`` differ by rounding
only (sums over other blocks).
"""

from __future__ import annotations

import math

# A task should cost far more than the scheduler's overhead: the threaded scheduler costs ~0.1 ms per task and the
# distributed one ~1 ms (design.md). An FFT-convolution block of this many map-voxels runs in a few ms here.
MIN_BLOCK_WORK = 2_000_000
# One worker gains nothing from more blocks than this, and the per-pair tasks of an FFT layer grow as its square.
MAX_BLOCKS = 8
# Planned for W > 1 workers, a stage is split into at least W tasks (its maps, or a direct layer's rows), down to
# tasks of this many map-voxels: a pointwise pass over them takes ~1 ms, a conv slab far more.
MIN_SPLIT_WORK = 64_000
# A direct layer split into slabs gets this many slabs per worker: uneven slabs leave cores idle that other slabs
# fill, but every further slab costs its halo, its joins and a smaller GEMM. Two or fewer workers have other
# stages' tasks to fill what uneven slabs leave and take one slab each (interleaved steps at 2 threads on the
# development VM: N4_relu 1x100x100 and VD2D3D 4x40x40 6% shorter than with two); planned for 16 workers, one slab
# each left N4_relu 1x100x100 an available parallelism of 9.4-13.8 in three runs, two gave 18-19.
SLABS_PER_WORKER = 2
FEW_WORKERS_SLABS = 1  # per worker, planned for at most two workers


MapBlock = tuple[int, int]


def map_blocks(maps: int, voxels: int, workers: int = 1, min_work: int = MIN_BLOCK_WORK,
               max_blocks: int = MAX_BLOCKS) -> list[MapBlock]:
    """Split ``maps`` feature maps of ``voxels`` voxels each into contiguous ``(start, stop)`` blocks: enough that
    a block is worth a task (``min_work``), and for ``workers`` > 1 at least one per worker while blocks keep
    :data:`MIN_SPLIT_WORK` map-voxels."""
    work = maps * voxels
    wanted = min(maps, max_blocks, work // max(1, min_work))
    if workers > 1:
        wanted = max(wanted, min(maps, workers, work // MIN_SPLIT_WORK))
    return even_split(maps, max(1, wanted))


def slab_count(rows: int, row_work: int, workers: int) -> int:
    """Slabs of a direct layer's ``rows`` output rows (``row_work`` multiply-adds each) planned for ``workers``:
    one for one worker (the layer's one task splits its tiles over its threads), else :data:`FEW_WORKERS_SLABS`
    (two workers) or :data:`SLABS_PER_WORKER` per worker while a slab keeps a row and :data:`MIN_SPLIT_WORK` of
    work."""
    if workers <= 1:
        return 1
    per_worker = FEW_WORKERS_SLABS if workers <= 2 else SLABS_PER_WORKER
    return max(1, min(rows, per_worker * workers, (rows * row_work) // MIN_SPLIT_WORK))


def even_split(n: int, parts: int) -> list[MapBlock]:
    """``range(n)`` as ``parts`` contiguous ``(start, stop)`` pieces of (nearly) equal length."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def voxels_of(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
