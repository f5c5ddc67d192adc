"""`znn train JOB.cfg [--seed NET.h5]` and `znn quickstart`.

``train_job`` wires a job file to the training loop: the network (initialised, resumed from
``<train_net_prefix>_current.h5`` or seeded from another checkpoint), the samples of ``train_range`` and
``test_range`` read from ``fdata_spec``, the patch sampler (mirroring, augmentation, rebalancing), the engine on
the job's scheduler and the :class:`~znn.pipeline.train.trainer.Trainer`. ``znn quickstart`` makes its own data (see
:mod:`znn.pipeline.jobs.quickstart`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from znn.environment import available_memory
from znn.errors import ConfigError, ShapeError
from znn.io.config import Job
from znn.io.locks import RunLock, lock_beside
from znn.io.netfile import load_network
from znn.io.paths import check_writable
from znn.io.samples import SampleData, load_sample
from znn.io.specfile import load_spec
from znn.network import Network
from znn.ops import metrics
from znn.pipeline.graph.memory import StepMemory
from znn.pipeline.run.progress import Progress
from znn.pipeline.run.schedulers import Runner, make_runner, resolve_scheduler
from znn.pipeline.train.engine import Engine
from znn.pipeline.train.replicas import ReplicaEngine, worker_threads
from znn.pipeline.train.sampler import Patch, PatchSampler, SamplerOptions
from znn.pipeline.train.trainer import (
    Objective,
    PatchSource,
    Schedule,
    StartPoint,
    Trainer,
    resume,
    seed_network,
)
from znn.spec import NetworkSpec
from znn.text import format_bytes

__all__ = ["train_job", "PatchEvaluator", "load_samples"]


def load_samples(job: Job, key: str, dtype: Any, network: NetworkSpec | None = None) -> list[SampleData]:
    """The samples of ``train_range`` or ``test_range`` (``key``), read and preprocessed, their volumes in the order
    of the nodes of ``network`` (default: the job's ``fnet_spec``); [] when the key is unset (allowed for
    test_range only)."""
    ids = job.values.get(key)
    if not ids:
        if key == "train_range":
            job.require(key)
        return []
    spec = load_spec(job.require("fdata_spec"))
    network = network or load_network(job.require("fnet_spec"))
    return [load_sample(spec, i, job.out_type, dtype, network) for i in ids]


@dataclass
class PatchEvaluator:
    """Pixel error (and, for validation, adapted Rand error) of the predictions on one patch, averaged over the
    network's outputs. ``label_pp[node]`` is the label transform of that output (one_class targets are the
    non-boundary probability)."""

    out_type: str
    label_pp: Mapping[str, str]

    def __call__(self, pred: Mapping[str, np.ndarray], patch: Patch, with_rand: bool) -> tuple[float, float]:
        pixel, rand = [], []
        for node, p in pred.items():
            pixel.append(metrics.pixel_error(p, patch.targets[node], patch.masks[node]))
            if with_rand:
                rand.append(self._rand_error(node, p, patch))
        rand_error = float(np.nanmean(rand)) if rand and not np.isnan(rand).all() else float("nan")
        return float(np.mean(pixel)), rand_error

    def _rand_error(self, node: str, pred: np.ndarray, patch: Patch) -> float:
        labels = patch.labels.get(node)
        pp = self.label_pp.get(node, "binary_class")
        if labels is None or labels.ndim != 3 or pp == "none":
            return float("nan")  # multi-channel or untransformed labels are not a segmentation
        mask = patch.masks[node][0] if self.out_type == "boundary" else None
        one_channel = "nonboundary" if pp == "one_class" else "boundary"
        return metrics.evaluate(pred, labels, self.out_type, mask=mask, one_channel=one_channel)["rand_error"]


def _announce(log: Callable[[str], None], job: Job, engine: Engine | ReplicaEngine, train: list[SampleData],
              test: list[SampleData]) -> None:
    layout = engine.plan.layout
    log(f"network {job.fnet_spec}: FOV {','.join(map(str, layout.fov))}, output patch "
        f"{','.join(map(str, job.train_outsz))}, input patch "
        f"{'; '.join(f'{n} ' + ','.join(map(str, p)) for n, p in engine.input_patch.items())}")
    log(f"samples: train {', '.join(str(s.id) for s in train)} "
        f"({sum(int(np.prod(s.shape)) for s in train):,} voxels), "
        f"test {', '.join(str(s.id) for s in test) or 'none (no validation)'}; cost {job.cost}, "
        f"rebalance {job.rebalance}, augmentation {'on' if job.is_data_aug else 'off'}, "
        f"MALIS {job.malis_norm_type if job.is_malis else 'off'}")
    if isinstance(engine, Engine):  # replicas: each worker holds one step of the engine's plan
        _announce_memory(log, job, engine.step_memory())


def _announce_memory(log: Callable[[str], None], job: Job, memory: StepMemory) -> None:
    """The step's predicted memory, and a warning where it exceeds what the machine has free."""
    log(f"one step: about {format_bytes(memory.peak)} of arrays at its peak (predicted, at {memory.at}; "
        f"{memory.workers} worker(s)), besides {format_bytes(memory.data)} of patch and parameters")
    free = available_memory()
    if free and memory.peak + memory.data > free:
        log(f"warning: that is more than the {format_bytes(free)} this machine has free; the run may be killed "
            f"for memory. {job.path}: a smaller train_outsz needs less")


