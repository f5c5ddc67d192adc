"""Run a network's graphs: forward passes and training steps on one scheduler, keeping the spectra cache."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from dask.base import tokenize
from dask.optimization import cull

from znn.environment import keep_freed_memory
from znn.network import Network
from znn.pipeline.graph import tasks
from znn.pipeline.graph.build import (
    Hyper,
    Loss,
    cached_spectra,
    edge_hyper,
    forward_graph,
    step_data,
    step_graph,
    task_priorities,
)
from znn.pipeline.graph.cache import SpectraCache
from znn.pipeline.graph.memory import StepMemory, step_memory
from znn.pipeline.graph.reuse import Reusable
from znn.pipeline.graph.plan import NetPlan, make_plan
from znn.pipeline.run.schedulers import Runner, make_runner


class Engine:
    """A network planned at one output patch, with a runner and a kernel-spectra cache.

    ``forward`` returns the output node groups as (maps, z, y, x) arrays; ``train_step`` runs forward, ``loss``
    (a function of the outputs returning the cost and the gradient of each output), backward and the SGD
    update, and writes the new parameters into ``net``.
    """

    def __init__(self, net: Network, output_patch: Sequence[int], modes: str | Mapping[str, str] = "fft",
                 runner: Runner | None = None, seed: int = 0, spectra_cache: bool = True,
                 cache_bytes: int | None = None, plan_workers: int | None = None, reuse_graphs: bool = True):
        """``plan_workers``: the workers the graphs' tasks are split for (default: the runner's; the synchronous
        scheduler's is 1). A graph planned for W workers gives the same numbers on every scheduler; graphs
        planned for other W differ by rounding (sums over other blocks). ``reuse_graphs``: build a step's graph
        once and run it again on each step's values (in-process runners; off: built for every step, as on a
        cluster, which ``znn bench net`` compares)."""
        keep_freed_memory()  # each step allocates what the last one freed: keep it mapped (see there)
        self.net = net
        self.runner = runner or make_runner("threads")
        from znn.pipeline.forward.autotune import (  # measures each layer once, remembers
            resolve_modes,
            wants_optimize,
        )

        workers = plan_workers if plan_workers is not None else self.runner.workers
        if wants_optimize(modes):  # timed on the tasks of the graph planned for these workers
            modes = resolve_modes(net.spec, output_patch, modes, net.dtype, workers=workers)
        self.plan: NetPlan = make_plan(net.spec, output_patch, modes, workers)
        self.seed = seed
        self.cache = SpectraCache(spectra_cache, cache_bytes)
        self.steps = 0
        self._planned: set[str] = set()
        # step kind -> (what it was built for, the graph, the structure of its wanted keys)
        self._reusable: dict[str, tuple[Any, Reusable, Any]] = {}
        self.reuse_graphs = reuse_graphs

    @property
    def _threads(self) -> int:
        """Cores the graphs run on: a threaded scheduler's workers (narrow stages then thread their tasks);
        one for the synchronous scheduler and for a cluster's single-threaded worker processes."""
        return self.runner.workers if self.runner.kind == "threads" else 1

    @property
    def input_patch(self) -> dict[str, tuple[int, int, int]]:
        return self.plan.layout.input_patch

    def step_memory(self) -> StepMemory:
        """The predicted peak of a training step's arrays (:mod:`znn.pipeline.graph.memory`) on this engine's
        workers."""
        return step_memory(self.plan, self.net, self._threads)

    def forward(self, inputs: Mapping[str, np.ndarray], training: bool = False) -> dict[str, np.ndarray]:
        self._plan_transforms("forward")
        g = forward_graph(self.plan, self.net, self._cast(inputs), training=training, seed=self.seed,
                          step=self.steps, cache=self.cache, threads=self._threads)
        wanted: dict[str, Any] = {"out": {n: g.act[n] for n in self.plan.spec.outputs}, "kspec": g.new_kspec}
        result = _get(self.runner, g.dsk, wanted, task_priorities(g))
        for edge, spectra in result["kspec"].items():
            self.cache.put(edge, self.plan.edges[edge].fft_shape, spectra)  # type: ignore[arg-type]
        return {n: tasks.concat_maps(blocks) for n, blocks in result["out"].items()}

    def train_step(self, inputs: Mapping[str, np.ndarray], loss: Loss, hyper: Hyper) -> tuple[float, dict[str, np.ndarray]]:
        """One step; returns the cost and the outputs of the forward pass."""
        result = self._step("update", inputs, loss, hyper)
        self._apply(result)
        self.steps += 1
        return float(result["cost"]), {n: tasks.concat_maps(b) for n, b in result["outputs"].items()}

    def gradients(self, inputs: Mapping[str, np.ndarray], loss: Loss) -> tuple[float, dict[str, np.ndarray]]:
        """The cost and the gradient of every kernel (by edge) and bias (by node), without updating."""
        cost, _, grads = self.step_gradients(inputs, loss)
        return cost, grads

    def step_gradients(self, inputs: Mapping[str, np.ndarray], loss: Loss
                       ) -> tuple[float, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The cost, the outputs of the forward pass and the gradient of every kernel (by edge) and bias (by
        node), without updating: what a replica of data-parallel training computes for its patch."""
        result = self._step("gradients", inputs, loss, Hyper(0.0, 0.0, 0.0))
        grads = {name: triple[2] for group in ("kernels", "biases") for name, triple in result[group].items()}
        outputs = {n: tasks.concat_maps(b) for n, b in result["outputs"].items()}
        return float(result["cost"]), outputs, grads

    def _step(self, kind: str, inputs: Mapping[str, np.ndarray], loss: Loss, hyper: Hyper) -> Any:
        """Run a training step's graph (``kind`` update: every result :meth:`_apply` takes; gradients: the cost,
        outputs and gradients) and return its results.

        In-process the graph is built once per kind, hyperparameters and set of cached kernel spectra, and run
        again on each step's values (:mod:`~znn.pipeline.graph.reuse`); a cluster gets a graph built for the step,
        its keys named from its data."""
        self._plan_transforms("step")
        inputs = self._cast(inputs)
        if self.runner.distributed or not self.reuse_graphs:
            g, res = step_graph(self.plan, self.net, inputs, loss, hyper, seed=self.seed, step=self.steps,
                                cache=self.cache, threads=self._threads)
            return _get(self.runner, g.dsk, self._wanted(kind, res, hyper), task_priorities(g))
        shape = (kind, hyper, tuple(sorted(cached_spectra(self.plan, self.cache))))
        built = self._reusable.get(kind)
        if built is None or built[0] != shape:
            token = f"{kind}-{tokenize(shape, self.plan.output_patch, self.plan.workers, self.seed)}"
            g, res = step_graph(self.plan, self.net, inputs, loss, hyper, seed=self.seed, step=self.steps,
                                cache=self.cache, threads=self._threads, token=token)
            wanted = self._wanted(kind, res, hyper)
            flat: list[Any] = []
            _flatten(wanted, flat)
            built = (shape, Reusable.of(g, flat), wanted)
            self._reusable[kind] = built  # one per kind: annealing or a new cache state replaces it
            values = {k: g.dsk[k] for k in g.data_keys}
        else:
            values = step_data(self.plan, self.net, inputs, loss, token=built[1].token, step=self.steps,
                               cache=self.cache)
        reusable = built[1]
        return _rebuild(built[2], iter(self.runner.get(reusable.graph(values), reusable.keys, reusable.priority)))

    def _wanted(self, kind: str, res: dict[str, Any], hyper: Hyper) -> dict[str, Any]:
        """The results of a step graph a step of ``kind`` collects: an update skips the kernels of edges that do
        not learn (eta 0) and keeps their spectra instead."""
        if kind == "gradients":
            return {"cost": res["cost"], "outputs": res["outputs"], "kernels": res["kernels"],
                    "biases": res["biases"]}
        frozen = {e for e in res["kernels"] if _eta(self.net.spec.edges[e].options, hyper) == 0}
        return {"cost": res["cost"], "outputs": res["outputs"],
                "kernels": {e: k for e, k in res["kernels"].items() if e not in frozen},
                "biases": res["biases"], "kspec": {e: k for e, k in res["kspec"].items() if e in frozen}}

    def apply_gradients(self, grads: Mapping[str, np.ndarray], hyper: Hyper) -> None:
        """One SGD update of every kernel and bias from ``grads`` (by edge and node, as :meth:`gradients` gives
        them), with the per-edge eta, momentum and weight decay of the .znn file, as :meth:`train_step` does;
        edges whose eta is 0 keep their kernels (and cached spectra)."""
        net = self.net
        for edge in net.spec.conv_edges():
            h = edge_hyper(net.spec.edges[edge].options, hyper)
            if h.eta == 0:
                continue
            net.kernels[edge], net.kernel_momentum[edge] = tasks.update(
                net.kernels[edge], net.kernel_momentum[edge], grads[edge], h.eta, h.momentum, h.weight_decay,
                h.patch_size)
            self.cache.invalidate(edge)
        for node in net.spec.bias_nodes():
            net.biases[node], net.bias_momentum[node] = tasks.update(
                net.biases[node], net.bias_momentum[node], grads[node], hyper.eta, hyper.momentum,
                hyper.weight_decay, hyper.patch_size)
        self.steps += 1

    def set_parameters(self, kernels: Mapping[str, np.ndarray], biases: Mapping[str, np.ndarray]) -> None:
        """Take these kernels and biases (a replica receiving the current weights); spectra of kernels that
        changed are forgotten."""
        for edge, kernel in kernels.items():
            if self.net.kernels[edge] is not kernel and not np.array_equal(self.net.kernels[edge], kernel):
                self.cache.invalidate(edge)
            self.net.kernels[edge] = kernel
        self.net.biases.update(biases)

    def plan_transforms(self) -> None:
        """Plan the FFTs of a training step here and share the wisdom with the cluster's workers (see
        :meth:`_plan_transforms`)."""
        self._plan_transforms("step")

    def _plan_transforms(self, kind: str) -> None:
        """On a cluster, plan every FFT in this process once (a pass on zeros) and share the wisdom, so workers
        use the same algorithms as the driver: same numbers on every scheduler."""
        if not self.runner.distributed or kind in self._planned:
            return
        zeros = {n: np.zeros((self.net.spec.nodes[n].size, *p), self.net.dtype) for n, p in self.input_patch.items()}
        if kind == "forward":
            g = forward_graph(self.plan, self.net, zeros, seed=self.seed)
            _get(_IN_PROCESS, g.dsk, {n: g.act[n] for n in self.plan.spec.outputs})
        else:
            g, res = step_graph(self.plan, self.net, zeros, _zero_loss, Hyper(0.0, 0.0, 0.0), seed=self.seed)
            _get(_IN_PROCESS, g.dsk, res["kernels"])
        self.runner.share_fft_wisdom()
        self._planned.add(kind)

    def _apply(self, result: dict[str, Any]) -> None:
        for edge, (kernel, velocity, _) in result["kernels"].items():
            self.net.kernels[edge], self.net.kernel_momentum[edge] = kernel, velocity
            self.cache.invalidate(edge)
        for node, (bias, velocity, _) in result["biases"].items():
            self.net.biases[node], self.net.bias_momentum[node] = bias, velocity
        for edge, spectra in result["kspec"].items():
            self.cache.put(edge, self.plan.edges[edge].fft_shape, spectra)  # type: ignore[arg-type]

    def _cast(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        dtype = self.net.dtype
        return {k: np.asarray(v, dtype=dtype) for k, v in inputs.items()}


_IN_PROCESS = make_runner("synchronous")


def _zero_loss(outputs: dict[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
    return 0.0, {n: np.zeros_like(y) for n, y in outputs.items()}


def _eta(options: Mapping[str, str], hyper: Hyper) -> float:
    return float(options["eta"]) if "eta" in options else hyper.eta


def _get(runner: Runner, dsk: dict[Any, Any], wanted: Any, priority: dict[Any, int] | None = None) -> Any:
    """Compute a nested structure (dicts and lists) of keys, culling the graph to what it needs; ready tasks of
    higher ``priority`` first."""
    flat: list[Any] = []
    _flatten(wanted, flat)
    needed, _ = cull(dsk, flat)
    values = runner.get(needed, flat, priority)
    return _rebuild(wanted, iter(values))


def _is_key(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) > 0 and isinstance(x[0], str) and not callable(x[0])


def _flatten(x: Any, out: list[Any]) -> None:
    if isinstance(x, dict):
        for v in x.values():
            _flatten(v, out)
    elif isinstance(x, list):
        for v in x:
            _flatten(v, out)
    else:
        out.append(x)


def _rebuild(x: Any, values: Any) -> Any:
    if isinstance(x, dict):
        return {k: _rebuild(v, values) for k, v in x.items()}
    if isinstance(x, list):
        return [_rebuild(v, values) for v in x]
    return next(values)
