"""MALIS weights for 3-channel affinity graphs (Turaga et al. 2009), as computed by ZNN's ``zalis``.

Graph: every voxel of a ``(Z, Y, X)`` volume is a node; ``affinity[c, z, y, x]`` (c = 0, 1, 2 for z, y, x) is
the edge between voxel ``(z, y, x)`` and its predecessor along axis c (``(z-1, y, x)`` for c = 0, ...), so the
first slice of each channel along its own axis has no edge and always gets weight 0. This is ZNN's layout
(``src/include/flow_graph/computation/zalis.hpp`` and ``python/cost_fn.py`` in seung-lab/znn-release).

Kruskal on the edges in order of decreasing affinity builds the maximin spanning forest; the edge that merges
components A and B is the maximin edge of every voxel pair (a in A, b in B). For each such edge ZNN counts,
over pairs of non-boundary voxels (ground-truth id != 0):

- ``merger`` weight: pairs with different ids (a false merge if the edge is high),
- ``splitter`` weight: pairs with the same id (a false split if the edge is low),

and the MALIS weight of the edge is their sum. Pairs involving a boundary voxel (id 0) count for neither.
Normalisations (job-file key ``malis_norm_type``): ``none``; ``frac`` (each voxel counts as 1 / size of its
ground-truth segment in the patch, so every segment has the same total); ``num`` (divide by N, the number of
non-boundary voxels); ``pair`` (divide by N (N - 1)).

Implementation: only the edges of the maximum spanning forest ever merge, so SciPy's C minimum spanning tree
(on edge *ranks*, exact and free of the zero-weight-means-no-edge rule) selects them; then a Python union-find
replays those V - 1 merges in order, keeping for each component a small ``{segment id: count}`` table merged
small-into-large. Unlike ZNN no affinity threshold drops edges (ZNN passes ``low = 0`` for probabilities), so
the weights depend only on the order of the affinities: probabilities or logits give the same weights.
"""

from __future__ import annotations

from typing import Any, NamedTuple, get_args

import numpy as np
from numpy.typing import NDArray
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import minimum_spanning_tree

from znn.errors import ConfigError, ShapeError, closest
from znn.types import MalisNorm, Triple

__all__ = ["malis_weights", "MalisInfo", "affinity_edges", "NORM_TYPES"]

Array = NDArray[Any]
NormType = MalisNorm
NORM_TYPES: tuple[NormType, ...] = get_args(NormType)


class MalisInfo(NamedTuple):
    """Extra results of :func:`malis_weights`; arrays have the affinity's ``(3, Z, Y, X)`` shape."""

    merger: Array  #: merger part of the weights (normalised like the weights)
    splitter: Array  #: splitter part of the weights (normalised like the weights)
    rand_error: float  #: ZNN's MALIS Rand error: mis-joined pairs at threshold 0.5 / (N (N - 1) / 2)
    n_nonboundary: int  #: N, the number of voxels with a non-zero ground-truth id


def affinity_edges(shape: Triple) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """All edges of the affinity graph of a ``(Z, Y, X)`` volume.

    Returns ``(flat_affinity_index, voxel_a, voxel_b)``: the flat index into the ``(3, Z, Y, X)`` affinity array
    and the flat indices of the predecessor voxel and of the voxel the affinity is stored at.
    """
    voxels = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    n = voxels.size
    parts = []
    for c in range(3):
        later = [slice(None)] * 3
        earlier = [slice(None)] * 3
        later[c] = slice(1, None)
        earlier[c] = slice(None, -1)
        b = voxels[tuple(later)].ravel()
        parts.append((c * n + b, voxels[tuple(earlier)].ravel(), b))
    flat, voxel_a, voxel_b = (np.concatenate(p) for p in zip(*parts))
    return flat, voxel_a, voxel_b


def malis_weights(
    affinity_pred: Array,
    segmentation: Array,
    norm_type: NormType = "none",
    threshold: float = 0.5,
) -> tuple[Array, MalisInfo]:
    """MALIS weight of every affinity edge; returns ``(weights (3, Z, Y, X), MalisInfo)``.

    ``affinity_pred`` is the predicted ``(3, Z, Y, X)`` affinity graph (channels z, y, x); ``segmentation`` is the
    ground-truth ``(Z, Y, X)`` (or ``(1, Z, Y, X)``) id volume, 0 for boundary. ``threshold`` only enters the
    Rand error (ZNN uses 0.5 on probabilities). Weights have the affinity's dtype. Ties between equal
    affinities are broken by edge order (channel, z, y, x), so the result is deterministic.
    """
    seg = _check(affinity_pred, segmentation, norm_type)
    shape = seg.shape
    flat_aff, va, vb = affinity_edges(shape)
    aff = affinity_pred.ravel()[flat_aff]
    order = _forest_edges(aff, va, vb, seg.size)
    counts = _replay(order, aff, va, vb, seg.ravel(), norm_type == "frac", threshold)
    merge, split, false_pairs = counts
    n_nb = int(np.count_nonzero(seg))
    scale = _norm_scale(norm_type, n_nb)
    merger = np.zeros(affinity_pred.size, dtype=np.float64)
    splitter = np.zeros(affinity_pred.size, dtype=np.float64)
    merger[flat_aff[order]] = merge * scale
    splitter[flat_aff[order]] = split * scale
    dtype = affinity_pred.dtype
    merger_a = merger.reshape(affinity_pred.shape).astype(dtype)
    splitter_a = splitter.reshape(affinity_pred.shape).astype(dtype)
    n_pairs = n_nb * (n_nb - 1) / 2
    rand_error = false_pairs / n_pairs if n_pairs > 0 else 0.0
    weights = (merger + splitter).reshape(affinity_pred.shape).astype(dtype)
    return weights, MalisInfo(merger_a, splitter_a, float(rand_error), n_nb)


