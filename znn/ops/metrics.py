"""Evaluation of boundary and affinity predictions: pixel error, segmentation by thresholding, Rand error, VOI.

Conventions:

- **Predictions.** A boundary prediction is a boundary probability ``(Z, Y, X)`` or ``(1, Z, Y, X)``, or ZNN's
  two-channel ``binary_class`` output ``(2, Z, Y, X)`` whose **channel 1** is the boundary (channel 0 is
  ``label > 0``, see :mod:`znn.ops.preprocess`). A one-channel map trained on ZNN's ``one_class`` labels holds
  the *non-boundary* probability: pass ``one_channel="nonboundary"``. An affinity prediction is ``(3, Z, Y, X)``
  (z, y, x), ``aff[c, v]`` linking ``v`` to its predecessor along axis ``c`` (as :mod:`znn.ops.malis`).
- **Ground truth.** Labels are a segmentation (0 = boundary, > 0 = object id) or ISBI-style (0 = membrane,
  255 = interior). Labels with a single non-zero value are turned into a segmentation by connected components
  of the non-zero voxels (per slice in 2D mode). The boundary target is ``labels == 0``.
- **Segmentation.** A boundary map is thresholded (``prob < threshold`` is inside a cell) and its connected
  components are the segments (4-connected per z-slice in ``"2d"`` mode, ids unique over the stack;
  6-connected in ``"3d"``). An affinity map is segmented by connected components over the edges whose affinity
  is above the threshold (z-edges ignored in ``"2d"``); a voxel with no such edge is boundary (id 0).
- **Scoring.** Rand error and VOI come from scikit-image (``skimage.metrics.adapted_rand_error`` and
  ``variation_of_information``). Voxels with ground-truth id 0 (boundary) are ignored, as in the ISBI 2012 and
  CREMI evaluations. Predicted boundary voxels (id 0) are first given to the nearest segment (Euclidean
  distance, per slice in 2D), as a watershed of a thin predicted boundary would, so they neither merge into one
  "boundary segment" nor count as thousands of singletons; ``fill=False`` keeps them as one segment with id 0.
  In 2D mode ground-truth ids are also made unique per slice, so the scores pool per-slice pairs.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from znn.errors import ConfigError, ShapeError, closest
from znn.ops.malis import affinity_edges
from znn.ops.preprocess import affinity, affinity_mask, as_zyx, segmentation_ids
from znn.types import Triple

__all__ = [
    "pixel_error",
    "boundary_probability",
    "segment_boundary_map",
    "segment_affinity_map",
    "fill_boundary",
    "gt_segmentation",
    "adapted_rand_error",
    "variation_of_information",
    "evaluate",
    "evaluate_segmentation",
    "METRICS",
]

Array = NDArray[Any]
Dims = Literal["2d", "3d"]
METRICS = ("pixel_error", "rand_error", "rand_precision", "rand_recall", "voi_split", "voi_merge")
_STRUCT_2D: Array = ndimage.generate_binary_structure(3, 1) * np.array([0, 1, 0])[:, None, None].astype(bool)
_STRUCT_3D: Array = ndimage.generate_binary_structure(3, 1)


def pixel_error(prob_boundary: Array, label_boundary: Array, mask: Array | None = None,
                threshold: float = 0.5) -> float:
    """Fraction of valid voxels where ``prob_boundary > threshold`` disagrees with ``label_boundary > 0.5``.

    Shapes must match (``mask``, > 0 valid, broadcasts); returns 0.0 when no voxel is valid.
    """
    prob, label = np.asarray(prob_boundary), np.asarray(label_boundary)
    if prob.shape != label.shape:
        raise ShapeError(f"prediction shape {prob.shape} does not match label shape {label.shape}")
    wrong = (prob > threshold) != (label > 0.5)
    if mask is None:
        return float(wrong.mean()) if wrong.size else 0.0
    try:
        valid = np.broadcast_to(np.asarray(mask) > 0, wrong.shape)
    except ValueError:
        raise ShapeError(f"mask shape {np.shape(mask)} does not broadcast to {wrong.shape}") from None
    n = int(valid.sum())
    return float((wrong & valid).sum() / n) if n else 0.0


def boundary_probability(pred: Array, one_channel: str = "boundary") -> Array:
    """The boundary probability ``(Z, Y, X)`` of a boundary prediction (see the module notes)."""
    pred = np.asarray(pred)
    if one_channel not in ("boundary", "nonboundary"):
        choices = ("boundary", "nonboundary")
        raise ConfigError(f"one_channel {one_channel!r} is not valid; {closest(one_channel, choices)}")
    if pred.ndim == 4 and pred.shape[0] == 2:
        boundary: Array = pred[1]
        return boundary
    if pred.ndim == 4 and pred.shape[0] == 1:
        pred = pred[0]
    if pred.ndim != 3:
        raise ShapeError(f"a boundary prediction is (Z, Y, X), (1, Z, Y, X) or (2, Z, Y, X) (channel 1 = boundary); "
                         f"got shape {pred.shape}")
    return pred if one_channel == "boundary" else 1 - pred


def segment_boundary_map(prob: Array, threshold: float = 0.5, dims: Dims = "3d") -> NDArray[np.int64]:
    """Connected components of ``prob < threshold`` (``(Z, Y, X)`` boundary probability); boundary is 0.

    ``dims="2d"`` labels each z-slice on its own (4-connectivity), ids unique over the stack; ``"3d"`` uses
    6-connectivity. Ids are consecutive from 1.
    """
    inside = as_zyx(prob, "boundary probability") < threshold
    seg, _ = ndimage.label(inside, structure=_structure(dims))
    ids: NDArray[np.int64] = seg.astype(np.int64)
    return ids


def segment_affinity_map(aff: Array, threshold: float = 0.5, dims: Dims = "3d") -> NDArray[np.int64]:
    """Connected components of the graph of voxels joined by edges with affinity ``> threshold``.

    ``aff`` is ``(3, Z, Y, X)``; ``dims="2d"`` ignores the z-edges. Voxels with no such edge get 0 (boundary);
    the others get consecutive ids from 1, in order of their first voxel.
    """
    aff = np.asarray(aff)
    if aff.ndim != 4 or aff.shape[0] != 3:
        raise ShapeError(f"an affinity map is (3, Z, Y, X) (channels z, y, x); got shape {aff.shape}")
    _check_dims(dims)
    shape: Triple = (aff.shape[1], aff.shape[2], aff.shape[3])
    flat, va, vb = affinity_edges(shape)
    keep = aff.ravel()[flat] > threshold
    if dims == "2d":
        keep &= flat >= int(np.prod(shape))  # channel 0 (z) occupies the first Z*Y*X entries
    n = int(np.prod(shape))
    graph = coo_matrix((np.ones(int(keep.sum()), dtype=np.int8), (va[keep], vb[keep])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    sizes = np.bincount(comp)
    comp = np.where(sizes[comp] > 1, comp + 1, 0)
    _, ids = np.unique(comp, return_inverse=True)  # consecutive; 0 stays 0 as the smallest value
    seg = ids.reshape(shape).astype(np.int64)
    return seg if np.any(comp == 0) else seg + 1


def fill_boundary(seg: Array, dims: Dims = "3d") -> NDArray[np.int64]:
    """Give every 0 voxel the id of the nearest non-zero voxel (per z-slice in ``"2d"``); all-zero stays zero."""
    seg = segmentation_ids(seg)
    _check_dims(dims)
    out = seg.copy()
    parts = [(slice(z, z + 1),) for z in range(seg.shape[0])] if dims == "2d" else [(slice(None),)]
    for part in parts:
        block = seg[part]
        zero = block == 0
        if zero.all() or not zero.any():
            continue
        index = ndimage.distance_transform_edt(zero, return_distances=False, return_indices=True)
        out[part] = block[tuple(index)]
    return out


def gt_segmentation(labels: Array, dims: Dims = "3d") -> NDArray[np.int64]:
    """Ground-truth ids from labels: binary/ISBI labels become connected components of the non-zero voxels;
    in ``"2d"`` mode ids are made unique per z-slice. 0 stays 0."""
    _check_dims(dims)
    lab = np.asarray(labels)
    lab = lab[0] if lab.ndim == 4 and lab.shape[0] == 1 else lab
    if lab.ndim != 3:
        raise ShapeError(f"labels must be a (Z, Y, X) volume, got shape {lab.shape}")
    if np.unique(lab[lab != 0]).size <= 1:
        components, _ = ndimage.label(lab != 0, structure=_structure(dims))
        component_ids: NDArray[np.int64] = components.astype(np.int64)
        return component_ids
    seg = segmentation_ids(lab)
    if dims == "2d":
        key = np.where(seg != 0, np.arange(seg.shape[0])[:, None, None] * (int(seg.max()) + 1) + seg, 0)
        _, inv = np.unique(key, return_inverse=True)
        seg = inv.reshape(seg.shape) + (0 if np.any(key == 0) else 1)
    ids: NDArray[np.int64] = seg.astype(np.int64)
    return ids


def adapted_rand_error(seg: Array, gt: Array) -> tuple[float, float, float]:
    """``(error, precision, recall)`` of segmentation ``seg`` against ``gt``; voxels with ``gt == 0`` are ignored.

    Over ordered pairs of distinct counted voxels: precision = pairs together in both / pairs together in
    ``seg`` (falls with false merges), recall = pairs together in both / pairs together in ``gt`` (falls with
    false splits), error = 1 - their harmonic mean (skimage's ``adapted_rand_error``, which computes the error).
    Precision and recall are computed here from skimage's contingency table because skimage 0.26 returns them
    in the opposite order to its documentation (scikit-image issue #6485). NaN where no pairs are counted.
    """
    from skimage.metrics import adapted_rand_error as skimage_are
    from skimage.metrics import contingency_table

    seg_ids, gt_ids = _pair(seg, gt)
    if not np.any(gt_ids):
        return float("nan"), float("nan"), float("nan")
    table = contingency_table(gt_ids, seg_ids, ignore_labels=(0,), sparse_type="array")
    n = float(table.sum())
    both = float(table.data @ table.data) - n
    in_gt = float(np.square(np.asarray(table.sum(axis=1)).ravel()).sum()) - n
    in_seg = float(np.square(np.asarray(table.sum(axis=0)).ravel()).sum()) - n
    with np.errstate(divide="ignore", invalid="ignore"):
        error = float(skimage_are(gt_ids, seg_ids, table=table, ignore_labels=(0,))[0])
        precision = float(np.divide(both, in_seg)) if in_seg else float("nan")
        recall = float(np.divide(both, in_gt)) if in_gt else float("nan")
    return error, precision, recall


def variation_of_information(seg: Array, gt: Array) -> tuple[float, float]:
    """``(split, merge)`` = (H(seg | gt), H(gt | seg)) in bits (base-2 logarithm, as skimage computes them);
    voxels with ``gt == 0`` are ignored. Their sum is the variation of information."""
    from skimage.metrics import variation_of_information as skimage_voi

    seg_ids, gt_ids = _pair(seg, gt)
    if not np.any(gt_ids):
        return float("nan"), float("nan")
    split, merge = skimage_voi(gt_ids, seg_ids, ignore_labels=(0,))
    return float(split), float(merge)


def evaluate(
    pred: Array,
    labels: Array,
    out_type: str = "boundary",
    *,
    threshold: float = 0.5,
    dims: Dims | None = None,
    mask: Array | None = None,
    one_channel: str = "boundary",
    fill: bool = True,
) -> dict[str, float]:
    """Pixel error, adapted Rand error (with precision and recall) and VOI split/merge of a prediction.

    ``pred`` is a boundary prediction or an affinity map (module notes), ``labels`` the ``(Z, Y, X)`` ground
    truth, ``mask`` (> 0 valid) an optional ``(Z, Y, X)`` mask. ``dims`` defaults to ``"2d"`` for boundary maps
    (ZNN's boundary networks are 2D) and ``"3d"`` for affinities. Returns a dict with the keys of ``METRICS``.
    """
    if out_type not in ("boundary", "affinity"):
        raise ConfigError(f"out_type {out_type!r} is not valid; {closest(out_type, ('boundary', 'affinity'))}")
    dims = dims or ("2d" if out_type == "boundary" else "3d")
    _check_dims(dims)
    lab = np.asarray(labels)
    lab = lab[0] if lab.ndim == 4 and lab.shape[0] == 1 else lab
    gt = gt_segmentation(lab, dims)
    valid = None if mask is None else as_zyx(mask, "mask") > 0
    if valid is not None and valid.shape != gt.shape:
        raise ShapeError(f"mask shape {valid.shape} does not match label shape {gt.shape}")
    if out_type == "boundary":
        prob = boundary_probability(pred, one_channel)
        if prob.shape != gt.shape:
            raise ShapeError(f"prediction shape {np.shape(pred)} does not match label shape {lab.shape}")
        perr = pixel_error(prob, lab == 0, valid, threshold)
        seg = segment_boundary_map(prob, threshold, dims)
    else:
        aff = np.asarray(pred)
        if aff.ndim != 4 or aff.shape[0] != 3 or aff.shape[1:] != gt.shape:
            raise ShapeError(f"an affinity prediction must be (3, Z, Y, X) over the labels' (Z, Y, X); got "
                             f"prediction {aff.shape} and labels {lab.shape}")
        edge_mask = affinity_mask(np.ones(gt.shape, bool) if valid is None else valid)
        if dims == "2d":
            edge_mask[0] = 0
        perr = pixel_error(aff, affinity(gt), edge_mask, threshold)
        seg = segment_affinity_map(aff, threshold, dims)
    return {"pixel_error": perr, **_segmentation_scores(seg, gt, dims, valid, fill)}


def evaluate_segmentation(seg: Array, labels: Array, dims: Dims = "2d", mask: Array | None = None,
                          fill: bool = True) -> dict[str, float]:
    """Adapted Rand error (with precision and recall) and VOI split/merge of a segmentation ``seg`` (``(Z, Y, X)``
    ids, 0 = boundary) against ``labels``, as :func:`evaluate` scores the segmentation it makes of a prediction.
    In ``"2d"`` mode the ids of ``seg`` are made unique per z-slice too (a 3D object counts once per slice, as the
    ground truth's). Returns a dict with the keys of ``METRICS`` but ``pixel_error``."""
    _check_dims(dims)
    lab = np.asarray(labels)
    lab = lab[0] if lab.ndim == 4 and lab.shape[0] == 1 else lab
    gt = gt_segmentation(lab, dims)
    ids = _ids(as_zyx(seg, "segmentation"), "segmentation")
    if ids.shape != gt.shape:
        raise ShapeError(f"segmentation shape {ids.shape} does not match label shape {gt.shape}")
    valid = None if mask is None else as_zyx(mask, "mask") > 0
    if valid is not None and valid.shape != gt.shape:
        raise ShapeError(f"mask shape {valid.shape} does not match label shape {gt.shape}")
    return _segmentation_scores(_per_slice(ids) if dims == "2d" else ids, gt, dims, valid, fill)


def _per_slice(ids: NDArray[np.int64]) -> NDArray[np.int64]:
    """``ids`` renumbered so that no id occurs in two z-slices (0 stays 0)."""
    _, small = np.unique(ids, return_inverse=True)  # 0 stays 0 when present: it is the smallest id
    small = small.reshape(ids.shape).astype(np.int64) + (0 if np.any(ids == 0) else 1)
    key = np.where(small != 0, np.arange(ids.shape[0])[:, None, None] * (int(small.max()) + 1) + small, 0)
    _, inverse = np.unique(key, return_inverse=True)
    out: NDArray[np.int64] = inverse.reshape(ids.shape).astype(np.int64) + (0 if np.any(key == 0) else 1)
    return out


def _segmentation_scores(seg: Array, gt: NDArray[np.int64], dims: Dims, valid: Array | None,
                         fill: bool) -> dict[str, float]:
    if fill:
        seg = fill_boundary(seg, dims)
    if valid is not None:
        gt = np.where(valid, gt, 0)
    are, prec, rec = adapted_rand_error(seg, gt)
    split, merge = variation_of_information(seg, gt)
    return {"rand_error": are, "rand_precision": prec, "rand_recall": rec, "voi_split": split, "voi_merge": merge}


# --------------------------------------------------------------------------------------------------------------


def _pair(seg: Array, gt: Array) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    s, g = _ids(seg, "segmentation"), _ids(gt, "ground truth")
    if s.shape != g.shape:
        raise ShapeError(f"segmentation shape {s.shape} does not match ground-truth shape {g.shape}")
    return s, g


def _ids(arr: Array, what: str) -> NDArray[np.int64]:
    """Non-negative int64 ids small enough for a contingency table (relabelled when huge or negative)."""
    ids = np.asarray(arr)
    if not np.issubdtype(ids.dtype, np.integer) and not np.issubdtype(ids.dtype, np.bool_):
        if np.any(ids != np.round(ids)):
            raise ShapeError(f"{what} must hold whole-number ids; got fractional values")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() > 4 * ids.size):
        values, inv = np.unique(ids, return_inverse=True)
        new = np.arange(1, values.size + 1, dtype=np.int64)
        new[values == 0] = 0  # 0 (boundary) keeps its meaning
        ids = new[inv].reshape(ids.shape)
    return ids


def _structure(dims: str) -> Array:
    _check_dims(dims)
    return _STRUCT_2D if dims == "2d" else _STRUCT_3D


def _check_dims(dims: str) -> None:
    if dims not in ("2d", "3d"):
        raise ConfigError(f"dims {dims!r} is not valid; write 2d or 3d")