def _network(job: Job, prefix: Path, seed: str | Path | None, log: Callable[[str], None]) -> tuple[
        Network, Any, int]:
    spec = load_network(job.require("fnet_spec"))
    dtype = np.dtype(job.dtype)
    resumed = resume(prefix, spec, dtype)
    if resumed is not None:
        net, curve, iteration = resumed
        log(f"resuming from {prefix}_current.h5 at iteration {iteration}"
            + (f" (--seed {seed} ignored: the run has its own checkpoint)" if seed else ""))
        return net, curve, iteration
    net = Network.initialise(spec, seed=job.seed, dtype=dtype)
    if seed:
        seed_network(net, seed, log)
    return net, None, 0


def train_job(job: Job, seed: str | Path | None = None, scheduler: str | None = None,
              max_iter: int | None = None, time_limit: float | None = None, progress: bool = True,
              log: Callable[[str], None] = print, replicas: int | None = None) -> Trainer:
    """Train ``job`` until Max_iter (or ``max_iter``, or ``time_limit`` seconds); returns the finished trainer.
    ``replicas`` (default: the job's ``replicas``): data-parallel replicas on a dask.distributed cluster."""
    prefix = Path(job.net_prefix or job.require("train_net_prefix"))
    # checkpoints go to prefix's folder: found unwritable now, not at the first save; one run per prefix
    check_writable(prefix.parent, "train_net_prefix folder", folder=True, fix=f"{job.path}: change train_net_prefix")
    with RunLock(lock_beside(prefix), f"train_net_prefix {prefix}"):
        trainer = _train(job, prefix, seed, scheduler, (max_iter, time_limit), progress, log,
                         int(replicas or job.replicas))
    _summary(trainer, log)
    return trainer


