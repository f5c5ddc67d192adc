"""`znn evaluate PRED LABELS`: pixel error, Rand error and VOI of a prediction volume against ground truth.

PRED and LABELS are volume paths (tif, h5[:/dataset], zarr). Boundary predictions: ``(Z, Y, X)`` or
``(1, Z, Y, X)`` boundary probability, or ZNN's two-channel ``(2, Z, Y, X)`` output whose channel 1 is the
boundary; ``--nonboundary`` reads a one-channel map as P(non-boundary) (ZNN's ``one_class`` output).
Affinity predictions: ``(3, Z, Y, X)``. ``--type segmentation``: PRED is a segmentation (ids, 0 = boundary, e.g.
the labels of `znn segment`), scored directly (Rand error and VOI). LABELS: a segmentation (0 = boundary) or
ISBI-style 0/255 labels. Conventions are those of :mod:`znn.ops.metrics`.

A prediction is segmented by a threshold and connected components; ``segment = "watershed"`` also segments it by
`znn segment`'s method (:func:`znn.ops.segment.segment`, the whole volume at once) and reports both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from znn.errors import ConfigError, NonFiniteError, ShapeError, VolumeError, closest
from znn.io.finite import find_non_finite, in_file
from znn.io.samples import center_crop
from znn.io.volume import read_volume
from znn.ops.metrics import METRICS, evaluate, evaluate_segmentation
from znn.ops.segment import NO_MERGE, Method, segment
from znn.text import format_table

__all__ = ["EvaluateRequest", "EvaluateReport", "evaluate_files", "read_inputs", "as_prediction", "PRED_TYPES",
           "SEGMENT_METHODS"]


BOUNDARY_TYPES = ("boundary", "affinity")
PRED_TYPES = (*BOUNDARY_TYPES, "segmentation")
SEGMENT_DIMS = ("2d", "3d")
SEGMENT_METHODS = ("threshold", "watershed")
CROP_FIX = "pass --crop to compare the central common region"  # what differing shapes call for


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
    segment: str = "threshold"  # watershed: also segment a prediction by `znn segment`'s method
    settings: Mapping[str, float] = field(default_factory=dict)  # the method's settings (over its defaults)

    def method(self) -> Method:
        """`znn segment`'s method for this prediction."""
        return Method.of(self.out_type, self.dims, self.nonboundary, **self.settings)


@dataclass(frozen=True)
class EvaluateReport:
    """The scores and the line that says what was compared; ``segmented``: the scores of the watershed
    segmentation beside those of the threshold (``segment = "watershed"``)."""

    heading: str
    scores: dict[str, float]
    segmented: dict[str, float] | None = None

    def text(self) -> str:
        if self.segmented is None:
            return self.heading + "\n" + _table({"value": self.scores})
        return self.heading + "\n" + _table({"threshold": self.scores, "watershed": self.segmented})


def evaluate_files(req: EvaluateRequest) -> EvaluateReport:
    """Read prediction, labels (and mask), check their shapes, score them, write ``json_out`` when given."""
    if req.segment not in SEGMENT_METHODS:
        raise ConfigError(f"segment {req.segment!r} is not valid; {closest(req.segment, SEGMENT_METHODS)}")
    if req.out_type not in PRED_TYPES:
        raise ConfigError(f"type {req.out_type!r} is not valid; {closest(req.out_type, PRED_TYPES)}")
    if req.json_out:
        _check_json_place(req)
    method = req.method() if req.segment == "watershed" and req.out_type != "segmentation" else None
    pred, labels, mask = read_inputs(req)
    dims = req.dims or ("3d" if req.out_type == "affinity" else "2d")
    size = "x".join(map(str, labels.shape))
    if req.out_type == "segmentation":
        result = evaluate_segmentation(pred[0], labels, dims, mask)
        report = EvaluateReport(f"{req.pred} vs {req.labels}: segmentation, {dims}, {size} voxels", result)
    else:
        result = evaluate(pred, labels, req.out_type, threshold=req.threshold, dims=dims, mask=mask,
                          one_channel="nonboundary" if req.nonboundary else "boundary")
        segmented = None if method is None else evaluate_segmentation(segment(pred, method), labels, dims, mask)
        how = "" if method is None else f" / watershed ({_describe(method)})"
        report = EvaluateReport(f"{req.pred} vs {req.labels}: {req.out_type}, threshold {req.threshold:g}{how}, "
                                f"{dims}, {size} voxels", result, segmented)
    if req.json_out:
        _write_json(req, dims, report)
    return report


