"""Segmentation of boundary and affinity maps, and the kernels that stitch blockwise segmentations together.

Conventions are those of :mod:`znn.ops.metrics`: a boundary map is a boundary probability (1 = boundary, 0 = cell
interior), as the networks trained on ZNN's ``binary_class`` labels predict it (channel 1); an affinity map is
``(3, Z, Y, X)`` (channels z, y, x), ``aff[c, v]`` linking voxel ``v`` to its predecessor along axis ``c``, 1 =
same object.

The method (:class:`Method`, :func:`segment`):

1. a *height map*: the boundary probability, or for affinities one minus the mean affinity of each voxel's edges
   (its 6 neighbours in 3D, 4 in-plane in 2D), smoothed by a Gaussian of ``sigma`` voxels (in-plane only in 2D);
2. *seeds*: connected components of ``height < seed_threshold`` (per z-slice in 2D, ids unique over the stack); for
   affinities, connected components over the edges with affinity above ``1 - seed_threshold``;
3. a *seeded watershed* of the height map (:func:`skimage.segmentation.watershed`) from them, over every voxel;
4. segments smaller than ``min_size`` voxels are given to their neighbours (removed, then flooded again);
5. the watershed fragments are *agglomerated*: a region adjacency graph whose edge weight is the mean affinity of
   the voxel edges between two regions, merged greedily from the highest mean while it is above
   ``merge_threshold``, each merge pooling the sums and counts of the merged edges (mean-affinity agglomeration as
   waterz does it, with :func:`skimage.graph.merge_hierarchical`). A boundary map's voxel edge has the affinity one
   minus the larger boundary probability of its two voxels (:func:`edge_affinities`), so two fragments merge where
   the membrane between them is faint on average. ``merge_threshold`` 1 (:data:`NO_MERGE`, boundary maps' default)
   merges nothing.

Every voxel gets an id > 0 (a slice or volume without any seed stays 0). ``2d`` segments each z-slice on its own,
the usual choice for anisotropic stacks such as ISBI 2012; ``3d`` floods across slices.

Blockwise kernels (:mod:`znn.pipeline.segment` runs them): a block is segmented with a halo; ``open_faces`` says
which faces of its array are cut from a larger volume, so that a segment touching one is never dropped as small
(it may be large outside). Ids of a block are offset to be unique over the volume (:func:`offset_ids`); a slab on
both sides of each face between two blocks, labelled by each block, pairs their ids where each holds the majority
of the other's voxels there (:func:`face_pairs`), the pairs
are joined into objects (:func:`join_pairs`, union-find as connected components) and every id is replaced by the
smallest id of its object (:func:`relabel`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from znn.errors import ConfigError, ShapeError, closest
from znn.ops.metrics import boundary_probability, segment_affinity_map

__all__ = [
    "Method",
    "DEFAULTS",
    "method_defaults",
    "OUT_TYPES",
    "DIMS",
    "height_map",
    "edge_affinities",
    "NO_MERGE",
    "segment",
    "watershed_fragments",
    "merge_fragments",
    "seeds",
    "seeded_watershed",
    "agglomerate",
    "offset_ids",
    "face_pairs",
    "join_pairs",
    "relabel",
    "same_partition",
]

Array = NDArray[Any]
Labels = NDArray[np.int64]
OUT_TYPES = ("boundary", "affinity")
DIMS = ("2d", "3d")
#: which faces of a block's array are cut from a larger volume: ``((z_low, z_high), (y_low, y_high), (x_low, x_high))``
Faces = tuple[tuple[bool, bool], tuple[bool, bool], tuple[bool, bool]]
NO_FACES: Faces = ((False, False), (False, False), (False, False))


#: the merge threshold that merges nothing (a mean affinity is never above 1)
NO_MERGE = 1.0

#: the defaults of :class:`Method` per map type: boundary maps' chosen on the quickstart's held-out volume and ISBI
#: 2012 (no agglomeration: choose a merge threshold on your labels, ``znn segment --choose-on``); affinity maps' on
#: the FIB-SEM volume's validation sections 25-37 only (never on the sections 38-49 the README reports), where
#: `znn segment --choose-on` picked seed 0.01-0.02 and merge 0.2-0.4 for three networks of workflows/recursive (0.1
#: and 0.5 before: 0.0907 against 0.0299 adapted Rand error on 38-49 for the 30-minute network). See the README,
#: section "Segment and evaluate".
DEFAULTS: dict[str, dict[str, float]] = {
    "boundary": {"seed_threshold": 0.03, "min_size": 30, "sigma": 1.0, "merge_threshold": NO_MERGE},
    "affinity": {"seed_threshold": 0.01, "min_size": 30, "sigma": 0.0, "merge_threshold": 0.3},
}


def method_defaults(out_type: str) -> dict[str, float]:
    """The default settings of the method for ``out_type`` maps."""
    if out_type not in DEFAULTS:
        raise ConfigError(f"type {out_type!r} is not valid; {closest(out_type, OUT_TYPES)}")
    return dict(DEFAULTS[out_type])


@dataclass(frozen=True)
class Method:
    """What :func:`segment` does to a prediction (see the module notes); :meth:`of` fills in the defaults of the
    map's type.

    ``dims`` None means ``2d`` for boundary maps and ``3d`` for affinities (as ``znn evaluate``); ``nonboundary``
    reads a one-channel boundary map as P(non-boundary) (ZNN's ``one_class`` output).
    """

    out_type: str = "boundary"
    dims: str | None = None
    seed_threshold: float = DEFAULTS["boundary"]["seed_threshold"]
    min_size: int = int(DEFAULTS["boundary"]["min_size"])
    sigma: float = DEFAULTS["boundary"]["sigma"]
    merge_threshold: float = DEFAULTS["boundary"]["merge_threshold"]
    nonboundary: bool = False

    @classmethod
    def of(cls, out_type: str = "boundary", dims: str | None = None, nonboundary: bool = False,
           **settings: float) -> "Method":
        """The method for ``out_type`` maps: ``settings`` (seed_threshold, min_size, sigma, merge_threshold) over
        the type's defaults."""
        values = method_defaults(out_type)
        unknown = set(settings) - set(values)
        if unknown:
            raise ConfigError(f"{', '.join(sorted(unknown))}: not a setting of the segmentation method; "
                              f"{closest(sorted(unknown)[0], values)}")
        values.update(settings)
        return cls(out_type, dims, float(values["seed_threshold"]), int(values["min_size"]), float(values["sigma"]),
                   float(values["merge_threshold"]), nonboundary)

    def __post_init__(self) -> None:
        if self.out_type not in OUT_TYPES:
            raise ConfigError(f"type {self.out_type!r} is not valid; {closest(self.out_type, OUT_TYPES)}")
        if self.dims is not None and self.dims not in DIMS:
            raise ConfigError(f"dims {self.dims!r} is not valid; write 2d or 3d")
        for name in ("seed_threshold", "merge_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name.replace('_', '-')} {value!r} is not within [0, 1]")
        if self.min_size < 0 or self.sigma < 0 or not np.isfinite(self.sigma):
            raise ConfigError(f"min-size {self.min_size!r} and sigma {self.sigma!r} must be finite numbers >= 0")

    @property
    def flat(self) -> bool:
        """Whether each z-slice is segmented on its own."""
        return (self.dims or ("2d" if self.out_type == "boundary" else "3d")) == "2d"

    @property
    def resolved_dims(self) -> Literal["2d", "3d"]:
        return "2d" if self.flat else "3d"

    @property
    def reach(self) -> int:
        """Voxels at an array's border whose height differs from the whole volume's (the smoothing's radius)."""
        return int(4.0 * self.sigma + 0.5) if self.sigma > 0 else 0


# ------------------------------------------------------------------------------------------------ height map
def height_map(pred: Array, method: Method) -> NDArray[np.float64]:
    """The ``(Z, Y, X)`` height map of a prediction (module notes, step 1), before smoothing."""
    pred = np.asarray(pred)
    if method.out_type == "boundary":
        prob = boundary_probability(pred, "nonboundary" if method.nonboundary else "boundary")
        return np.asarray(prob, dtype=np.float64)
    if pred.ndim != 4 or pred.shape[0] != 3:
        raise ShapeError(f"an affinity map is (3, Z, Y, X) (channels z, y, x); got shape {pred.shape}")
    total = np.zeros(pred.shape[1:], np.float64)
    count = np.zeros(pred.shape[1:], np.float64)
    for axis in range(1 if method.flat else 0, 3):
        later, earlier = _later_earlier(axis)
        edge = pred[axis].astype(np.float64)[later]  # the edge stored at a voxel links it to its predecessor
        total[later] += edge
        total[earlier] += edge
        count[later] += 1
        count[earlier] += 1
    return 1.0 - np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def edge_affinities(pred: Array, height: NDArray[np.float64], method: Method) -> Array:
    """The affinities the agglomeration reads (module notes, step 5): an affinity map's own; for a boundary map
    (whose unsmoothed :func:`height_map` is ``height``), ``(3, Z, Y, X)`` with the edge from each voxel to its
    predecessor along an axis one minus the larger boundary probability of the two (z edges 0 in 2D)."""
    if method.out_type == "affinity":
        return np.asarray(pred)
    aff = np.zeros((3, *height.shape), np.float64)
    for axis in range(1 if method.flat else 0, 3):
        later, earlier = _later_earlier(axis)
        aff[axis][later] = 1.0 - np.maximum(height[later], height[earlier])
    return aff


def _smooth(height: NDArray[np.float64], method: Method) -> NDArray[np.float64]:
    if method.sigma <= 0:
        return height
    sigma = (0.0, method.sigma, method.sigma) if method.flat else method.sigma
    smoothed: NDArray[np.float64] = ndimage.gaussian_filter(height, sigma, mode="reflect", truncate=4.0)
    return smoothed


def _structure(flat: bool) -> Array:
    """6-connectivity, or 4-connectivity within z-slices."""
    structure: Array = ndimage.generate_binary_structure(3, 1)
    if flat:
        structure = structure.copy()
        structure[0] = structure[2] = False
    return structure


def _later_earlier(axis: int) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    later, earlier = [slice(None)] * 3, [slice(None)] * 3
    later[axis], earlier[axis] = slice(1, None), slice(None, -1)
    return tuple(later), tuple(earlier)


# ------------------------------------------------------------------------------------------------- watershed
def seeds(pred: Array, height: NDArray[np.float64], method: Method) -> Labels:
    """Step 2 of the module notes: connected components of the voxels below ``seed_threshold`` of a (smoothed) height
    map;
    of an affinity map, connected components over the edges whose affinity is above ``1 - seed_threshold`` (two
    neighbouring voxels of two cells are not joined by being low, only by a high edge between them)."""
    if method.out_type == "affinity":
        return segment_affinity_map(pred, 1.0 - method.seed_threshold, method.resolved_dims)
    found, _ = ndimage.label(height < method.seed_threshold, structure=_structure(method.flat))
    labels: Labels = found.astype(np.int64)
    return labels


def seeded_watershed(height: NDArray[np.float64], markers: Labels, method: Method,
                     open_faces: Faces = NO_FACES) -> Labels:
    """Steps 3 and 4 of the module notes: the watershed of a smoothed height map from ``markers``, small segments
    given to their neighbours; ids consecutive from 1."""
    structure = _structure(method.flat)
    labels = _flood(height, markers, structure)
    if method.min_size > 1:
        labels = _drop_small(labels, height, method.min_size, structure, open_faces)
    return _consecutive(labels)


def _flood(height: NDArray[np.float64], markers: Array, structure: Array) -> Labels:
    from skimage.segmentation import watershed

    if not np.any(markers):
        return np.zeros(height.shape, np.int64)
    flooded: Labels = watershed(height, markers=markers, connectivity=structure).astype(np.int64)
    return flooded


def _drop_small(labels: Labels, height: NDArray[np.float64], min_size: int, structure: Array,
                open_faces: Faces) -> Labels:
    """Segments under ``min_size`` voxels removed and their voxels flooded from the neighbours; a segment touching
    an open face is kept (the part outside may make it large)."""
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    small[_touching(labels, open_faces, structure)] = False
    if not small.any():
        return labels
    return _flood(height, np.where(small[labels], 0, labels), structure)


def _touching(labels: Labels, open_faces: Faces, structure: Array) -> Labels:
    """Ids present on the open faces of ``labels`` (z faces do not cut segments of single z-slices)."""
    found = [np.zeros(0, np.int64)]
    flat = not structure[0].any()
    for axis, sides in enumerate(open_faces):
        for side, is_open in zip((0, -1), sides):
            if is_open and not (flat and axis == 0):
                found.append(np.unique(np.take(labels, side, axis=axis)))
    return np.unique(np.concatenate(found))


def _consecutive(labels: Labels) -> Labels:
    """Ids renumbered 1, 2, ... in order of value (0 stays 0)."""
    values, inverse = np.unique(labels, return_inverse=True)
    new = np.arange(values.size, dtype=np.int64) + (0 if values.size and values[0] == 0 else 1)
    out: Labels = new[inverse.reshape(labels.shape)]
    return out


# ----------------------------------------------------------------------------------------------- agglomerate
def _edge_means(fragments: Labels, aff: Array, flat: bool) -> tuple[Labels, Labels, NDArray[np.float64],
                                                                       NDArray[np.float64]]:
    """Pairs ``(a < b)`` of adjacent fragments with the sum and count of the affinities of the edges between them."""
    n = int(fragments.max()) + 1
    keys, values = [], []
    for axis in range(1 if flat else 0, 3):
        later, earlier = _later_earlier(axis)
        a, b = fragments[later].ravel(), fragments[earlier].ravel()
        cross = (a != b) & (a > 0) & (b > 0)
        lo, hi = np.minimum(a[cross], b[cross]), np.maximum(a[cross], b[cross])
        keys.append(lo * n + hi)
        values.append(np.asarray(aff[axis], np.float64)[later].ravel()[cross])
    key = np.concatenate(keys)
    unique, inverse = np.unique(key, return_inverse=True)
    sums = np.bincount(inverse, weights=np.concatenate(values), minlength=unique.size).astype(np.float64)
    counts = np.bincount(inverse, minlength=unique.size).astype(np.float64)
    first: Labels = (unique // n).astype(np.int64)
    second: Labels = (unique % n).astype(np.int64)
    return first, second, sums, counts


def _pooled_edge(graph: Any, src: int, dst: int, neighbour: int) -> dict[str, float]:
    """The edge of a merged region to ``neighbour``: its voxel edges' affinities pooled (sum and count)."""
    total = count = 0.0
    for node in (src, dst):
        if graph.has_edge(node, neighbour):
            data = graph[node][neighbour]
            total, count = total + data["total"], count + data["count"]
    return {"total": total, "count": count, "weight": 1.0 - total / count}


def _no_op(graph: Any, src: int, dst: int) -> None:
    """merge_hierarchical's hook before a merge: the edges carry everything the weights need."""


def agglomerate(fragments: Labels, aff: Array, threshold: float, flat: bool) -> Labels:
    """Merge adjacent ``fragments`` (ids 1..n) while the mean affinity of the voxel edges between two regions is
    above ``threshold`` (highest first); returns ids consecutive from 1 (0 stays 0)."""
    from skimage.graph import RAG, merge_hierarchical

    n = int(fragments.max()) if fragments.size else 0
    if n < 2:
        return fragments
    a, b, sums, counts = _edge_means(fragments, aff, flat)
    graph = RAG()
    for node in range(1, n + 1):
        graph.add_node(node, labels=[node])
    for u, v, total, count in zip(a.tolist(), b.tolist(), sums.tolist(), counts.tolist()):
        graph.add_edge(u, v, total=total, count=count, weight=1.0 - total / count)
    # merged while 1 - mean < 1 - threshold; the labels given are the ids themselves, so the result is the map
    merged = merge_hierarchical(np.arange(n + 1), graph, 1.0 - threshold, rag_copy=False, in_place_merge=True,
                                merge_func=_no_op, weight_func=_pooled_edge)
    table = np.asarray(merged, np.int64) + 1
    table[0] = 0
    out: Labels = table[fragments]
    return _consecutive(out)


# ------------------------------------------------------------------------------------------------- segment
def segment(pred: Array, method: Method, open_faces: Faces = NO_FACES) -> Labels:
    """The segmentation ``(Z, Y, X)`` (int64 ids consecutive from 1) of a boundary prediction (``(Z, Y, X)``,
    ``(1, Z, Y, X)`` or ZNN's ``(2, Z, Y, X)``) or an affinity map ``(3, Z, Y, X)``, by ``method``.
    ``open_faces``: faces of the array cut from a larger volume (blockwise runs; see the module notes)."""
    fragments, raw = watershed_fragments(pred, method, open_faces)
    return merge_fragments(fragments, pred, raw, method)


def watershed_fragments(pred: Array, method: Method, open_faces: Faces = NO_FACES) -> tuple[Labels, Array]:
    """Steps 1-4 of the module notes: the fragments, and the unsmoothed height map (what step 5 reads of a
    boundary map). They do not depend on ``method.merge_threshold``."""
    raw = height_map(pred, method)
    height = _smooth(raw, method)
    return seeded_watershed(height, seeds(pred, height, method), method, open_faces), raw


def merge_fragments(fragments: Labels, pred: Array, height: Array, method: Method) -> Labels:
    """Step 5 of the module notes on :func:`watershed_fragments`' result (``fragments`` as they are where
    ``method.merge_threshold`` merges nothing)."""
    if method.merge_threshold >= NO_MERGE:
        return fragments
    return agglomerate(fragments, edge_affinities(pred, height, method), method.merge_threshold, method.flat)


# -------------------------------------------------------------------------------------------------- stitching
def offset_ids(labels: Array, offset: int) -> NDArray[np.uint64]:
    """``labels`` as uint64 with ``offset`` added to every id > 0 (0 stays 0)."""
    ids = np.asarray(labels).astype(np.uint64)
    out: NDArray[np.uint64] = np.where(ids > 0, ids + np.uint64(offset), np.uint64(0))
    return out


def face_pairs(first: Array, second: Array) -> NDArray[np.uint64]:
    """Pairs ``(a, b)`` of ids of two labellings of the same voxels (a slab across the face between two blocks, as
    each block labelled it) that are one object: more than half of ``a``'s voxels in the slab carry ``b`` *and* more
    than half of ``b``'s carry ``a``, so each id pairs with at most one. An object that one block saw whole and the
    other saw merged with a neighbour (its seed or basin lay outside that block's halo) then stays apart rather than
    merging the two (on ISBI 2012 in blocks of 128 x 128 voxels this gave a fifth of the false merges that pairing by
    either side's majority gave). Returns an ``(n, 2)`` array; voxels with id 0 on either side are ignored."""
    a, b = np.asarray(first).ravel(), np.asarray(second).ravel()
    if a.shape != b.shape:
        raise ShapeError(f"the two slabs of a face differ in size: {np.shape(first)} and {np.shape(second)}")
    keep = (a > 0) & (b > 0)
    a, b = a[keep].astype(np.uint64), b[keep].astype(np.uint64)
    if a.size == 0:
        return np.zeros((0, 2), np.uint64)
    pairs, overlap = np.unique(np.stack([a, b], axis=1), axis=0, return_counts=True)
    ids_a, size_a = np.unique(a, return_counts=True)
    ids_b, size_b = np.unique(b, return_counts=True)
    of_a = size_a[np.searchsorted(ids_a, pairs[:, 0])]
    of_b = size_b[np.searchsorted(ids_b, pairs[:, 1])]
    joined: NDArray[np.uint64] = pairs[(2 * overlap > of_a) & (2 * overlap > of_b)]
    return joined


def join_pairs(pairs: Array) -> tuple[NDArray[np.uint64], NDArray[np.uint64]]:
    """``(ids, roots)``: every id of ``pairs`` (``(n, 2)``), sorted, and the smallest id of the object it belongs to
    (pairs joined transitively: connected components of the graph whose edges are the pairs)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = np.asarray(pairs, np.uint64).reshape(-1, 2)
    ids, inverse = np.unique(pairs, return_inverse=True)
    inverse = inverse.reshape(pairs.shape)
    graph = coo_matrix((np.ones(len(pairs), np.int8), (inverse[:, 0], inverse[:, 1])), shape=(ids.size, ids.size))
    _, component = connected_components(graph, directed=False)
    smallest = np.full(component.max() + 1 if ids.size else 0, np.iinfo(np.uint64).max, np.uint64)
    np.minimum.at(smallest, component, ids)  # ids are sorted, so this is the first id of each component
    roots: NDArray[np.uint64] = smallest[component]
    return ids, roots


def relabel(labels: Array, ids: Array, roots: Array) -> NDArray[np.uint64]:
    """``labels`` with each id of the sorted ``ids`` replaced by its ``roots`` entry (other ids kept). Applying it
    twice changes nothing when every root maps to itself (as :func:`join_pairs` gives), so a relabelling that was
    interrupted after writing a block and before recording it may run again."""
    labels = np.asarray(labels, np.uint64)
    ids, roots = np.asarray(ids, np.uint64), np.asarray(roots, np.uint64)
    if ids.size == 0:
        return labels
    where = np.clip(np.searchsorted(ids, labels), 0, ids.size - 1)
    found = ids[where] == labels
    out: NDArray[np.uint64] = np.where(found, roots[where], labels)
    return out


def same_partition(first: Array, second: Array) -> bool:
    """Whether two labellings of the same voxels are equal up to a renaming of ids (one to one; 0 only to 0)."""
    a, b = np.asarray(first).ravel(), np.asarray(second).ravel()
    if a.shape != b.shape or not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a.astype(np.uint64), b.astype(np.uint64)], axis=1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))