def _train(job: Job, prefix: Path, seed: str | Path | None, scheduler: str | None,
           limits: tuple[int | None, float | None], progress: bool, log: Callable[[str], None],
           replicas: int = 1) -> Trainer:
    """:func:`train_job` once its prefix is checked and locked; ``limits``: (max_iter, time_limit)."""
    max_iter, time_limit = limits
    net, curve, iteration = _network(job, prefix, seed, log)
    # a cluster started for the job (scheduler = local) stops with it, also when the job turns out to be wrong
    with make_runner(resolve_scheduler(scheduler, job), job.num_threads) as runner:
        if runner.distributed and runner.dashboard:
            log(f"dask dashboard: {runner.dashboard}")
        engine = _engine(job, net, runner, replicas, log)
        engine.steps = iteration  # dropout masks follow the step number, also after a resume
        train = load_samples(job, "train_range", net.dtype, net.spec)
        test = load_samples(job, "test_range", net.dtype, net.spec)
        _announce(log, job, engine, train, test)
        fov = engine.plan.layout.fov
        outputs = net.spec.outputs
        drawing = SamplerOptions(job.is_bd_mirror, job.is_data_aug, job.rebalance, job.seed)
        validating = SamplerOptions(job.is_bd_mirror, rebalance=job.rebalance)
        try:
            sampler = PatchSampler(train, engine.input_patch, job.train_outsz, fov, drawing, output_nodes=outputs)
            tester = PatchSampler(test, engine.input_patch, job.train_outsz, fov, validating,
                                  output_nodes=outputs) if test else None
        except ShapeError as exc:
            raise ShapeError(f"{job.path}: {exc}") from None

        def draw(it: int, replica: int = 0) -> Patch:
            # the patch of step `it` depends on nothing else; replica 0's is the patch of one-replica training
            sampler.rng = np.random.default_rng([job.seed, it] if replica == 0 else [job.seed, it, replica])
            return sampler.sample(1)[0]

        test_patches = None if tester is None else (lambda n: tester.validation_patches(n, seed=job.seed))
        evaluator = PatchEvaluator(job.out_type, dict(zip(net.spec.outputs, train[0].label_pp)))
        schedule = Schedule.from_job(job)
        prefix.parent.mkdir(parents=True, exist_ok=True)  # only now that the job has proved readable
        stop_at = schedule.max_iter if max_iter is None else max_iter
        bar = Progress(stop_at, "iterations", "train", initial=min(iteration, stop_at), rate_fields=("samples",),
                       every_percent=5, enabled=progress)
        objective = Objective(job.cost, evaluator, job.malis_norm_type if job.is_malis else None)
        trainer = Trainer(engine, schedule, objective, PatchSource(draw, test_patches), prefix,
                          StartPoint(curve, iteration), log=log, progress=bar)
        with bar:
            trainer.run(stop_at, time_limit)
    return trainer


def _engine(job: Job, net: Network, runner: Runner, replicas: int,
            log: Callable[[str], None]) -> Engine | ReplicaEngine:
    """The job's engine on ``runner``; with ``replicas`` > 1 a data-parallel one (its step planned for one
    worker's threads)."""
    if replicas > 1 and not runner.distributed:
        raise ConfigError(f"{job.path}: replicas = {replicas} needs a dask.distributed cluster; use --scheduler "
                          "local or a scheduler address like tcp://host:8786, or replicas = 1")
    threads = worker_threads(runner) if replicas > 1 else None  # None: the runner's workers
    engine = Engine(net, job.train_outsz, job.train_conv_mode, runner, seed=job.seed,
                    spectra_cache=job.spectra_cache, plan_workers=threads)
    if replicas == 1:
        return engine
    addresses = sorted(runner.client.scheduler_info()["workers"])
    workers = len(addresses)
    log(f"data-parallel: {replicas} replicas on {workers} worker(s) of {threads} thread(s); each step averages the "
        f"gradients of {replicas} patches (effective batch {replicas}; eta applies to the average)"
        + ("" if workers >= replicas else f"; {replicas - workers} replica(s) share a worker"))
    # where ReplicaEngine places them while the cluster stays as it is (it re-places them on each step)
    log("replicas held by: " + ", ".join(f"{r} on {addresses[r % workers]}" for r in range(replicas)))
    return ReplicaEngine(engine, replicas, token=f"{job.path}:{uuid.uuid4().hex}")


def _summary(trainer: Trainer, log: Callable[[str], None]) -> None:
    curve = trainer.curve
    parts = [f"iteration {trainer.iteration}"]
    for phase in ("train", "test"):
        s = getattr(curve, phase)
        if s["it"]:
            parts.append(f"{phase} cost {s['err'][-1]:.4f}, pixel error {s['cls'][-1]:.4f}"
                         + (f", Rand error {s['re'][-1]:.4f}" if np.isfinite(s["re"][-1]) else ""))
    log("; ".join(parts))
    log(f"checkpoint {trainer.prefix}_current.h5, learning curve {trainer.prefix}_curve.png")
