"""Training: what ZNN's ``train.py -c config.cfg`` did, on the task-graph engine.

A step samples a patch (random location, augmentation), runs forward, the cost function (with masks,
rebalancing weights and optionally MALIS weighting), backward and the SGD update as one dask graph. Every
``Num_iter_per_test`` steps ``test_num`` validation patches give the validation cost, pixel error and Rand error;
every ``Num_iter_per_save`` steps the network and its learning curve are saved as ``<prefix>_<iter>.h5`` and
``<prefix>_current.h5`` (atomically) with the curve drawn next to them. A rerun resumes from
``<prefix>_current.h5``.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from znn.errors import CheckpointError, TrainingError, ZnnError
from znn.io.checkpoint import load_checkpoint, load_statistics, save_checkpoint
from znn.io.config import Job
from znn.network import Network
from znn.ops import loss as losses
from znn.ops import wisdom
from znn.ops.sgd import anneal
from znn.pipeline.graph.build import Hyper
from znn.pipeline.train.curve import LearningCurve
from znn.pipeline.train.engine import Engine
from znn.pipeline.train.replicas import ClusterLost, ReplicaEngine
from znn.spec import NetworkSpec

if TYPE_CHECKING:
    from znn.ops.malis import NormType


def patch_loss(outputs: dict[str, np.ndarray], cost_fn: str, targets: Mapping[str, np.ndarray],
               weights: Mapping[str, np.ndarray | None], masks: Mapping[str, np.ndarray | None],
               malis: Mapping[str, tuple[NormType, np.ndarray]] | None = None) -> tuple[float, dict[str, np.ndarray]]:
    """Cost and output gradients for one patch (module level so a task can carry it to any worker).

    ``malis[node] = (norm_type, segmentation)`` multiplies that output's weights by MALIS weights computed from
    its predicted affinities.
    """
    total, grads = 0.0, {}
    for node, y in outputs.items():
        weight = weights.get(node)
        if malis and node in malis:
            weight = _malis_weight(y, *malis[node], weight)
        cost, grad = losses.LOSSES[cost_fn](y, targets[node], masks.get(node), weight)
        total += cost
        grads[node] = grad
    return total, grads


def _malis_weight(y: np.ndarray, norm_type: NormType, segmentation: np.ndarray,
                  weight: np.ndarray | None) -> np.ndarray:
    from znn.ops.malis import malis_weights  # scipy.sparse: imported when MALIS is on

    w = malis_weights(losses.sigmoid(y), segmentation, norm_type)[0].astype(y.dtype)
    return w if weight is None else w * weight


def predictions(outputs: Mapping[str, np.ndarray], cost_fn: str) -> dict[str, np.ndarray]:
    """Network outputs as the probabilities the cost function models (softmax or sigmoid)."""
    if cost_fn == "softmax_loss":
        return {n: losses.softmax(y) for n, y in outputs.items()}
    if cost_fn == "binomial_cross_entropy":
        return {n: losses.sigmoid(y) for n, y in outputs.items()}
    return dict(outputs)


@dataclass
class Schedule:
    """The job's numbers that drive the loop."""

    max_iter: int
    show_every: int
    test_every: int
    save_every: int
    test_num: int
    eta: float
    anneal_factor: float
    anneal_every: int
    momentum: float
    weight_decay: float

    @classmethod
    def from_job(cls, job: Job) -> "Schedule":
        return cls(job.Max_iter, job.Num_iter_per_show, job.Num_iter_per_test, job.Num_iter_per_save, job.test_num,
                   job.eta, job.anneal_factor, job.Num_iter_per_annealing, job.momentum, job.weight_decay)

    def hyper(self, iteration: int, patch_voxels: int) -> Hyper:
        eta = anneal(self.eta, self.anneal_factor, iteration, self.anneal_every)
        return Hyper(eta, self.momentum, self.weight_decay, float(patch_voxels))