def _describe(method: Method) -> str:
    text = f"seed threshold {method.seed_threshold:g}, min size {method.min_size}, sigma {method.sigma:g}"
    return text + (f", merge threshold {method.merge_threshold:g}" if method.merge_threshold < NO_MERGE else "")


def read_inputs(req: EvaluateRequest, shape_fix: str = CROP_FIX) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Prediction ``(C, Z, Y, X)``, labels and mask ``(Z, Y, X)``, cropped when asked, their shapes checked;
    ``shape_fix``: what the error of differing shapes tells the user to do."""
    labels = _zyx(_finite_volume(req.labels, "labels"), req.labels, "labels")
    pred = as_prediction(_finite_volume(req.pred, "prediction"), labels.shape, req.pred)
    mask = _zyx(_finite_volume(req.mask, "mask"), req.mask, "mask") if req.mask else None
    if req.crop:
        shape = tuple(min(s) for s in zip(pred.shape[1:], labels.shape, *([mask.shape] if mask is not None else [])))
        pred, labels = center_crop(pred, shape), center_crop(labels, shape)
        mask = center_crop(mask, shape) if mask is not None else None
    _check_shapes(req, pred, labels, mask, shape_fix)
    return pred, labels, mask


def _finite_volume(path: str, what: str) -> np.ndarray:
    """The volume at ``path``; NonFiniteError naming its first NaN or infinite voxel (a score of a NaN prediction
    would look like a score)."""
    volume = read_volume(path)
    found = find_non_finite(volume)
    if found is not None:
        raise NonFiniteError(f"{path}: the {what} holds {in_file(found, path).describe()}; nothing to score. "
                             "Check the run that wrote it (or replace them, e.g. with numpy.nan_to_num)")
    return volume


def _check_shapes(req: EvaluateRequest, pred: np.ndarray, labels: np.ndarray, mask: np.ndarray | None,
                  shape_fix: str) -> None:
    if pred.shape[1:] != labels.shape or (mask is not None and mask.shape != labels.shape):
        extra = f", mask {req.mask} {mask.shape}" if mask is not None else ""
        raise ShapeError(f"prediction {req.pred} has spatial shape {pred.shape[1:]} (channels {pred.shape[0]}) but "
                         f"labels {req.labels} have shape {labels.shape}{extra}; {shape_fix}")
    channels = pred.shape[0]
    if req.out_type == "segmentation" and channels != 1:
        raise ShapeError(f"{req.pred} has {channels} channels; a segmentation is one (Z, Y, X) volume of ids")
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


def _write_json(req: EvaluateRequest, dims: str, report: EvaluateReport) -> None:
    record: dict[str, Any] = {"pred": str(req.pred), "labels": str(req.labels), "type": req.out_type,
                              "threshold": req.threshold, "dims": dims, **_plain(report.scores)}
    if report.segmented is not None:
        method = req.method()
        record["watershed"] = {**asdict(method), "dims": method.resolved_dims, **_plain(report.segmented)}
    try:
        out = Path(str(req.json_out))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
    except OSError as exc:
        raise VolumeError(f"{req.json_out}: cannot write the JSON results ({exc.strerror})") from None


def _plain(scores: Mapping[str, float]) -> dict[str, float | None]:
    """Scores for JSON: NaN (nothing to count) as null."""
    return {k: (None if math.isnan(v) else v) for k, v in scores.items()}


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


def _table(columns: Mapping[str, dict[str, float]]) -> str:
    """One row per metric that some column has, one column per set of scores."""
    rows = [[k, *(f"{scores[k]:.4f}" if k in scores else "-" for scores in columns.values())]
            for k in METRICS if any(k in scores for scores in columns.values())]
    table = format_table(["metric", *columns], rows)
    return "\n".join("  " + line for line in table.split("\n"))  # indented under the heading
