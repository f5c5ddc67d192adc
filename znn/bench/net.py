"""Benchmark of a whole network: forward pass and training step on the task-graph engine, and PyTorch's.

``znn bench net NET.znn --outsz z,y,x`` builds the network (seeded random init), then reports:

* ``forward``: one inference pass (kernel spectra cached, as in dense inference), median of ``--repeat`` runs
  after a warm-up that plans the FFTs;
* ``step``: one training step (forward, loss, backward, SGD update of every kernel and bias), median, each
  without cached kernel spectra, after a warm-up of two steps each after a forward (:func:`_settle`); beside it
  ``step_sys``, the system CPU time of the process during a step (page faults of memory new to it);
* ``overhead``: the share of a step not spent inside tasks, measured on the *synchronous* scheduler, where
  nothing waits for anything: ``(wall - sum of task times) / wall``. It counts building the graph (or, as training
  runs it, putting a step's values into the graph built once), culling, dask's bookkeeping and the engine's own
  work around ``get``; it is the cost of expressing the step as a graph, free of idle time. ``overhead_rebuilt``
  is the same with the graph built for every step (as a cluster gets it);
* ``efficiency``: on the threaded scheduler, ``max(critical path, sum of task times / workers) / wall``: how
  close the run comes to the best any scheduler could do with those tasks (1.0 = no idle worker beyond what
  the graph's dependencies force). ``parallel`` is ``sum of task times / (workers * wall)``;
* ``peak``: the largest amount of memory NumPy held during one step (``tracemalloc``, which NumPy reports its
  allocations to), above what was held before it, beside the peak :mod:`znn.pipeline.graph.memory` predicts
  from the plan (``step_predicted_bytes``);
* PyTorch (when importable, unless ``--no-torch``): the same network from :func:`build_torch_net` with the same
  weights and thread count, timed for a no-grad forward and a forward + backward + SGD step, and the largest
  difference between its forward outputs and ours, relative to the output's largest magnitude.

The loss is a logistic cross-entropy towards 0.5 (bounded gradients) and the learning rate is tiny, so that
the random network stays finite over the repetitions; timings of overflowing arithmetic would mean nothing.
Ours and PyTorch's runs are interleaved repetition by repetition so machine noise hits both alike. Where the two
do not fit in memory side by side (3d_5 at 32^3 on 24 GB: ours holds ~19 GB resident, PyTorch ~4 GB),
``--torch-apart`` times PyTorch first, in a child process that has exited before our side is built (the same
weights and inputs, from the same seed; the runs are then not interleaved, and the report says so). Either way
PyTorch runs with the malloc setting our side has (:func:`znn.environment.keep_freed_memory`, set by the ``znn``
command before either starts): left at glibc's default, it returns each step's big blocks and faults them in again
(3d_5 at 32^3: 33 s a step, 17 s of it system time, against 19.6 s kept in a process of its own; in the
``--torch-apart`` child, with the settings in its environment, its steps still spent 16-31 s of 30-40 s in system
time, for a reason not found).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import statistics
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from dask.core import get_deps, istask
from dask.task_spec import Task, TaskRef

from znn.bench.common import import_torch
from znn.environment import keep_freed_memory_environment
from znn.network import Network
from znn.pipeline.graph.build import Hyper
from znn.pipeline.run.schedulers import Runner, cores
from znn.pipeline.train.engine import Engine
from znn.types import Triple

__all__ = ["TimingRunner", "GraphRun", "NetRequest", "run_net_bench", "run_net_benches", "format_report",
           "format_summary"]

DEFAULT_ETA = 1e-6


# ---------------------------------------------------------------------------------------------- task timing


class _Timed:
    """A task's function, recording ``(key, start, stop)`` of each call into a shared log."""

    __slots__ = ("fn", "key", "log")

    def __init__(self, fn: Callable[..., Any], key: Any, log: list[tuple[Any, float, float]]):
        self.fn, self.key, self.log = fn, key, log

    def __call__(self, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.log.append((self.key, t0, time.perf_counter()))  # list.append is atomic


@dataclass
class GraphRun:
    """One ``get``: its wall time, every task's run time, and the graph's dependencies."""

    wall: float
    tasks: dict[Any, float]
    dependencies: dict[Any, set[Any]]

    @property
    def busy(self) -> float:
        return sum(self.tasks.values())

    def critical_path(self) -> float:
        """The longest chain of dependent tasks, weighted by their measured times."""
        finish: dict[Any, float] = {}

        def visit(key: Any) -> float:
            stack = [key]
            while stack:
                k = stack[-1]
                if k in finish:
                    stack.pop()
                    continue
                pending = [d for d in self.dependencies.get(k, ()) if d not in finish]
                if pending:
                    stack.extend(pending)
                    continue
                before = max((finish[d] for d in self.dependencies.get(k, ())), default=0.0)
                finish[k] = before + self.tasks.get(k, 0.0)
                stack.pop()
            return finish[key]

        return max((visit(k) for k in self.dependencies), default=0.0)

    def by_op(self) -> dict[str, float]:
        """Total task time per operation (the key's name up to the layer)."""
        out: dict[str, float] = defaultdict(float)
        for key, t in self.tasks.items():
            name = key[0] if isinstance(key, tuple) else str(key)
            out[name.split("-")[0]] += t
        return dict(out)

    def by_layer(self) -> dict[str, float]:
        """Total task time per operation and layer (keys ``op-layer-token``; layer names may hold dashes)."""
        out: dict[str, float] = defaultdict(float)
        for key, t in self.tasks.items():
            name = key[0] if isinstance(key, tuple) else str(key)
            parts = name.split("-")
            out["-".join(parts[:-1]) if len(parts) > 2 else name] += t
        return dict(out)


@dataclass
class TimingRunner(Runner):
    """A :class:`Runner` that times every task of the graphs it runs (a wrapper around each task's function,
    so the times are the functions' own, on the worker that ran them)."""

    runs: list[GraphRun] = field(default_factory=list)

    def get(self, dsk: dict[Any, Any], keys: Any, priority: dict[Any, int] | None = None) -> Any:
        log: list[tuple[Any, float, float]] = []
        timed = {k: _wrap(v, k, log) for k, v in dsk.items()}
        t0 = time.perf_counter()
        result = super().get(timed, keys, priority)
        wall = time.perf_counter() - t0
        dependencies, _ = get_deps(dsk)
        busy: dict[Any, float] = defaultdict(float)
        for k, a, b in log:
            busy[k] += b - a
        self.runs.append(GraphRun(wall, dict(busy), dependencies))
        return result


def _wrap(task: Any, key: Any, log: list[tuple[Any, float, float]]) -> Any:
    """``task`` with the function of it and of every task nested in its arguments timed under ``key`` (nested
    tasks run before their parent's function, on the same worker, as part of the same task). A task in dask's
    task spec (a reused step graph, :mod:`znn.pipeline.graph.reuse`) is timed whole: its dependencies' values in,
    its result out."""
    if isinstance(task, Task):
        deps = tuple(task.dependencies)
        return Task(key, _Timed(functools.partial(_evaluate, task, deps), key, log), *(TaskRef(d) for d in deps))
    if istask(task):  # a legacy tuple task (a Task is caught above)
        return (_Timed(task[0], key, log), *(_wrap(a, key, log) for a in task[1:]))
    if isinstance(task, list):
        return [_wrap(a, key, log) for a in task]
    return task


def _evaluate(task: Task, deps: tuple[Any, ...], *values: Any) -> Any:
    return task(dict(zip(deps, values)))


# ---------------------------------------------------------------------------------------------- the problem


def bounded_loss(outputs: dict[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
    """Logistic cross-entropy of every output voxel towards 0.5: bounded gradients keep training finite."""
    cost, grads = 0.0, {}
    for name, y in outputs.items():
        p = 1.0 / (1.0 + np.exp(-np.clip(y, -60, 60)))
        cost += float(np.sum(np.logaddexp(0.0, y) - 0.5 * y))
        grads[name] = (p - 0.5).astype(y.dtype, copy=False)
    return cost, grads


def _inputs(net: Network, patch: dict[str, Triple], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal((net.spec.nodes[k].size, *v)).astype(net.dtype) for k, v in patch.items()}


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


# ---------------------------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class NetRequest:
    """What to measure: ``network`` (a .znn file, or a .h5 checkpoint: its spec, random weights) at output patch
    ``outsz`` with ``threads`` workers and PyTorch threads (0: every core), ``repeat`` timed runs, conv ``mode`` of
    every layer (optimize measures each layer once and remembers), learning rate ``eta`` of the timed steps and
    ``sync_repeat`` synchronous steps for the overhead; ``plan_workers``: build the step as for that many workers
    while running it on ``threads`` (a small machine then shows the parallelism a large one would get)."""

    network: str | Path
    outsz: Triple
    threads: int = 0
    repeat: int = 5
    mode: str = "fft"
    torch: bool = True
    dtype: str = "float32"
    seed: int = 0
    eta: float = DEFAULT_ETA
    sync_repeat: int = 2
    plan_workers: int | None = None  # the workers the step's tasks are split for (default: ``threads``)
    torch_apart: bool = False  # time PyTorch in a child process before our side is built (not interleaved)


@dataclass
class _Bench:
    """The built problem: our network on the timing engine, its inputs and SGD numbers, and PyTorch's side."""

    request: NetRequest
    net: Network
    engine: Engine
    runner: TimingRunner
    inputs: dict[str, np.ndarray]
    hyper: Hyper
    workers: int
    tnet: _TorchSide | None

    def step(self, engine: Engine | None = None) -> tuple[float, Any]:
        """One training step of ``engine`` (default: the threaded one); its cost and outputs."""
        return (engine or self.engine).train_step(self.inputs, bounded_loss, self.hyper)

    def fresh_step(self) -> tuple[float, Any]:
        """A step as training takes it: no kernel spectra cached (the step before updated the kernels), though the
        forwards timed or run before it left them in the cache (3d_5 at 32^3 skipped 18 s of kernel transforms
        of 50 s)."""
        self.engine.cache.clear()
        return self.step()


def _network(request: NetRequest) -> Network:
    """The benchmarked network with its seeded random weights (the same in a child process)."""
    from znn.pipeline.jobs.describe import load_any_network

    return Network.initialise(load_any_network(request.network), seed=request.seed, dtype=np.dtype(request.dtype))


def _build(request: NetRequest) -> tuple[_Bench, dict[str, Any]]:
    """The problem, and the report's first entries (what was measured, the engine's setup time)."""
    outsz = request.outsz
    workers = cores(request.threads)
    net = _network(request)
    spec = net.spec
    t0 = time.perf_counter()
    runner = TimingRunner("threads", workers)
    plan_workers = request.plan_workers or workers
    engine = Engine(net.copy(), outsz, request.mode, runner, seed=request.seed, plan_workers=plan_workers)
    setup_s = time.perf_counter() - t0
    inputs = _inputs(net, engine.input_patch, request.seed)
    modes = {e: p.mode for e, p in engine.plan.edges.items() if spec.edges[e].type == "conv"}
    report: dict[str, Any] = {
        "network": str(request.network), "outsz": list(outsz),
        "input_patch": {k: list(v) for k, v in engine.input_patch.items()}, "threads": workers,
        "plan_workers": plan_workers,
        "repeat": request.repeat, "dtype": request.dtype, "mode": request.mode, "modes": modes,
        "setup_s": round(setup_s, 3), "machine": _machine(),
    }
    tmod = import_torch() if request.torch and not request.torch_apart else None
    tnet = _TorchSide(tmod, net, outsz, inputs, request.eta, workers) if tmod is not None else None
    hyper = Hyper(request.eta, 0.9, 0.0, float(math.prod(outsz)))
    return _Bench(request, net, engine, runner, inputs, hyper, workers, tnet), report


def run_net_bench(request: NetRequest, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure ``request.network`` at output patch ``request.outsz``; returns the report as a dict (see
    :func:`format_report`)."""
    say = progress or (lambda s: None)
    apart = _torch_apart(request, say) if request.torch and request.torch_apart and import_torch() else None
    bench, report = _build(request)
    say("warm-up (plans FFTs)")
    ours_out = _warm_up(bench, report)
    times, step_runs = _timed_runs(bench, say)
    if apart is not None:
        times.update(apart.times)
        report.update(torch_apart=True, torch_max_rel_diff=apart.compare(ours_out, bench.engine.input_patch))
    for name, values in times.items():
        report[f"{name}_s"] = _median(values)
        report[f"{name}_all_s"] = [round(v, 4) for v in values]
    report.update(_threaded_efficiency(times["step"], step_runs, bench.workers))
    say(f"synchronous step x{request.sync_repeat} (overhead)")
    report.update(_sync_overhead(bench, report["modes"]))
    say("peak memory of one step")
    report["peak_bytes"] = _peak(bench.fresh_step)
    report["step_predicted_bytes"] = bench.engine.step_memory().peak
    report["final_cost_finite"] = bool(np.isfinite(bench.step()[0]))
    voxels = math.prod(request.outsz)
    report["train_vox_s"] = voxels / report["step_s"]
    if "torch_step_s" in report:
        report["torch"] = getattr(import_torch(), "__version__", None)
        report["step_vs_torch"] = report["step_s"] / report["torch_step_s"]
        report["forward_vs_torch"] = report["forward_s"] / report["torch_forward_s"]
        report["torch_train_vox_s"] = voxels / report["torch_step_s"]
    return report


def run_net_benches(request: NetRequest, threads: Sequence[int],
                    progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """:func:`run_net_bench` at each thread count of ``threads`` (the plan's workers follow ``threads`` unless
    ``request.plan_workers`` fixes them)."""
    say = progress or (lambda s: None)
    reports = []
    for count in threads:
        if len(threads) > 1:
            say(f"threads {cores(count)}")
        reports.append(run_net_bench(replace(request, threads=count), progress))
    return reports


def _warm_up(bench: _Bench, report: dict[str, Any]) -> dict[str, np.ndarray]:
    """Plan the FFTs of every pass (ours and PyTorch's); compare the two networks' first outputs, which are
    returned."""
    ours_out = bench.engine.forward(bench.inputs)
    if bench.tnet is not None:
        report["torch_max_rel_diff"] = bench.tnet.compare(ours_out)
    _settle(bench.fresh_step, lambda: bench.engine.forward(bench.inputs))
    if bench.tnet is not None:
        _settle(bench.tnet.step, bench.tnet.forward)
    return ours_out


def _settle(step: Callable[[], Any], forward: Callable[[], Any]) -> None:
    """Step and forward twice after the first forward: the second step, after a forward has filled the spectra
    cache, takes the process's memory to what steps and forwards need side by side (as training's test passes
    do), and the last forward caches the spectra the timed forwards use. With one step only, the first timed
    step paid for that growth (3d_5 at 32^3: 20.6 s against 10.6-11.2 s, mostly system time faulting in pages
    new to the process, which costs ~10 s per GB on a VM whose host backs memory on first touch)."""
    for _ in range(2):
        step()
        forward()


@dataclass
class _TorchApart:
    """PyTorch's timings from a child process, with its first forward outputs and the input patch it ran on."""

    times: dict[str, list[float]]
    outputs: dict[str, np.ndarray]
    input_patch: dict[str, Triple]

    def compare(self, ours: dict[str, np.ndarray], input_patch: dict[str, Triple]) -> float:
        if input_patch != self.input_patch:
            raise RuntimeError(f"PyTorch ran on input patch {self.input_patch}, ours on {input_patch}")
        return _max_rel_diff(ours, self.outputs)


def _torch_apart(request: NetRequest, say: Callable[[str], None]) -> _TorchApart:
    """Time PyTorch (warm-up, then ``repeat`` forwards and steps) in a child process, which exits before this one
    builds anything: its memory is returned first."""
    import multiprocessing

    say(f"PyTorch in a child process: warm-up, forward x{request.repeat}, step x{request.repeat}")
    # the child's malloc keeps freed memory from its start, as ours and an interleaved PyTorch's do (set inside it,
    # the setting would come after importing torch started threads, too late for them): left at glibc's default,
    # PyTorch returns each step's big blocks and faults them in again (3d_5 at 32^3: 33 s a step against 19.6 s)
    with _environment(keep_freed_memory_environment()), multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_torch_child, (request,))


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """These environment variables set while the block runs (for child processes started in it), then restored."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def _torch_child(request: NetRequest) -> _TorchApart:
    from znn.bench.torchnet import build_torch_net

    net = _network(request)
    patch = build_torch_net(net, request.outsz, training=False).input_patch
    side = _TorchSide(import_torch(), net, request.outsz, _inputs(net, patch, request.seed), request.eta,
                      cores(request.threads))
    outputs = {k: v[0].numpy().copy() for k, v in side.forward().items()}
    _settle(side.step, side.forward)
    times: dict[str, list[float]] = defaultdict(list)
    for name, fn in (("torch_forward", side.forward), ("torch_step", side.step)):
        for _ in range(request.repeat):
            _timed(times, name, fn)
    return _TorchApart(dict(times), outputs, dict(patch))


def _timed(times: dict[str, list[float]], name: str, fn: Callable[[], Any]) -> None:
    """Run ``fn``; append its wall seconds to ``times[name]`` and the process's system CPU seconds meanwhile to
    ``times[name + "_sys"]`` (page faults of memory new to the process show there)."""
    sys0, t = os.times().system, time.perf_counter()
    fn()
    times[name].append(time.perf_counter() - t)
    times[f"{name}_sys"].append(os.times().system - sys0)


def _timed_runs(bench: _Bench, say: Callable[[str], None]) -> tuple[dict[str, list[float]], list[GraphRun]]:
    """Seconds of each forward and step run (ours and PyTorch's, interleaved) and the task timings of each of our
    steps."""
    times: dict[str, list[float]] = defaultdict(list)
    timed = functools.partial(_timed, times)
    repeat = bench.request.repeat
    say(f"forward x{repeat}")
    for _ in range(repeat):
        timed("forward", lambda: bench.engine.forward(bench.inputs))
        if bench.tnet is not None:
            timed("torch_forward", bench.tnet.forward)
    say(f"step x{repeat}")
    step_runs: list[GraphRun] = []
    for _ in range(repeat):
        timed("step", bench.fresh_step)
        step_runs.append(bench.runner.runs[-1])
        if bench.tnet is not None:
            timed("torch_step", bench.tnet.step)
    return times, step_runs


def _threaded_efficiency(walls: Sequence[float], step_runs: Sequence[GraphRun], workers: int) -> dict[str, Any]:
    """How close the median step (by wall time) came to the best schedule of its tasks on ``workers``."""
    wall, graph = sorted(zip(walls, step_runs), key=lambda p: p[0])[len(step_runs) // 2]
    cp, busy = graph.critical_path(), graph.busy
    return {
        "step_tasks": len(graph.tasks), "step_busy_s": busy, "step_critical_path_s": cp,
        "step_available_parallelism": busy / cp if cp > 0 else 1.0,
        "step_efficiency": max(cp, busy / workers) / wall, "step_parallel": busy / (workers * wall),
        "step_get_s": graph.wall, "step_by_op_s": {k: round(v, 4) for k, v in sorted(graph.by_op().items())},
        "step_by_layer_s": {k: round(v, 4) for k, v in sorted(graph.by_layer().items())},
    }


def _sync_overhead(bench: _Bench, modes: dict[str, str]) -> dict[str, Any]:
    """The share of a synchronous step spent outside tasks (and outside dask's get), medians: with the step's
    graph built once and run again (what training does, :mod:`znn.pipeline.graph.reuse`) and built for every step
    (as a cluster gets it, and every step was before)."""
    report: dict[str, Any] = {}
    for reuse, suffix in ((True, ""), (False, "_rebuilt")):
        runner = TimingRunner("synchronous", 1)
        sync = Engine(bench.net.copy(), bench.request.outsz, modes if modes else bench.request.mode, runner,
                      seed=bench.request.seed, plan_workers=bench.engine.plan.workers, reuse_graphs=reuse)
        bench.step(sync)
        shares, sync_walls = [], []
        for _ in range(bench.request.sync_repeat):
            t = time.perf_counter()
            bench.step(sync)
            w = time.perf_counter() - t
            r = runner.runs[-1]
            sync_walls.append(w)
            shares.append(((w - r.busy) / w, (w - r.wall) / w))
        report.update({f"sync_step_s{suffix}": _median(sync_walls), f"overhead{suffix}": _median([s[0] for s in shares]),
                       f"overhead_outside_get{suffix}": _median([s[1] for s in shares])})
    return report


def _peak(fn: Callable[[], Any]) -> int:
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return int(peak - base)


def _machine() -> dict[str, Any]:
    from znn.environment import machine
    from znn.pipeline.forward.autotune import machine_id

    return {**machine(), "id": machine_id(), "python": platform.python_version()}


class _TorchSide:
    """The PyTorch network with the same weights: inference copy, training copy with its optimiser."""

    def __init__(self, torch: Any, net: Network, outsz: Triple, inputs: dict[str, np.ndarray], eta: float,
                 threads: int):
        from znn.bench.torchnet import build_torch_net, to_tensors

        self.torch = torch
        torch.set_num_threads(threads)
        self.eval_net = build_torch_net(net, outsz, training=False)
        self.train_net = build_torch_net(net, outsz, training=True)
        self.opt = torch.optim.SGD(self.train_net.parameters(), lr=eta / math.prod(outsz), momentum=0.9)
        self.inputs = to_tensors(inputs)

    def forward(self) -> dict[str, Any]:
        with self.torch.no_grad():
            return self.eval_net(self.inputs)  # type: ignore[no-any-return]

    def step(self) -> None:
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        outputs = self.train_net(self.inputs)
        loss = sum(torch.nn.functional.binary_cross_entropy_with_logits(y, torch.full_like(y, 0.5),
                                                                        reduction="sum")
                   for y in outputs.values())
        loss.backward()
        self.opt.step()

    def compare(self, ours: dict[str, np.ndarray]) -> float:
        """Largest |ours - torch| relative to the largest |torch| of each output, over the outputs."""
        return _max_rel_diff(ours, {k: v[0].numpy() for k, v in self.forward().items()})


def _max_rel_diff(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> float:
    """Largest |ours - theirs| relative to the largest |theirs| of each output, over the outputs."""
    worst = 0.0
    for name, y in ours.items():
        t = theirs[name].astype(np.float64)
        worst = max(worst, float(np.abs(y - t).max() / max(np.abs(t).max(), 1e-30)))
    return worst


# ---------------------------------------------------------------------------------------------- output


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1e3 * value:.0f} ms"


def format_report(r: dict[str, Any]) -> str:
    """The report as a plain-text table with the definitions of its figures."""
    torch = "torch_step_s" in r
    lines = [
        f"network {r['network']}  output {'x'.join(map(str, r['outsz']))}  input "
        + ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in r["input_patch"].items())
        + f"  threads {r['threads']}  planned for {r['plan_workers']} workers  {r['dtype']}  mode {r['mode']}",
        "conv modes: " + ", ".join(f"{e}={m}" for e, m in r["modes"].items()),
        "",
        f"{'':24}{'ours':>12}{'pytorch' if torch else '':>12}{'ours/torch' if torch else '':>12}",
        f"{'forward (inference)':24}{_ms(r['forward_s']):>12}"
        + (f"{_ms(r['torch_forward_s']):>12}{r['forward_vs_torch']:>12.2f}" if torch else ""),
        f"{'training step':24}{_ms(r['step_s']):>12}"
        + (f"{_ms(r['torch_step_s']):>12}{r['step_vs_torch']:>12.2f}" if torch else ""),
        f"{'training, output vox/s':24}{r['train_vox_s']:>12,.0f}"
        + (f"{r['torch_train_vox_s']:>12,.0f}{r['train_vox_s'] / r['torch_train_vox_s']:>12.2f}" if torch else ""),
        "",
        f"scheduler overhead      {100 * r['overhead']:.1f}% of a synchronous step ({_ms(r['sync_step_s'])}; "
        f"{100 * r['overhead_outside_get']:.1f}% outside dask's get); the graph built for every step: "
        f"{100 * r['overhead_rebuilt']:.1f}% ({_ms(r['sync_step_s_rebuilt'])}; "
        f"{100 * r['overhead_outside_get_rebuilt']:.1f}%)",
        f"threaded efficiency     {r['step_efficiency']:.2f}  (critical path {_ms(r['step_critical_path_s'])}, "
        f"task time {_ms(r['step_busy_s'])} in {r['step_tasks']} tasks, parallel {r['step_parallel']:.2f})",
        f"available parallelism   {r['step_available_parallelism']:.1f}  (task time / critical path of the graph "
        f"planned for {r['plan_workers']} workers)",
        f"peak memory of a step   {r['peak_bytes'] / 2**20:.0f} MiB (NumPy, tracemalloc); predicted "
        f"{r.get('step_predicted_bytes', 0) / 2**20:.0f} MiB (znn.pipeline.graph.memory)",
    ]
    if "step_sys_s" in r:
        lines.append(f"system CPU time a step  {_ms(r['step_sys_s'])} ours"
                     + (f", {_ms(r.get('torch_step_sys_s'))} pytorch" if torch else "")
                     + " (medians; page faults of memory new to the process, allocator calls)")
    if torch:
        lines.append(f"forward vs pytorch      max |ours - torch| / max |torch| = {r['torch_max_rel_diff']:.1e}")
    if r.get("torch_apart"):
        lines.append("pytorch                 timed in a child process before ours was built (--torch-apart): "
                     "not interleaved")
    lines += [
        "",
        f"medians of {r['repeat']} runs after a warm-up. overhead = (wall - sum of task times) / wall on the "
        "synchronous scheduler;",
        "efficiency = max(critical path, task time / workers) / wall on the threaded scheduler.",
        "task time by op (threaded step): " + ", ".join(f"{k} {1e3 * v:.0f}" for k, v in
                                                         sorted(r["step_by_op_s"].items(), key=lambda kv: -kv[1])
                                                         if v >= 0.0005) + " ms",
    ]
    return "\n".join(lines)


def format_summary(reports: Sequence[dict[str, Any]]) -> str:
    """One line per thread count: the step's time beside PyTorch's, its efficiency and available parallelism."""
    lines = [f"{'threads':>8}{'plan W':>8}{'ours step':>12}{'torch step':>12}{'ours/torch':>12}{'efficiency':>12}"
             f"{'parallelism':>13}{'train vox/s':>13}{'torch vox/s':>13}"]
    for r in reports:
        ratio = f"{r['step_vs_torch']:.2f}" if "step_vs_torch" in r else "-"
        torch_vox = f"{r['torch_train_vox_s']:,.0f}" if "torch_train_vox_s" in r else "-"
        lines.append(f"{r['threads']:>8}{r['plan_workers']:>8}{_ms(r['step_s']):>12}{_ms(r.get('torch_step_s')):>12}"
                     f"{ratio:>12}{r['step_efficiency']:>12.2f}{r['step_available_parallelism']:>13.1f}"
                     f"{r['train_vox_s']:>13,.0f}{torch_vox:>13}")
    return "\n".join(lines)
