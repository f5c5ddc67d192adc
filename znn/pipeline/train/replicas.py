"""Data-parallel synchronous SGD on a dask.distributed cluster: N replicas of the network, one SGD update.

Each step, the driver draws N patches (replica r of iteration i draws the patch seeded ``(seed, i, r)``; one
replica draws exactly the patch single-process training draws), sends the current weights to every worker once
(one broadcast), and submits one task per replica: on its worker, a replica of the network (built there once per
run and kept) computes the cost, outputs and gradients of its patch with the worker's threads (the training
step's graph, planned for them). The gradients come back summed by a binary tree of tasks on the workers, so the
driver receives one set; it applies ZNN's update once, with the gradients averaged over the replicas. A step
with N replicas is therefore single-process SGD on a minibatch of N patches (gradients averaged); ZNN steps on
one patch at a time, so eta keeps its meaning per step and N patches pass per step (the effective batch).

A replica's task is pure (weights, patch and step number are its arguments): a worker lost mid-step has its
tasks recomputed by dask on the others (the nanny restarts it), with the same numbers, since the driver's FFTW
wisdom is shared with every worker, also with those that join later. A scheduler lost is a
:class:`ClusterLost`; the trainer stops with the last checkpoint named.
"""

from __future__ import annotations

import operator
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from znn.errors import ZnnError
from znn.network import Network
from znn.pipeline.graph.build import Hyper, Loss
from znn.pipeline.run.schedulers import Runner, make_runner
from znn.pipeline.train.engine import Engine
from znn.spec import NetworkSpec
from znn.types import Triple

__all__ = ["ClusterLost", "ReplicaEngine", "ReplicaSetup", "StepReport"]


class ClusterLost(ZnnError, ConnectionError):
    """The dask scheduler (or every worker) went away during a step."""


@dataclass(frozen=True)
class ReplicaSetup:
    """What a worker needs to build its replica (sent once per run; weights come with each step)."""

    token: str  # the run: a worker keeps one replica per token
    spec: NetworkSpec
    output_patch: Triple
    modes: dict[str, str]  # conv mode per edge, resolved on the driver (workers never autotune)
    dtype: str
    seed: int
    plan_workers: int
    spectra_cache: bool


@dataclass(frozen=True)
class StepReport:
    """What one data-parallel step did: its wall time, the longest replica's compute time, bytes sent."""

    wall_s: float
    compute_s: float
    bytes_sent: int

    @property
    def comm_s(self) -> float:
        """Time the step did not spend computing in its slowest replica: weights, gradients, the reduction,
        scheduling."""
        return max(0.0, self.wall_s - self.compute_s)


_REPLICAS: dict[str, tuple[Engine, threading.Lock]] = {}  # on a worker: its replica of the run, and its lock
_REPLICAS_LOCK = threading.Lock()


def _replica(setup: ReplicaSetup) -> tuple[Engine, threading.Lock]:
    with _REPLICAS_LOCK:
        found = _REPLICAS.get(setup.token)
        if found is None:
            net = Network.initialise(setup.spec, seed=setup.seed, dtype=np.dtype(setup.dtype))
            runner = make_runner("threads", setup.plan_workers)
            engine = Engine(net, setup.output_patch, setup.modes, runner, seed=setup.seed,
                            spectra_cache=setup.spectra_cache, plan_workers=setup.plan_workers)
            _REPLICAS.clear()  # one run at a time per worker: an earlier run's replica is not needed again
            found = _REPLICAS[setup.token] = (engine, threading.Lock())
        return found


def replica_gradients(setup: ReplicaSetup, weights: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
                      inputs: Mapping[str, np.ndarray], loss: Loss, step: int) -> dict[str, Any]:
    """On a worker: the cost, outputs and gradients of one patch on this worker's replica, at ``weights``
    (kernels, biases) and step number ``step`` (dropout draws follow it); ``seconds`` it took."""
    engine, lock = _replica(setup)
    with lock:  # replicas sharing a worker of several threads take turns (each step uses all of its threads)
        t0 = time.perf_counter()
        engine.set_parameters(*weights)
        engine.steps = step
        cost, outputs, grads = engine.step_gradients(inputs, loss)
        return {"cost": cost, "outputs": outputs, "grads": grads, "seconds": time.perf_counter() - t0}


