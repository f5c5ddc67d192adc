"""`znn segment PRED OUT`: arguments only; the work is :func:`znn.pipeline.jobs.segment.segment_job`."""

from __future__ import annotations

import argparse
import logging
import sys

from znn.cli.args import (
    Handler,
    Subparsers,
    add_method_arguments,
    add_quiet_argument,
    add_scheduler_argument,
    count,
    method_settings,
    non_negative_triple,
    parse_triple,
    pyramid,
)
from znn.ops.segment import DIMS, OUT_TYPES, Method
from znn.pipeline.jobs.segment import DEFAULT_BLOCK, DEFAULT_HALO, SegmentJob, segment_job

DESCRIPTION = (
    "Segment a boundary map (Z,Y,X), (1,Z,Y,X) or ZNN's (2,Z,Y,X) (channel 1 = boundary) by a seeded watershed "
    "(with --merge-threshold, then agglomeration by mean boundary probability), or an affinity map (3,Z,Y,X) by a "
    "watershed and agglomeration by mean affinity, into a uint64 zarr label volume. "
    "Runs in blocks with a halo (out of core, on the same schedulers as znn forward); objects cut by block faces are "
    "joined again where the two blocks overlap. Resumable: a rerun skips finished blocks."
)


def _triple_text(values: tuple[int, int, int]) -> str:
    return ",".join(map(str, values))


def register(sub: Subparsers) -> dict[str, Handler]:
    p = sub.add_parser("segment", help="boundary or affinity map -> uint64 zarr label volume (watershed, blockwise)",
                       description=DESCRIPTION)
    p.add_argument("pred", help="prediction volume (tif, h5[:/dataset], zarr[/array]), e.g. the output of znn forward")
    p.add_argument("out", help="zarr store for the labels (seg.zarr: an OME-Zarr image with its label image at "
                               "seg.zarr/labels/segmentation; or a group in one, seg.zarr/name)")
    p.add_argument("--type", dest="out_type", choices=OUT_TYPES, default="boundary",
                   help="what the prediction holds (default boundary)")
    p.add_argument("--dims", choices=DIMS, default=None,
                   help="segment each z-slice on its own (2d) or in 3D; default 2d for boundary, 3d for affinity")
    p.add_argument("--nonboundary", action="store_true",
                   help="a one-channel prediction is P(non-boundary) (ZNN one_class), not P(boundary)")
    add_method_arguments(p)
    p.add_argument("--block", type=parse_triple, default=DEFAULT_BLOCK,
                   help=f"block (= output chunk) z,y,x (default {_triple_text(DEFAULT_BLOCK)})")
    p.add_argument("--halo", type=non_negative_triple, default=DEFAULT_HALO,
                   help=f"context segmented around each block, z,y,x (default {_triple_text(DEFAULT_HALO)}; none "
                        "along z in 2d); a block's result equals the whole volume's where objects fit in the halo")
    p.add_argument("--num-threads", type=count, default=0, help="threads or local workers (default 0: every core)")
    p.add_argument("--fresh", action="store_true", help="ignore finished blocks and recompute everything")
    p.add_argument("--pyramid", nargs="?", const="auto", type=pyramid, default=0, metavar="LEVELS",
                   help="also write downsampled levels of the label image for viewers (the most frequent id of each "
                        "2x window, never an average; made after the blocks): LEVELS of them, or without a number "
                        "until a level is at most 256 voxels per axis")
    p.add_argument("--choose-on", metavar="LABELS", default=None,
                   help="ground truth (segmentation, 0 = boundary, or 0/255 labels; a z range like labels.tif[10:15] "
                        "picks slices) on which to choose the seed and merge thresholds (over any given): each pair "
                        "of a grid segments the part of PRED it covers (--choose-pred) and the lowest adapted Rand "
                        "error wins; the table is printed. "
                        "Choose on a validation split, never on the slices you report")
    p.add_argument("--choose-pred", metavar="PART", default=None,
                   help="the part of the prediction LABELS covers, e.g. pred.zarr/output[0:5] (default PRED)")
    add_scheduler_argument(p)
    add_quiet_argument(p)
    return {"segment": _cmd_segment}


def _cmd_segment(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    method = Method.of(args.out_type, args.dims, args.nonboundary, **method_settings(args))
    # progress and notes go to stdout (none under --quiet): a failure's message is then the only line on stderr
    result = segment_job(SegmentJob(args.pred, args.out, method, args.block, args.halo, args.scheduler,
                                    args.num_threads, args.fresh, not args.quiet, args.pyramid, sys.stdout,
                                    args.choose_on, args.choose_pred))
    levels = f", pyramid of {len(result.pyramid)} level(s)" if result.pyramid else ""
    print(f"{result.array}: {result.blocks_total} blocks, {result.blocks_skipped} skipped (already done), "
          f"{result.blocks_run} run, {result.faces} faces matched ({result.joined} ids joined across faces) in "
          f"{result.seconds:.1f} s{levels}", flush=True)
    return 0
