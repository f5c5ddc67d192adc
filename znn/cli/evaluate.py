"""`znn evaluate PRED LABELS`: arguments only; the work is :func:`znn.pipeline.jobs.evaluate.evaluate_files`."""

from __future__ import annotations

import argparse

from znn.cli.args import Handler, Subparsers, add_method_arguments, method_settings, probability
from znn.pipeline.jobs.evaluate import (
    PRED_TYPES,
    SEGMENT_DIMS,
    SEGMENT_METHODS,
    EvaluateRequest,
    evaluate_files,
)

DESCRIPTION = (
    "Pixel error, adapted Rand error (precision, recall) and VOI (split, merge; bits) of PRED against LABELS "
    "(tif, h5[:/dataset] or zarr). Boundary predictions: a boundary probability (Z,Y,X) or (1,Z,Y,X), or ZNN's "
    "two-channel output (2,Z,Y,X) whose channel 1 is the boundary. Affinity predictions: (3,Z,Y,X), channels z,y,x. "
    "LABELS: a segmentation with 0 = boundary, or 0/255 labels (0 = membrane). Ground-truth boundary voxels are "
    "left out of Rand and VOI; predicted boundary voxels join the nearest segment. A prediction is segmented by "
    "a threshold and connected components; --segment watershed also segments it as znn segment does and shows "
    "both. --type segmentation scores a segmentation (e.g. znn segment's labels) directly."
)


def register(sub: Subparsers) -> dict[str, Handler]:
    p = sub.add_parser("evaluate", help="pixel error, Rand error and VOI of a prediction against labels",
                       description=DESCRIPTION)
    p.add_argument("pred", help="prediction volume (tif, h5[:/dataset], zarr)")
    p.add_argument("labels", help="ground-truth volume: segmentation (0 = boundary) or 0/255 labels")
    p.add_argument("--type", dest="out_type", choices=PRED_TYPES, default="boundary",
                   help="what PRED holds: a boundary or affinity map, or a segmentation (default boundary)")
    p.add_argument("--segment", choices=SEGMENT_METHODS, default="threshold",
                   help="how a prediction is segmented for Rand and VOI: threshold (connected components of the "
                        "thresholded map), or watershed: also znn segment's method, both shown (default threshold)")
    p.add_argument("--threshold", type=probability, default=0.5, help="binarisation threshold (default 0.5)")
    p.add_argument("--dims", choices=SEGMENT_DIMS, default=None,
                   help="segment per z-slice (2d) or in 3D; default 2d for boundary, 3d for affinity")
    p.add_argument("--mask", help="optional mask volume (> 0 is evaluated)")
    p.add_argument("--nonboundary", action="store_true",
                   help="a one-channel prediction is P(non-boundary) (ZNN one_class), not P(boundary)")
    p.add_argument("--crop", action="store_true",
                   help="centrally crop prediction, labels and mask to their common size (e.g. a prediction "
                        "made without boundary mirroring is smaller by the FOV - 1)")
    p.add_argument("--json", dest="json_out", metavar="OUT.json", help="also write the results as JSON")
    add_method_arguments(p)
    return {"evaluate": _cmd_evaluate}


def _cmd_evaluate(args: argparse.Namespace) -> int:
    request = EvaluateRequest(args.pred, args.labels, args.out_type, args.threshold, args.dims, args.mask,
                              args.nonboundary, args.crop, args.json_out, args.segment, method_settings(args))
    print(evaluate_files(request).text())
    return 0
