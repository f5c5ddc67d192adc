"""`znn train JOB.cfg` and `znn quickstart`: arguments only; the work is :mod:`znn.pipeline.jobs.train` and
:mod:`znn.pipeline.jobs.quickstart`."""

from __future__ import annotations

import argparse
from pathlib import Path

from znn.cli.args import (
    Handler,
    Subparsers,
    add_quiet_argument,
    add_scheduler_argument,
    count,
    notes,
    positive_int,
    positive_number,
)
from znn.io.config import load_job
from znn.pipeline.jobs.quickstart import quickstart
from znn.pipeline.jobs.train import train_job


def register(sub: Subparsers) -> dict[str, Handler]:
    p = sub.add_parser("train", help="train a network from a ZNN job file (.cfg)",
                       description="Train the job's fnet_spec on the samples of train_range, validating on "
                       "test_range; checkpoints <train_net_prefix>_<iter>.h5 and _current.h5 with the learning "
                       "curve (and its PNG). A rerun resumes from _current.h5.")
    p.add_argument("job", help="a .cfg job file")
    p.add_argument("--seed", metavar="NET.h5", help="initialise every group whose name and shape match this "
                                                    "checkpoint (ignored when the run resumes)")
    add_scheduler_argument(p)
    p.add_argument("--max-iter", type=count, help="stop at this iteration instead of the job's Max_iter")
    p.add_argument("--minutes", type=positive_number, help="stop (and save) after this many minutes of training")
    p.add_argument("--replicas", type=positive_int, help="data-parallel replicas on a dask.distributed cluster "
                   "(--scheduler local or an address): each step averages the gradients of this many patches "
                   "(default: the job's replicas, 1)")
    add_quiet_argument(p)
    q = sub.add_parser("quickstart", help="train and evaluate a small network on synthetic EM data (no download)",
                       description="Make a synthetic EM-like volume, train the workflows/quickstart network on it "
                       "for a few minutes, predict a held-out part and evaluate it; writes PNG previews.")
    q.add_argument("--out", default="quickstart", help="output folder (default: ./quickstart)")
    q.add_argument("--minutes", type=positive_number, default=4.0, help="training time limit (default 4)")
    q.add_argument("--max-iter", type=count, help="stop at this iteration instead of the job's Max_iter")
    add_scheduler_argument(q)
    add_quiet_argument(q)
    return {"train": _cmd_train, "quickstart": _cmd_quickstart}


def _cmd_train(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    train_job(job, args.seed, args.scheduler, args.max_iter,
              None if args.minutes is None else 60 * args.minutes, not args.quiet, notes(args.quiet), args.replicas)
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    report = quickstart(Path(args.out), minutes=args.minutes, max_iter=args.max_iter, scheduler=args.scheduler,
                        progress=not args.quiet, log=notes(args.quiet))
    print(report.text())
    return 0
