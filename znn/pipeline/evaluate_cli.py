"""`znn evaluate PRED LABELS`: pixel error, Rand error and VOI of a prediction volume against ground truth.

PRED and LABELS are volume paths (tif, h5[:/dataset], zarr). Boundary predictions: ``(Z, Y, X)`` or
``(1, Z, Y, X)`` boundary probability, or ZNN's two-channel ``(2, Z, Y, X)`` output whose channel 1 is the
boundary; ``--nonboundary`` reads a one-channel map as P(non-boundary) (ZNN's ``one_class`` output).
Affinity predictions: ``(3, Z, Y, X)``. LABELS: a segmentation (0 = boundary) or ISBI-style 0/255 labels.
Conventions are those of :mod:`znn.ops.metrics`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from znn.errors import ShapeError, VolumeError
from znn.io.samples import center_crop
from znn.io.volume import read_volume
from znn.ops.metrics import METRICS, evaluate

__all__ = ["register", "run_evaluate", "as_prediction"]


Handler = Callable[[argparse.Namespace], int]
DESCRIPTION = (
    "Pixel error, adapted Rand error (precision, recall) and VOI (split, merge; bits) of PRED against LABELS "
    "(tif, h5[:/dataset] or zarr). Boundary predictions: a boundary probability (Z,Y,X) or (1,Z,Y,X), or ZNN's "
    "two-channel output (2,Z,Y,X) whose channel 1 is the boundary. Affinity predictions: (3,Z,Y,X), channels z,y,x. "
    "LABELS: a segmentation with 0 = boundary, or 0/255 labels (0 = membrane). Ground-truth boundary voxels are "
    "left out of Rand and VOI; predicted boundary voxels join the nearest segment."
)


def register(sub: argparse._SubParsersAction) -> dict[str, Handler]:  # type: ignore[type-arg]
    p = sub.add_parser("evaluate", help="pixel error, Rand error and VOI of a prediction against labels",
                       description=DESCRIPTION)
    p.add_argument("pred", help="prediction volume (tif, h5[:/dataset], zarr)")
    p.add_argument("labels", help="ground-truth volume: segmentation (0 = boundary) or 0/255 labels")
    p.add_argument("--type", dest="out_type", choices=("boundary", "affinity"), default="boundary",
                   help="what the prediction holds (default boundary)")
    p.add_argument("--threshold", type=_probability, default=0.5, help="binarisation threshold (default 0.5)")
    p.add_argument("--dims", choices=("2d", "3d"), default=None,
                   help="segment per z-slice (2d) or in 3D; default 2d for boundary, 3d for affinity")
    p.add_argument("--mask", help="optional mask volume (> 0 is evaluated)")
    p.add_argument("--nonboundary", action="store_true",
                   help="a one-channel prediction is P(non-boundary) (ZNN one_class), not P(boundary)")
    p.add_argument("--crop", action="store_true",
                   help="centrally crop prediction, labels and mask to their common size (e.g. a prediction "
                        "made without boundary mirroring is smaller by the FOV - 1)")
    p.add_argument("--json", dest="json_out", metavar="OUT.json", help="also write the results as JSON")
    return {"evaluate": run_evaluate}


def run_evaluate(args: argparse.Namespace) -> int:
    labels = _zyx(read_volume(args.labels), args.labels, "labels")
    pred = as_prediction(read_volume(args.pred), labels.shape, args.pred)
    mask = _zyx(read_volume(args.mask), args.mask, "mask") if args.mask else None
    if args.crop:
        shape = tuple(min(s) for s in zip(pred.shape[1:], labels.shape, *([mask.shape] if mask is not None else [])))
        pred, labels = center_crop(pred, shape), center_crop(labels, shape)
        mask = center_crop(mask, shape) if mask is not None else None
    if pred.shape[1:] != labels.shape or (mask is not None and mask.shape != labels.shape):
        extra = f", mask {args.mask} {mask.shape}" if mask is not None else ""
        raise ShapeError(f"prediction {args.pred} has spatial shape {pred.shape[1:]} (channels {pred.shape[0]}) but "
                         f"labels {args.labels} have shape {labels.shape}{extra}; pass --crop to compare the "
                         "central common region")
    channels = pred.shape[0]
    if args.out_type == "affinity" and channels != 3:
        raise ShapeError(f"prediction {args.pred} has {channels} channel(s); an affinity prediction has 3 (z, y, x)")
    if args.out_type == "boundary" and channels not in (1, 2):
        raise ShapeError(f"prediction {args.pred} has {channels} channels; a boundary prediction has 1 (boundary "
                         "probability) or 2 (ZNN binary_class: channel 1 = boundary); use --type affinity for 3")
    result = evaluate(pred, labels, args.out_type, threshold=args.threshold, dims=args.dims, mask=mask,
                      one_channel="nonboundary" if args.nonboundary else "boundary")
    dims = args.dims or ("2d" if args.out_type == "boundary" else "3d")
    print(f"{args.pred} vs {args.labels}: {args.out_type}, threshold {args.threshold:g}, {dims}, "
          f"{labels.shape[0]}x{labels.shape[1]}x{labels.shape[2]} voxels")
    print(_table(result))
    if args.json_out:
        record: dict[str, Any] = {"pred": str(args.pred), "labels": str(args.labels), "type": args.out_type,
                                  "threshold": args.threshold, "dims": dims,
                                  **{k: (None if math.isnan(v) else v) for k, v in result.items()}}
        try:
            Path(args.json_out).write_text(json.dumps(record, indent=2) + "\n")
        except OSError as exc:
            raise VolumeError(f"{args.json_out}: cannot write the JSON results ({exc.strerror})") from None
    return 0


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
        return arr[0]
    if arr.ndim != 3:
        raise VolumeError(f"{name}: {what} must be one (Z, Y, X) volume or a (Y, X) image, got shape {arr.shape}")
    return arr


def _table(result: dict[str, float]) -> str:
    width = max(len(k) for k in METRICS)
    lines = [f"  {'metric':<{width}}  value", f"  {'-' * width}  ------"]
    lines += [f"  {k:<{width}}  {result[k]:.4f}" for k in METRICS]
    return "\n".join(lines)


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not within [0, 1]")
    return value