def replica_forward(setup: ReplicaSetup, weights: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
                    inputs: Mapping[str, np.ndarray], training: bool, step: int) -> dict[str, np.ndarray]:
    """On a worker: the outputs of one patch on this worker's replica at ``weights`` (a validation pass)."""
    engine, lock = _replica(setup)
    with lock:
        engine.set_parameters(*weights)
        engine.steps = step
        return engine.forward(inputs, training)


def add_gradients(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One node of the reduction tree: the sum of two replicas' (or subtrees') gradients, in their dtype."""
    return {name: np.add(a[name], b[name]) for name in a}


def worker_threads(runner: Runner) -> int:
    """The threads of the cluster's smallest worker: what each replica's step graph is planned for."""
    workers = runner.client.scheduler_info()["workers"].values()
    return max(1, min((int(w.get("nthreads", 1)) for w in workers), default=1))


class ReplicaEngine:
    """Data-parallel training on ``replicas`` workers of a dask.distributed ``runner``; ``engine`` (running on the
    same runner, planned for one worker's threads: :func:`worker_threads`) holds the network, the plan and the
    spectra cache the driver uses for validation passes."""

    def __init__(self, engine: Engine, replicas: int, token: str):
        if not engine.runner.distributed:
            raise ValueError("data-parallel training needs a dask.distributed runner")
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {replicas}")
        self.engine, self.replicas = engine, int(replicas)
        self.client = engine.runner.client
        self.setup = ReplicaSetup(token, engine.net.spec, engine.plan.output_patch,
                                  {e: p.mode for e, p in engine.plan.edges.items()
                                   if engine.net.spec.edges[e].type == "conv"},
                                  engine.net.dtype.name, engine.seed, engine.plan.workers,
                                  engine.cache.enabled)
        self.reports: list[StepReport] = []
        self._setup_future: Any = None
        self._weights_future: Any = None
        self._weights_step = -1
        self.placement: list[str] = []

    # the parts of Engine the trainer reads
    @property
    def net(self) -> Network:
        return self.engine.net

    @property
    def plan(self) -> Any:
        return self.engine.plan

    @property
    def input_patch(self) -> dict[str, Triple]:
        return self.engine.input_patch

    @property
    def steps(self) -> int:
        return self.engine.steps

    @steps.setter
    def steps(self, value: int) -> None:
        self.engine.steps = value

    def forward(self, inputs: Mapping[str, np.ndarray], training: bool = False) -> dict[str, np.ndarray]:
        """A validation pass, as one task on a replica's worker: the driver's own graph would carry the kernels
        and their cached spectra to the cluster with every patch (hundreds of MiB a test pass)."""
        def run() -> dict[str, np.ndarray]:
            patch = {k: np.asarray(v, self.engine.net.dtype) for k, v in inputs.items()}
            task = self.client.submit(replica_forward, self._setup(), self._weights(), patch, training,
                                      self.engine.steps, pure=False)
            outputs: dict[str, np.ndarray] = task.result()
            return outputs
        result: dict[str, np.ndarray] = _on_cluster(run, self.client)
        return result

    def _setup(self) -> Any:
        """The replicas' setup on every worker, scattered once (with the driver's FFTW wisdom planned first)."""
        if self._setup_future is None:
            self.engine.plan_transforms()  # the driver's FFTW wisdom, shared with every worker
            self._setup_future = self.client.scatter(self.setup, broadcast=True, hash=False)
        return self._setup_future

    def _weights(self) -> Any:
        """The current kernels and biases on every worker: broadcast once per step (they change only there)."""
        if self._weights_future is None or self._weights_step != self.engine.steps:
            net = self.engine.net
            self._weights_future = self.client.scatter((dict(net.kernels), dict(net.biases)), broadcast=True,
                                                       hash=False)
            self._weights_step = self.engine.steps
        return self._weights_future

    def train_step(self, inputs: Mapping[str, np.ndarray], loss: Loss, hyper: Hyper
                   ) -> tuple[float, dict[str, np.ndarray]]:
        """One replica's step (the trainer's interface for one patch): see :meth:`train_steps`."""
        cost, outputs = self.train_steps([inputs], [loss], hyper)
        return cost[0], outputs[0]

    def train_steps(self, inputs: Sequence[Mapping[str, np.ndarray]], losses: Sequence[Loss], hyper: Hyper
                    ) -> tuple[list[float], list[dict[str, np.ndarray]]]:
        """One synchronous step on ``len(inputs)`` patches, one per replica: gradients summed by a tree on the
        workers, averaged, one update here. Returns each patch's cost and outputs."""
        result: tuple[list[float], list[dict[str, np.ndarray]]] = _on_cluster(
            lambda: self._step(inputs, losses, hyper), self.client)
        return result

    def _step(self, inputs: Sequence[Mapping[str, np.ndarray]], losses: Sequence[Loss], hyper: Hyper
              ) -> tuple[list[float], list[dict[str, np.ndarray]]]:
        t0 = time.perf_counter()
        client, net = self.client, self.engine.net
        setup_future, weights_future = self._setup(), self._weights()
        workers = sorted(client.scheduler_info()["workers"])
        self.placement = [workers[r % len(workers)] for r in range(len(inputs))]
        step = self.engine.steps
        results = [client.submit(replica_gradients, setup_future, weights_future,
                                 {k: np.asarray(v, net.dtype) for k, v in x.items()}, loss, step,
                                 workers=[where], allow_other_workers=True, pure=False)
                   for x, loss, where in zip(inputs, losses, self.placement)]
        grads = [client.submit(operator.getitem, r, "grads", pure=False) for r in results]
        while len(grads) > 1:  # a binary tree: pairs summed where their halves are
            grads = [client.submit(add_gradients, grads[i], grads[i + 1], pure=False) if i + 1 < len(grads)
                     else grads[i] for i in range(0, len(grads), 2)]
        summary = [client.submit(_without_grads, r, pure=False) for r in results]
        total, parts = client.gather([grads[0], summary])
        n = len(inputs)
        self.engine.apply_gradients({k: (g / n).astype(g.dtype, copy=False) for k, g in total.items()}, hyper)
        sent = _nbytes(dict(net.kernels)) + _nbytes(dict(net.biases))
        sent = sent * len(workers) + sum(_nbytes(x) for x in inputs) + _nbytes(total) * n
        self.reports.append(StepReport(time.perf_counter() - t0, max(p["seconds"] for p in parts), sent))
        return [float(p["cost"]) for p in parts], [p["outputs"] for p in parts]


