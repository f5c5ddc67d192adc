"""The geometry of a blockwise segmentation: core blocks (the output chunks), their halos, the faces between
neighbouring blocks and the slabs across each face where the two blocks' ids are matched.

A block segments its *core* (one chunk of the output) together with a *halo* of ``halo`` voxels on each side,
clipped to the volume (its *extent*); only the core is written. A face between two neighbouring cores (along one
axis) is matched in a *slab* reaching ``slab`` voxels to each side of it (clipped to the two cores), which both
blocks segmented (``slab <= halo``). Faces across z are not matched when z-slices are segmented one by one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from znn.errors import ConfigError
from znn.types import Index, Triple

__all__ = ["Box", "BlockBox", "Face", "SegmentGrid", "slab_width"]

#: a region ``(lo, hi)`` of the volume, ``hi`` excluded
Box = tuple[Triple, Triple]


def _triple(values: object) -> Triple:
    z, y, x = (int(v) for v in values)  # type: ignore[attr-defined]
    return (z, y, x)


def slab_width(halo: int) -> int:
    """How far a matching slab reaches to each side of a face: half the halo, at most 4 voxels (at least 1). Both
    blocks see the most context of their own right at the face, so the slab is thin; a few voxels of each object
    suffice to pair the two blocks' ids."""
    return max(1, min(4, halo // 2))


@dataclass(frozen=True)
class BlockBox:
    """One block: its grid ``index``, ``core`` (written) and ``extent`` (core with halo, segmented), and which faces
    of its extent are cut from the volume (``open_faces``: per axis, low and high side)."""

    index: Index
    core: Box
    extent: Box
    open_faces: tuple[tuple[bool, bool], tuple[bool, bool], tuple[bool, bool]]

    def core_in_extent(self) -> tuple[slice, slice, slice]:
        """The core as slices of the block's extent array."""
        (clo, chi), (elo, _) = self.core, self.extent
        z, y, x = (slice(a - e, b - e) for a, b, e in zip(clo, chi, elo))
        return z, y, x


@dataclass(frozen=True)
class Face:
    """The face between block ``low`` and its neighbour ``high`` along ``axis``, matched in ``slab``."""

    axis: int
    low: Index
    high: Index
    slab: Box


@dataclass(frozen=True)
class SegmentGrid:
    """Blocks of ``block`` voxels with ``halo`` over a volume of ``shape`` (all ``(z, y, x)``); ``flat``: z-slices
    are segmented one by one (no halo and no matching across z)."""

    shape: Triple
    block: Triple
    halo: Triple
    flat: bool

    def __post_init__(self) -> None:
        if min(self.block) < 1 or min(self.halo) < 0:
            raise ConfigError(f"block {self.block} must be positive and halo {self.halo} non-negative (z,y,x)")
        for axis in range(1 if self.flat else 0, 3):
            if self.counts[axis] > 1 and self.halo[axis] < 1:
                raise ConfigError(f"halo {','.join(map(str, self.halo))}: blocks are cut along axis "
                                  f"{'zyx'[axis]}, so the halo along it must be at least 1 voxel (objects cut by a "
                                  "face are joined where both blocks overlap); give e.g. --halo 8,32,32")

    @property
    def halo_used(self) -> Triple:
        """The halo as used: none along z when z-slices are segmented one by one."""
        return (0 if self.flat else self.halo[0], self.halo[1], self.halo[2])

    @property
    def counts(self) -> Triple:
        return _triple(math.ceil(s / b) for s, b in zip(self.shape, self.block))

    @property
    def stride(self) -> int:
        """Ids a block may use: one per voxel of the largest extent (ids of block ``i`` are ``i * stride + 1...``)."""
        return int(np.prod([min(b + 2 * h, s) for b, h, s in zip(self.block, self.halo_used, self.shape)]))

    def offset(self, index: Index) -> int:
        """What block ``index``'s ids are offset by (its position in C order times :attr:`stride`)."""
        return int(np.ravel_multi_index(index, self.counts)) * self.stride

    def blocks(self) -> list[BlockBox]:
        found = []
        for raw in np.ndindex(*self.counts):
            index = _triple(raw)
            lo = _triple(i * b for i, b in zip(index, self.block))
            hi = _triple(min(a + b, s) for a, b, s in zip(lo, self.block, self.shape))
            elo = _triple(max(a - h, 0) for a, h in zip(lo, self.halo_used))
            ehi = _triple(min(b + h, s) for b, h, s in zip(hi, self.halo_used, self.shape))
            cut = tuple((a > 0, b < s) for a, b, s in zip(elo, ehi, self.shape))
            found.append(BlockBox(index, (lo, hi), (elo, ehi), cut))  # type: ignore[arg-type]
        return found

    def faces(self) -> list[Face]:
        """Every face between two neighbouring blocks that is matched."""
        boxes = {b.index: b for b in self.blocks()}
        found = []
        for index, low in boxes.items():
            for axis in range(1 if self.flat else 0, 3):
                up = list(index)
                up[axis] += 1
                high = boxes.get(_triple(up))
                if high is not None:
                    found.append(Face(axis, index, high.index, self._slab(low, high, axis)))
        return found

    def _slab(self, low: BlockBox, high: BlockBox, axis: int) -> Box:
        width = slab_width(self.halo_used[axis])
        face = high.core[0][axis]
        lo, hi = list(low.core[0]), list(low.core[1])
        lo[axis], hi[axis] = max(face - width, low.core[0][axis]), min(face + width, high.core[1][axis])
        return _triple(lo), _triple(hi)