def seed_network(net: Network, seed_path: str | Path, log: Callable[[str], None]) -> None:
    """Initialise every parameter group of ``net`` whose name and shape match one in the checkpoint ``seed_path``;
    say which did not."""
    seed = load_checkpoint(seed_path)
    used, skipped = [], []
    for mine, theirs in ((net.kernels, seed.kernels), (net.biases, seed.biases)):
        for name, array in mine.items():
            if name in theirs and theirs[name].shape == array.shape:
                mine[name] = theirs[name].astype(array.dtype)
                used.append(name)
            else:
                why = "not in the seed" if name not in theirs else f"shape {theirs[name].shape} != {array.shape}"
                skipped.append(f"{name} ({why})")
    log(f"seeded {len(used)} groups from {seed_path}: {', '.join(used) or 'none'}")
    if skipped:
        log(f"kept the initialisation of {len(skipped)} groups: {', '.join(skipped)}")


def _first_non_finite(net: Network, inputs: Mapping[str, np.ndarray], output_patch: Sequence[int]) -> str | None:
    """The first node group (in evaluation order) whose forward values are not finite, as "layer X (node Y)"."""
    from znn.pipeline.forward.sequential import sequential_forward

    values: dict[str, np.ndarray] = {}
    with np.errstate(all="ignore"):
        sequential_forward(net, inputs, output_patch, mode="fft", keep=values)
    for node in net.spec.order():
        if node in values and not np.isfinite(values[node]).all():
            edges = ", ".join(net.spec.incoming.get(node, ())) or "input"
            return f"the forward pass at layer {edges} (node group {node})"
    return None


def checkpoint_paths(prefix: Path, iteration: int) -> tuple[Path, Path]:
    return Path(f"{prefix}_{iteration}.h5"), Path(f"{prefix}_current.h5")


def last_checkpoint(prefix: Path) -> str:
    """Where a rerun would resume, said for a person: ``<prefix>_current.h5`` with its iteration, or that there is
    no checkpoint yet (so the rerun starts afresh)."""
    current = checkpoint_paths(prefix, 0)[1]
    if not current.exists():
        return f"no checkpoint was saved yet ({current} does not exist; a rerun starts afresh)"
    try:
        iteration = load_statistics(current).get("iteration")
    except ZnnError:
        iteration = None
    at = "" if iteration is None else f" (iteration {int(iteration)})"
    return f"the last checkpoint is {current}{at}"


def resume(prefix: Path, spec: NetworkSpec, dtype: Any) -> tuple[Network, LearningCurve, int] | None:
    """The network, curve and iteration saved in ``<prefix>_current.h5``, or None to start afresh."""
    current = checkpoint_paths(prefix, 0)[1]
    if not current.exists():
        return None
    net = load_checkpoint(current, spec, dtype)
    stats = load_statistics(current)
    if "iteration" not in stats:
        raise CheckpointError(f"{current}: no statistics/iteration; it was not written by `znn train`. Move it "
                              "away to start afresh, or pass it with --seed")
    iteration = int(stats.pop("iteration"))
    curve = LearningCurve.from_statistics(stats)
    curve.truncate(iteration)
    return net, curve, iteration


@dataclass(frozen=True)
class PatchSource:
    """Where a run's patches come from. ``train(iteration)`` returns the patch of that iteration (drawn from the
    iteration number, so a run resumed from any checkpoint sees the patches an uninterrupted run would) and
    ``test(n)`` the validation patches (None: no validation); a patch has ``inputs``, ``targets``, ``masks``,
    ``weights`` (dicts keyed by node group) and, for MALIS, ``segmentation``. With data-parallel replicas,
    ``train(iteration, replica)`` is replica ``replica``'s patch (replica 0's is the one-replica patch)."""

    train: Callable[..., Any]
    test: Callable[[int], Sequence[Any]] | None = None


@dataclass(frozen=True)
class Objective:
    """What a step minimises and how its predictions score: the job's cost function, MALIS weighting (its
    normalisation; None: off) and ``evaluate(predictions, patch, with_rand)`` giving (pixel error, Rand error);
    training steps ask for the pixel error only (NaN Rand error), validation for both."""

    cost_fn: str
    evaluate: Callable[[Mapping[str, np.ndarray], Any, bool], tuple[float, float]]
    malis_norm: NormType | None = None