def _without_grads(result: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "grads"}


def _nbytes(arrays: Any) -> int:
    if isinstance(arrays, np.ndarray):
        return int(arrays.nbytes)
    if isinstance(arrays, Mapping):
        return sum(_nbytes(v) for v in arrays.values())
    if isinstance(arrays, (tuple, list)):
        return sum(_nbytes(v) for v in arrays)
    return 0


def _on_cluster(work: Any, client: Any) -> Any:
    """``work()``, with the loss of the cluster (scheduler gone, connection refused or closed) as ClusterLost.

    A client that gave up reconnecting closes itself, and what it was doing then fails in whatever way its closed
    state makes it (seen: AttributeError from inside ``Client.scatter``): any failure while ``client`` is closed is
    the lost cluster, not a bug to show as a traceback."""
    from distributed.client import ClosedClientError
    from distributed.comm.core import CommClosedError

    try:
        return work()
    except (CommClosedError, ClosedClientError, OSError, TimeoutError) as exc:
        raise ClusterLost(f"lost the dask scheduler during a step ({type(exc).__name__}: {exc})") from None
    except Exception as exc:
        if client.status not in ("closing", "closed"):
            raise
        raise ClusterLost(f"lost the dask scheduler during a step (the client closed: {type(exc).__name__}: "
                          f"{exc})") from None
