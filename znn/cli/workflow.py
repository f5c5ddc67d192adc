"""`znn run WORKFLOW.yaml` and `znn status WORKFLOW.yaml`: arguments only; the work is
:mod:`znn.pipeline.jobs.run_workflow`."""

from __future__ import annotations

import argparse
import sys

from znn.cli.args import (
    Handler,
    Subparsers,
    add_quiet_argument,
    add_scheduler_argument,
    log,
    positive_int,
)
from znn.pipeline.jobs.run_workflow import run_workflow, status_table
from znn.pipeline.jobs.workflow import load_workflow
from znn.pipeline.jobs.workflow_state import RunLock, WorkflowState


def register(sub: Subparsers) -> dict[str, Handler]:
    p = sub.add_parser("run", help="run a batch workflow of train/forward/segment/evaluate steps (WORKFLOW.yaml)",
                       description="Run the steps of a workflow file in dependency order, recording each step's "
                       "state in <workflow>.state.json beside it. A rerun skips finished steps whose definition "
                       "and job files are unchanged and reruns failed or interrupted ones. See workflows/batch/.")
    p.add_argument("workflow", help="a workflow .yaml file")
    add_scheduler_argument(p)
    p.add_argument("--parallel", type=positive_int, help="steps to run at once on a cluster (overrides the "
                                                          "workflow's parallel key; default 1)")
    add_quiet_argument(p)
    q = sub.add_parser("status", help="table of a workflow's steps and their state",
                       description="Print each step of the workflow with its kind, state (pending, running, done, "
                       "failed, blocked, interrupted), the steps it needs, its time and a detail (the error).")
    q.add_argument("workflow", help="a workflow .yaml file")
    return {"run": _cmd_run, "status": _cmd_status}


def _cmd_run(args: argparse.Namespace) -> int:
    summary = run_workflow(args.workflow, args.scheduler, args.parallel, not args.quiet, log)
    wf = summary.workflow
    print(status_table(wf, WorkflowState(wf.state_path, wf.path.name), running=False))
    if summary.ok:
        return 0
    blocked = f"; blocked: {', '.join(summary.blocked)}" if summary.blocked else ""
    print(f"znn run: {len(summary.failed)} step(s) failed: {', '.join(summary.failed)}{blocked}. Fix the cause "
          f"(see the detail column) and run `znn run {args.workflow}` again: finished steps are skipped",
          file=sys.stderr)
    return 1


def _cmd_status(args: argparse.Namespace) -> int:
    wf = load_workflow(args.workflow)
    held = RunLock.held(wf.state_path.with_suffix(".lock"))
    print(status_table(wf, WorkflowState(wf.state_path, wf.path.name), held))
    return 0