@dataclass(frozen=True)
class StartPoint:
    """Where a run starts: the learning curve so far and the iteration (a fresh run: an empty curve, 0)."""

    curve: LearningCurve | None = None
    iteration: int = 0


class Trainer:
    """Runs the training loop for one job: ``engine`` steps through ``schedule`` on the patches of ``patches``,
    minimising ``objective``, saving checkpoints ``<prefix>_<iteration>.h5`` from ``start`` on."""

    def __init__(self, engine: Engine | ReplicaEngine, schedule: Schedule, objective: Objective, patches: PatchSource,
                 prefix: Path, start: StartPoint = StartPoint(), log: Callable[[str], None] = print,
                 progress: Any = None):
        self.engine, self.schedule, self.prefix = engine, schedule, Path(prefix)
        self.cost_fn, self.malis_norm, self.evaluate = objective.cost_fn, objective.malis_norm, objective.evaluate
        self.train_patches, self.test_patches = patches.train, patches.test
        self.curve = start.curve or LearningCurve()
        self.iteration = start.iteration
        self.log = log
        self.progress = progress
        self.elapsed_before = self.curve.train["elapsed"][-1] if self.curve.train["elapsed"] else 0.0

    def _show_progress(self, cost: float) -> None:
        """One iteration on the progress line: its cost and the patches per second (per replica too when
        data-parallel: a replica much slower than ``samples/s / replicas`` is a worker to look at)."""
        replicas = self.replicas
        fields: dict[str, Any] = {"samples": replicas, "cost": f"{cost:.4f}"}
        if replicas > 1:
            elapsed = max(self.progress.elapsed, 1e-9)  # the rate with this step's patches counted
            per_replica = (self.progress.rate("samples") * elapsed + replicas) / elapsed / replicas
            fields["per replica"] = f"{per_replica:.2f} samples/s"
        self.progress.update(1, **fields)

    @property
    def patch_voxels(self) -> int:
        return int(np.prod(self.engine.plan.output_patch))

    def run(self, max_iter: int | None = None, time_limit: float | None = None) -> LearningCurve:
        """Train until ``max_iter`` (default: the job's Max_iter) or ``time_limit`` seconds; save at the end."""
        stop_at = self.schedule.max_iter if max_iter is None else max_iter
        start = time.perf_counter()
        window: list[tuple[float, float]] = []
        while self.iteration < stop_at:
            if time_limit is not None and time.perf_counter() - start > time_limit:
                self.log(f"time limit of {time_limit:.0f} s reached at iteration {self.iteration}")
                break
            try:
                cost, pixel_error = self._step()
            except ClusterLost as exc:
                raise TrainingError(f"step {self.iteration + 1}: {exc}; training stopped, "
                                    f"{last_checkpoint(self.prefix)}. Start a scheduler and rerun the same command: "
                                    "it resumes from there") from None
            self.iteration += 1
            window.append((cost, pixel_error))
            elapsed = self.elapsed_before + time.perf_counter() - start
            if self.iteration % self.schedule.show_every == 0 or self.iteration == stop_at:
                mean_cost, mean_pixel_error = np.mean(window, axis=0)
                self.curve.add("train", self.iteration, mean_cost, mean_pixel_error, math.nan, elapsed)
                window = []
            if self.test_patches is not None and self.iteration % self.schedule.test_every == 0:
                self.curve.add("test", self.iteration, *self.validate(), elapsed)
            if self.progress is not None:
                self._show_progress(cost)
            if self.iteration % self.schedule.save_every == 0:
                self.save(elapsed)
        if self.iteration % self.schedule.save_every != 0:
            self.save(self.elapsed_before + time.perf_counter() - start)
        return self.curve

    @property
    def replicas(self) -> int:
        return int(getattr(self.engine, "replicas", 1))

    def _step(self) -> tuple[float, float]:
        if self.replicas > 1:
            return self._replicated_step()
        patch = self.train_patches(self.iteration)
        loss = self._loss(patch)
        hyper = self.schedule.hyper(self.iteration, self.patch_voxels)
        net = self.engine.net
        before = dict(net.kernels), dict(net.biases)  # the step replaces arrays, never writes into them
        cost, outputs = self.engine.train_step(patch.inputs, loss, hyper)
        self._check_finite(cost, patch, before)
        pixel_error, _ = self.evaluate(predictions(outputs, self.cost_fn), patch, False)
        return cost / self.patch_voxels, pixel_error

    def _replicated_step(self) -> tuple[float, float]:
        """One data-parallel step: a patch per replica, one update from their averaged gradients; the mean cost
        per voxel and pixel error of the replicas' patches."""
        assert isinstance(self.engine, ReplicaEngine)
        patches = [self.train_patches(self.iteration, r) for r in range(self.replicas)]
        hyper = self.schedule.hyper(self.iteration, self.patch_voxels)
        net = self.engine.net
        before = dict(net.kernels), dict(net.biases)
        costs, outputs = self.engine.train_steps([p.inputs for p in patches], [self._loss(p) for p in patches],
                                                 hyper)
        worst = int(np.argmax([0 if math.isfinite(c) else 1 for c in costs]))
        self._check_finite(costs[worst], patches[worst], before)
        errors = [self.evaluate(predictions(out, self.cost_fn), p, False)[0] for out, p in zip(outputs, patches)]
        return float(np.mean(costs)) / self.patch_voxels, float(np.mean(errors))

    def _loss(self, patch: Any) -> Callable[[dict[str, np.ndarray]], tuple[float, dict[str, np.ndarray]]]:
        malis = None
        if self.malis_norm is not None:
            malis = {n: (self.malis_norm, patch.segmentation[n]) for n in patch.targets}
        return functools.partial(patch_loss, cost_fn=self.cost_fn, targets=patch.targets, weights=patch.weights,
                                 masks=patch.masks, malis=malis)

    def validate(self) -> tuple[float, float, float]:
        """Mean cost per voxel, pixel error and Rand error over the job's ``test_num`` validation patches."""
        rows = []
        for patch in self.test_patches(self.schedule.test_num) if self.test_patches is not None else ():
            outputs = self.engine.forward(patch.inputs)
            cost, _ = self._loss(patch)(outputs)
            pixel_error, rand_error = self.evaluate(predictions(outputs, self.cost_fn), patch, True)
            rows.append((cost / self.patch_voxels, pixel_error, rand_error))
        if not rows:
            return math.nan, math.nan, math.nan
        cost, pixel_error, rand_error = np.mean(rows, axis=0)
        return float(cost), float(pixel_error), float(rand_error)

    def _check_finite(self, cost: float, patch: Any, before: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]
                      ) -> None:
        """Stop with a TrainingError naming the step and the layer where non-finite values first appeared."""
        net = self.engine.net
        bad = [n for n, a in {**net.kernels, **net.biases}.items() if not np.isfinite(a).all()]
        if math.isfinite(cost) and not bad:
            return
        net.kernels.update(before[0])  # back to the last good parameters (kept in memory for the caller)
        net.biases.update(before[1])
        where = _first_non_finite(net, patch.inputs, self.engine.plan.output_patch)
        if where is None:
            where = (f"the cost ({cost})" if not math.isfinite(cost) else "the update") + (
                f", then the parameters of {', '.join(bad)}" if bad else "")
        raise TrainingError(f"step {self.iteration + 1}: non-finite values in {where}; training stopped, "
                            f"{last_checkpoint(self.prefix)}. Lower eta or check the data")

    def save(self, elapsed: float) -> Path:
        stats = self.curve.to_statistics()
        stats["iteration"] = np.asarray(self.iteration)
        stats["elapsed"] = np.asarray(elapsed)
        numbered, current = checkpoint_paths(self.prefix, self.iteration)
        save_checkpoint(numbered, self.engine.net, stats)
        save_checkpoint(current, self.engine.net, stats)
        self.curve.plot(Path(f"{self.prefix}_curve.png"), title=f"{self.prefix.name} at iteration {self.iteration}")
        wisdom.save_cache()  # the FFT plans of this run, for the next one (no-op when nothing new was planned)
        return current