def _check(affinity_pred: Array, segmentation: Array, norm_type: str) -> NDArray[np.int64]:
    if norm_type not in NORM_TYPES:
        raise ConfigError(f"malis_norm_type {norm_type!r} is not valid; {closest(norm_type, NORM_TYPES)}")
    seg = segmentation[0] if segmentation.ndim == 4 and segmentation.shape[0] == 1 else segmentation
    if affinity_pred.ndim != 4 or affinity_pred.shape[0] != 3 or seg.shape != affinity_pred.shape[1:]:
        raise ShapeError(
            f"MALIS needs a (3, Z, Y, X) affinity graph and a (Z, Y, X) segmentation of the same volume, got "
            f"affinity {affinity_pred.shape} and segmentation {segmentation.shape}"
        )
    if not np.issubdtype(seg.dtype, np.integer):
        if np.any(seg != np.round(seg)):
            raise ShapeError("segmentation must hold integer ids (0 = boundary); got fractional values")
    return np.ascontiguousarray(seg, dtype=np.int64)


def _norm_scale(norm_type: str, n_nb: int) -> float:
    if norm_type == "num" and n_nb > 0:
        return 1.0 / n_nb
    if norm_type == "pair" and n_nb > 1:
        return 1.0 / (n_nb * (n_nb - 1))
    return 1.0


def _forest_edges(aff: Array, va: NDArray[np.int64], vb: NDArray[np.int64], n_vox: int) -> NDArray[np.int64]:
    """Indices (into the edge list) of the maximum spanning forest, sorted by decreasing affinity."""
    if aff.size == 0:
        return np.zeros(0, dtype=np.int64)
    # rank 1 = highest affinity; stable sort breaks ties by edge order. Ranks are exact positive integers, so
    # the minimum spanning tree on ranks is the maximum spanning tree on affinities and no edge reads as absent.
    by_affinity = np.argsort(-aff.astype(np.float64), kind="stable")
    rank = np.empty(aff.size, dtype=np.float64)
    rank[by_affinity] = np.arange(1, aff.size + 1)
    graph = coo_matrix((rank, (va, vb)), shape=(n_vox, n_vox)).tocsr()
    tree = minimum_spanning_tree(graph).tocoo()
    # map the kept ranks back to edges and replay them from the highest affinity down
    kept: NDArray[np.int64] = np.sort(tree.data.astype(np.int64))
    return by_affinity[kept - 1]


def _replay(
    order: NDArray[np.int64],
    aff: Array,
    va: NDArray[np.int64],
    vb: NDArray[np.int64],
    seg: NDArray[np.int64],
    frac: bool,
    threshold: float,
) -> tuple[NDArray[np.float64], NDArray[np.float64], float]:
    """Union-find over the forest edges in order; returns per-edge merger and splitter counts and false pairs.

    Each component keeps ``{id: amount}`` over its non-boundary voxels (amount = count, or count / segment size
    for ``frac``) and the total amount. At a merge of A and B:
    ``same = sum_id A[id] B[id]`` and ``diff = total_A total_B - same``.
    """
    ids, sizes = np.unique(seg[seg != 0], return_counts=True)
    unit = {int(i): (1.0 / float(s) if frac else 1.0) for i, s in zip(ids, sizes)}
    parent = list(range(seg.size))
    table: dict[int, dict[int, float]] = {}
    total: dict[int, float] = {}
    for v, s in enumerate(seg.tolist()):
        if s != 0:
            table[v] = {s: unit[s]}
            total[v] = unit[s]
    merge = np.zeros(order.size, dtype=np.float64)
    split = np.zeros(order.size, dtype=np.float64)
    false_pairs = 0.0

    def find(v: int) -> int:
        while parent[v] != v:
            parent[v] = parent[parent[v]]  # path halving
            v = parent[v]
        return v

    a_list, b_list, aff_list = va[order].tolist(), vb[order].tolist(), aff[order].tolist()
    for k in range(order.size):
        ra, rb = find(a_list[k]), find(b_list[k])
        ta, tb = table.get(ra), table.get(rb)
        if ta is not None and tb is not None:
            small, large = (ta, tb) if len(ta) <= len(tb) else (tb, ta)
            same = sum(amount * large[i] for i, amount in small.items() if i in large)
            diff = total[ra] * total[rb] - same
            merge[k], split[k] = diff, same
            if aff_list[k] > threshold:
                false_pairs += diff
            elif aff_list[k] < threshold:
                false_pairs += same
        _union(parent, table, total, ra, rb)
    return merge, split, false_pairs


def _union(
    parent: list[int], table: dict[int, dict[int, float]], total: dict[int, float], ra: int, rb: int
) -> None:
    """Join the two roots; the root with the larger table survives so merging tables is small-into-large."""
    ta, tb = table.get(ra, {}), table.get(rb, {})
    if len(ta) < len(tb):
        ra, rb, ta, tb = rb, ra, tb, ta
    parent[rb] = ra
    if tb:
        for i, amount in tb.items():
            ta[i] = ta.get(i, 0.0) + amount
        table[ra] = ta
        total[ra] = total.get(ra, 0.0) + total.pop(rb)
        del table[rb]
