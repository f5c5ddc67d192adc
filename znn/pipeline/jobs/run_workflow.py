"""`znn run WORKFLOW.yaml` (a batch workflow of train, forward, segment and evaluate steps) and `znn status
WORKFLOW.yaml`.

The workflow file is described in :mod:`znn.pipeline.jobs.workflow`, its state file in
:mod:`znn.pipeline.jobs.workflow_state`. A run checks the whole file first (every job file, every dependency), then
runs the steps in dependency order. A step whose record says ``done`` with the same digest (its definition, its
job files and the digests of the steps it needs) is skipped, provided the steps it needs were skipped too; every
other step runs, which retries failed ones and finishes interrupted ones (training resumes from its checkpoint,
dense inference and segmentation from their manifests of finished blocks). A failed step blocks the steps that need
it; the others go on, and the command ends with status 1 naming the failures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from znn.errors import ZnnError
from znn.pipeline.jobs.workflow import Step, Workflow, load_workflow
from znn.pipeline.jobs.workflow_state import RunLock, StepState, WorkflowState, now
from znn.pipeline.run.schedulers import resolve_scheduler
from znn.text import format_table

__all__ = ["run_workflow", "status_table", "RunSummary"]

Log = Callable[[str], None]


class RunSummary:
    """What one `znn run` did: steps skipped, run, failed and blocked (names in dependency order)."""

    def __init__(self, workflow: Workflow) -> None:
        self.workflow = workflow
        self.skipped: list[str] = []
        self.done: list[str] = []
        self.failed: list[str] = []
        self.blocked: list[str] = []

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked


def run_workflow(path: str | Path, scheduler: str | None = None, parallel: int | None = None,
                 progress: bool = True, log: Log = print) -> RunSummary:
    """Run the workflow at ``path``; ``scheduler`` overrides the file's ``scheduler`` key (neither given: each
    step's job decides, see :func:`~znn.pipeline.run.schedulers.resolve_scheduler`), ``parallel`` its ``parallel``."""
    wf = load_workflow(path)
    chosen = resolve_scheduler(scheduler, wf.scheduler) if scheduler or wf.scheduler else None
    _check_state_place(wf)
    with RunLock(wf.state_path.with_suffix(".lock"), f"workflow {wf.path}"):
        state = WorkflowState(wf.state_path, wf.path.name)
        cluster = None
        if chosen == "local":  # one cluster for every step, not one per step
            from znn.pipeline.run.schedulers import make_runner

            cluster = make_runner("local")
            chosen = cluster.client.scheduler.address
        try:
            workers = parallel or wf.parallel
            if workers > 1 and (chosen is None or "://" not in chosen):
                log(f"parallel {workers} ignored: steps on an in-process scheduler run one at a time (each uses "
                    "every core); give a cluster with --scheduler local or an address")
                workers = 1
            return _Run(wf, state, chosen, progress, log).execute(workers)
        finally:
            if cluster is not None:
                cluster.close()


def _check_state_place(wf: Workflow) -> None:
    """The state file and its lock can be written beside the workflow (checked before any step runs)."""
    from znn.io.paths import check_writable

    fix = f"the state of {wf.path.name} is kept beside it: run it from a writable folder (copy it there)"
    check_writable(wf.state_path, "workflow state file", folder=False, fix=fix)
    check_writable(wf.state_path.with_suffix(".lock"), "workflow lock file", folder=False, fix=fix)


