"""`znn evaluate PRED LABELS`: pixel error, Rand error and VOI of a prediction volume against ground truth.

PRED and LABELS are volume paths (tif, h5[:/dataset], zarr). Boundary predictions: ``(Z, Y, X)`` or
``(1, Z, Y, X)`` boundary probability, or ZNN's two-channel ``(2, Z, Y, X)`` output whose channel 1 is the
boundary; ``--nonboundary`` reads a one-channel map as P(non-boundary) (ZNN's ``one_class`` output).
Affinity predictions: ``(3, Z, Y, X)``. LABELS: a segmentation (0 = boundary) or ISBI-style 0/255 labels.
Conventions are those of :mod:`znn.ops.metrics`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from znn.errors import NonFiniteError, ShapeError, VolumeError
from znn.io.finite import find_non_finite, in_file
from znn.io.samples import center_crop
from znn.io.volume import read_volume
from znn.ops.metrics import METRICS, evaluate
from znn.text import format_table

__all__ = ["EvaluateRequest", "EvaluateReport", "evaluate_files", "as_prediction"]


BOUNDARY_TYPES = ("boundary", "affinity")
SEGMENT_DIMS = ("2d", "3d")


@dataclass(frozen=True)
class EvaluateRequest:
    """What `znn evaluate` (and a workflow's ``evaluate`` step) scores: the options of both, defined once."""

    pred: str
    labels: str
    out_type: str = "boundary"
    threshold: float = 0.5
    dims: Literal["2d", "3d"] | None = None  # 2d (per slice) or 3d; default 2d for boundary, 3d for affinity
    mask: str | None = None
    nonboundary: bool = False
    crop: bool = False
    json_out: str | None = None


@dataclass(frozen=True)
class EvaluateReport:
    """The scores and the line that says what was compared."""

    heading: str
    scores: dict[str, float]

    def text(self) -> str:
        return self.heading + "\n" + _table(self.scores)


def evaluate_files(req: EvaluateRequest) -> EvaluateReport:
    """Read prediction, labels (and mask), check their shapes, score them, write ``json_out`` when given."""
    if req.json_out:
        _check_json_place(req)
    labels = _zyx(_finite_volume(req.labels, "labels"), req.labels, "labels")
    pred = as_prediction(_finite_volume(req.pred, "prediction"), labels.shape, req.pred)
    mask = _zyx(_finite_volume(req.mask, "mask"), req.mask, "mask") if req.mask else None
    if req.crop:
        shape = tuple(min(s) for s in zip(pred.shape[1:], labels.shape, *([mask.shape] if mask is not None else [])))
        pred, labels = center_crop(pred, shape), center_crop(labels, shape)
        mask = center_crop(mask, shape) if mask is not None else None
    _check_shapes(req, pred, labels, mask)
    result = evaluate(pred, labels, req.out_type, threshold=req.threshold, dims=req.dims, mask=mask,
                      one_channel="nonboundary" if req.nonboundary else "boundary")
    dims = req.dims or ("2d" if req.out_type == "boundary" else "3d")
    heading = (f"{req.pred} vs {req.labels}: {req.out_type}, threshold {req.threshold:g}, {dims}, "
               f"{labels.shape[0]}x{labels.shape[1]}x{labels.shape[2]} voxels")
    if req.json_out:
        _write_json(req, dims, result)
    return EvaluateReport(heading, result)


def _finite_volume(path: str, what: str) -> np.ndarray:
    """The volume at ``path``; NonFiniteError naming its first NaN or infinite voxel (a score of a NaN prediction
    would look like a score)."""
    volume = read_volume(path)
    found = find_non_finite(volume)
    if found is not None:
        raise NonFiniteError(f"{path}: the {what} holds {in_file(found, path).describe()}; nothing to score. "
                             "Check the run that wrote it (or replace them, e.g. with numpy.nan_to_num)")
    return volume


def _check_shapes(req: EvaluateRequest, pred: np.ndarray, labels: np.ndarray, mask: np.ndarray | None) -> None:
    if pred.shape[1:] != labels.shape or (mask is not None and mask.shape != labels.shape):
        extra = f", mask {req.mask} {mask.shape}" if mask is not None else ""
        raise ShapeError(f"prediction {req.pred} has spatial shape {pred.shape[1:]} (channels {pred.shape[0]}) but "
                         f"labels {req.labels} have shape {labels.shape}{extra}; pass --crop to compare the "
                         "central common region")
    channels = pred.shape[0]
    if req.out_type == "affinity" and channels != 3:
        raise ShapeError(f"prediction {req.pred} has {channels} channel(s); an affinity prediction has 3 (z, y, x)")
    if req.out_type == "boundary" and channels not in (1, 2):
        raise ShapeError(f"prediction {req.pred} has {channels} channels; a boundary prediction has 1 (boundary "
                         "probability) or 2 (ZNN binary_class: channel 1 = boundary); use --type affinity for 3")


def _check_json_place(req: EvaluateRequest) -> None:
    """``json_out`` can be written and is none of the volumes read (checked before reading them)."""
    from znn.io.paths import check_apart, check_writable

    out = str(req.json_out)
    check_writable(out, "--json", folder=False)
    inputs = [(what, path) for what, path in (("prediction", req.pred), ("labels", req.labels), ("mask", req.mask))
              if path]
    check_apart([("--json", out)], inputs, "name another file for the JSON results")


def _write_json(req: EvaluateRequest, dims: str, result: dict[str, float]) -> None:
    record: dict[str, Any] = {"pred": str(req.pred), "labels": str(req.labels), "type": req.out_type,
                              "threshold": req.threshold, "dims": dims,
                              **{k: (None if math.isnan(v) else v) for k, v in result.items()}}
    try:
        out = Path(str(req.json_out))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
    except OSError as exc:
        raise VolumeError(f"{req.json_out}: cannot write the JSON results ({exc.strerror})") from None


def as_prediction(pred: np.ndarray, label_shape: tuple[int, ...], name: str = "prediction") -> np.ndarray:
    """A prediction volume as ``(C, Z, Y, X)`` given the labels' ``(Z, Y, X)`` shape.

    2D ``(Y, X)`` is one channel of one slice; 3D is ``(Z, Y, X)`` of one channel, except that with one-slice
    labels a 3D array whose first extent differs from 1 is ``(C, Y, X)``; 4D is ``(C, Z, Y, X)``.
    """
    if pred.ndim == 2:
        return pred[None, None]
    if pred.ndim == 3:
        if label_shape[0] == 1 and pred.shape[0] != 1 and pred.shape[1:] == tuple(label_shape[1:]):
            return pred[:, None]
        return pred[None]
    if pred.ndim == 4:
        return pred
    raise VolumeError(f"{name}: a prediction has 2 to 4 dimensions, got shape {pred.shape}")


def _zyx(arr: np.ndarray, name: str, what: str) -> np.ndarray:
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 4 and arr.shape[0] == 1:
        return np.asarray(arr[0])
    if arr.ndim != 3:
        raise VolumeError(f"{name}: {what} must be one (Z, Y, X) volume or a (Y, X) image, got shape {arr.shape}")
    return arr


def _table(result: dict[str, float]) -> str:
    table = format_table(["metric", "value"], [[k, f"{result[k]:.4f}"] for k in METRICS])
    return "\n".join("  " + line for line in table.split("\n"))  # indented under the heading
