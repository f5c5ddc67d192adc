"""`znn forward JOB.cfg` and `znn plan JOB.cfg`: arguments only; the work is :mod:`znn.pipeline.jobs.forward`."""

from __future__ import annotations

import argparse
import logging
import sys

from znn.cli.args import (
    Handler,
    Subparsers,
    add_quiet_argument,
    add_scheduler_argument,
    memory,
    pyramid,
    triple_or_auto,
)
from znn.errors import ShapeError
from znn.io.config import load_job
from znn.pipeline.dense.outputs import TRANSFORMS
from znn.pipeline.jobs.forward import ForwardSetup, forward_job, plan_job
from znn.text import format_bytes


def register(sub: Subparsers) -> dict[str, Handler]:
    p = sub.add_parser("forward", help="dense inference of a job's forward_range into zarr/h5/tif outputs",
                       description="Run the job's forward_net densely over every sample of forward_range. Output: "
                       "<output_prefix>_sample<N>_output.zarr with an OME-Zarr (NGFF 0.5) image per output node, "
                       "carrying the voxel size (resolution key) and provenance (resumable; a rerun skips finished "
                       "blocks), plus .h5 or .tif with output_format.")
    p.add_argument("job", help="a .cfg job file")
    p.add_argument("--transform", choices=TRANSFORMS, default="auto",
                   help="output transform over channels (auto: softmax for softmax-trained boundary nets, sigmoid for "
                        "affinity/binomial nets, none for square loss)")
    p.add_argument("--memory", type=memory, help="memory budget, e.g. 8GB (plans forward_outsz = auto and decides "
                                                   "whether kernel spectra are cached; at most available memory "
                                                   "less 10%%)")
    p.add_argument("--outsz", type=triple_or_auto, help="output block z,y,x (or auto); overrides forward_outsz")
    p.add_argument("--fresh", action="store_true", help="ignore finished blocks and recompute everything")
    p.add_argument("--pyramid", nargs="?", const="auto", type=pyramid, metavar="LEVELS",
                   help="also write downsampled levels of each OME-Zarr output for viewers (mean of 2x windows, made "
                        "after the blocks): LEVELS of them, or without a number until a level is at most 256 voxels "
                        "per axis; overrides the job's pyramid key")
    add_quiet_argument(p)
    add_scheduler_argument(p)
    q = sub.add_parser("plan", help="predict memory per output block and pick the largest patch that fits",
                       description="Predict the peak memory of dense inference for candidate FFT-friendly output "
                       "patches and pick the largest that fits --memory.")
    q.add_argument("job", help="a .cfg job file")
    q.add_argument("--memory", type=memory, help="memory budget, e.g. 8GB (default and most: available memory less 10%%)")
    add_scheduler_argument(q)
    return {"forward": _cmd_forward, "plan": _cmd_plan}


def _cmd_forward(args: argparse.Namespace) -> int:
    # notes and progress go to stdout (none under --quiet but warnings): a failure's message is then the only line
    # on stderr; what the plan spends long on (timing conv modes) is said as it starts and when it is done
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    if not args.quiet:
        logging.getLogger("znn.autotune").setLevel(logging.INFO)
    job = load_job(args.job, None if args.pyramid is None else {"pyramid": str(args.pyramid)})

    def show(setup: ForwardSetup) -> None:
        if args.quiet:
            return
        how = "planned" if setup.plan is not None and setup.plan.chosen and setup.plan.chosen.outsz == setup.outsz \
            else "given"
        peak = f", predicted peak {format_bytes(setup.plan.predicted_peak)}" if setup.plan else ""
        print(f"sample {setup.sample}: output block {','.join(map(str, setup.outsz))} ({how}, "
              f"{setup.block_threads} thread(s) per block), kernel spectra "
              f"{'cached' if setup.spectra_cache else 'recomputed per block'}, transform {setup.transform}{peak}",
              flush=True)

    results = forward_job(job, args.transform, args.memory, args.outsz, args.fresh, not args.quiet, show,
                          args.scheduler, sys.stdout)
    for r in results:
        made = len(next(iter(r.pyramid.values()), []))
        levels = f", pyramid of {made} level(s)" if made else ""
        print(f"{r.store}: {r.blocks_total} blocks, {r.blocks_skipped} skipped (already done), {r.blocks_run} run in "
              f"{r.seconds:.1f} s, {r.voxels_per_second:,.0f} voxels/s{levels}", flush=True)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # the note when --memory is capped
    job = load_job(args.job)
    try:
        plan = plan_job(job, args.memory, scheduler=args.scheduler)
    except ShapeError as exc:
        raise ShapeError(f"{args.job}: {exc}") from None
    print(plan.table())
    assert plan.chosen is not None
    print(f"chosen: forward_outsz = {','.join(map(str, plan.chosen.outsz))} (predicted peak "
          f"{format_bytes(plan.predicted_peak)}, kernel spectra "
          f"{'cached' if plan.chosen.spectra_cache else 'recomputed per block'})")
    return 0