class _Inline:
    """An executor running each step at once in the calling thread (Ctrl-C reaches the step)."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args))
        return future

    def __enter__(self) -> "_Inline":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class _Run:
    def __init__(self, wf: Workflow, state: WorkflowState, scheduler: str | None, progress: bool, log: Log):
        self.wf, self.state, self.scheduler, self.progress, self.log = wf, state, scheduler, progress, log
        self.summary = RunSummary(wf)

    def execute(self, workers: int) -> RunSummary:
        summary = self.summary
        for step in self.wf.steps.values():
            record = self.state.get(step.name)
            if record.status == "done" and record.digest == step.digest and set(step.needs) <= set(summary.skipped):
                summary.skipped.append(step.name)
                self.log(f"{step.name}: done at {record.finished}, skipped")
        finished = set(summary.skipped)
        pending = [n for n in self.wf.steps if n not in finished]
        running: dict[Future[bool], str] = {}
        with ThreadPoolExecutor(workers, thread_name_prefix="znn-step") if workers > 1 else _Inline() as pool:
            while pending or running:
                for name in list(pending):
                    needs = self.wf.steps[name].needs
                    stopped = [n for n in needs if n in summary.failed or n in summary.blocked]
                    if stopped:
                        pending.remove(name)
                        summary.blocked.append(name)
                        self.state.update(name, status="blocked", error=f"{stopped[0]} did not finish")
                        self.log(f"{name}: blocked ({stopped[0]} did not finish)")
                    elif finished.issuperset(needs) and len(running) < workers:
                        pending.remove(name)
                        running[pool.submit(self._step, self.wf.steps[name])] = name
                if not running:
                    break
                complete, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in complete:
                    name = running.pop(future)
                    if future.result():
                        finished.add(name)
                        summary.done.append(name)
                    else:
                        summary.failed.append(name)
        return summary

    def _step(self, step: Step) -> bool:
        """Run one step and record the outcome; True when it finished."""
        self.log(f"{step.name}: {step.kind} started")
        start = time.monotonic()
        self.state.update(step.name, status="running", digest=step.digest, started=now(), finished=None,
                          seconds=None, error=None)
        try:
            RUNNERS[step.kind](step, self.scheduler, self.progress, lambda text: self.log(f"[{step.name}] {text}"))
        except BaseException as exc:
            error = str(exc) if isinstance(exc, ZnnError) else f"{type(exc).__name__}: {exc}"
            if isinstance(exc, KeyboardInterrupt):
                error = "interrupted"
            self.state.update(step.name, status="failed", finished=now(), seconds=time.monotonic() - start,
                              error=error)
            self.log(f"{step.name}: failed: {error}")
            if not isinstance(exc, Exception):
                raise
            return False
        seconds = time.monotonic() - start
        self.state.update(step.name, status="done", finished=now(), seconds=seconds)
        self.log(f"{step.name}: done in {seconds:.1f} s")
        return True


# ------------------------------------------------------------------------------------------------ the steps
def _train(step: Step, scheduler: str | None, progress: bool, log: Log) -> None:
    from znn.pipeline.jobs.train import train_job

    o = step.options
    minutes = o.get("minutes")
    assert step.job is not None  # train steps have a job (checked on loading)
    train_job(step.job, o.get("seed"), scheduler, o.get("max_iter"), None if minutes is None else 60 * minutes,
              progress, log)


def _forward(step: Step, scheduler: str | None, progress: bool, log: Log) -> None:
    from znn.pipeline.jobs.forward import forward_job

    o = step.options
    assert step.job is not None
    results = forward_job(step.job, o.get("transform", "auto"), o.get("memory"), progress=progress,
                          scheduler=scheduler)
    for r in results:
        log(f"{r.store}: {r.blocks_total} blocks, {r.blocks_skipped} skipped (already done), {r.blocks_run} run")


def _method_settings(options: dict[str, Any]) -> dict[str, float]:
    """The segmentation method's settings a step gives (the others take the method's defaults)."""
    from znn.pipeline.jobs.workflow import METHOD_KEYS

    return {key: options[key] for key in METHOD_KEYS if key in options}


def _segment(step: Step, scheduler: str | None, progress: bool, log: Log) -> None:
    from znn.ops.segment import Method
    from znn.pipeline.jobs.segment import DEFAULT_BLOCK, DEFAULT_HALO, SegmentJob, segment_job

    o = step.options  # the step is `znn segment PRED OUT` with the step's keys as its options
    method = Method.of(o.get("type", "boundary"), o.get("dims"), o.get("nonboundary", False), **_method_settings(o))
    r = segment_job(SegmentJob(o["pred"], o["out"], method, o.get("block", DEFAULT_BLOCK), o.get("halo", DEFAULT_HALO),
                               scheduler, progress=progress, choose_on=o.get("choose_on"),
                               choose_pred=o.get("choose_pred")))
    log(f"{r.array}: {r.blocks_total} blocks, {r.blocks_skipped} skipped (already done), {r.blocks_run} run")


def _evaluate(step: Step, scheduler: str | None, progress: bool, log: Log) -> None:
    from znn.pipeline.jobs.evaluate import EvaluateRequest, evaluate_files

    o = step.options  # evaluate_files checks `out` and creates its folder
    # The step is `znn evaluate PRED LABELS ... --json OUT` with the step's keys as its options.
    evaluate_files(EvaluateRequest(o["pred"], o["labels"], o.get("type", "boundary"), o.get("threshold", 0.5),
                                   o.get("dims"), o.get("mask"), o.get("nonboundary", False), o.get("crop", False),
                                   o["out"], o.get("segment", "threshold"), _method_settings(o)))


RUNNERS: dict[str, Callable[[Step, str | None, bool, Log], None]] = {
    "train": _train, "forward": _forward, "segment": _segment, "evaluate": _evaluate}


# ------------------------------------------------------------------------------------------------ the table
def status_table(wf: Workflow, state: WorkflowState, running: bool) -> str:
    """One line per step: name, kind, status, needs, time, detail. ``running``: whether a run holds the lock
    (without one, a ``running`` record is a run that was killed)."""
    rows = []
    for step in wf.steps.values():
        record = state.get(step.name)
        rows.append((step.name, step.kind, _status(record, running), _needs(wf, step) or "-", _time(record),
                     _detail(record, step)))
    return format_table(("step", "kind", "status", "needs", "time", "detail"), rows, rule=False)


def _status(record: StepState, running: bool) -> str:
    if record.status == "running" and not running:
        return "interrupted"
    return record.status


def _needs(wf: Workflow, step: Step) -> str:
    """The needs, a whole fan-out written as its group name."""
    names: list[str] = []
    for need in step.needs:
        group = wf.steps[need].group
        members = wf.groups[group]
        if len(members) > 1 and set(members) <= set(step.needs):
            if group not in names:
                names.append(group)
        else:
            names.append(need)
    return ",".join(names)


def _time(record: StepState) -> str:
    if record.seconds is not None:
        return f"{record.seconds:.1f} s"
    if record.status == "running" and record.started:
        return f"since {record.started[11:]}"
    return "-"


def _detail(record: StepState, step: Step) -> str:
    if record.status == "done" and record.digest != step.digest:
        return "changed since it ran: reruns"
    if record.error:
        return record.error.splitlines()[0] if record.error.strip() else record.error
    if record.status == "done":
        return f"finished {record.finished}"
    return ""
