"""Dask graphs of a network: one forward pass, and one training step (forward, loss, backward, update).

Keys are ``("<op>-<layer>-<token>", block...)`` (:class:`~znn.pipeline.graph.core.Graph`): the same network, inputs
and step give the same keys. The values a graph starts with enter it through ``Graph.data`` (:func:`_forward_data`,
:func:`_step_data`), so :func:`step_data` gives a step graph built once the values of a new step
(:mod:`~znn.pipeline.graph.reuse`). Feature maps are grouped into blocks and direct conv layers into slabs of rows, as
the plan sized them for its workers (:mod:`znn.pipeline.graph.blocks`); each kind of edge has its builder
(:mod:`~znn.pipeline.graph.fft_edges`, :mod:`~znn.pipeline.graph.direct_edges`,
:mod:`~znn.pipeline.graph.one_to_one_edges`), and this module joins them through the node groups.

Every task has a priority (:func:`task_priorities`; higher runs first among ready tasks), from the phase of its
operation (:class:`~znn.pipeline.graph.core.Op`) and the depth of its layer, as in ZNN: the longer the chain of
layers still to run after a task, the sooner it runs (the forward pass shallow layers first, so kernel spectra of
deep layers fill idle cores instead of delaying layer one; then the loss; then the backward chain of input
gradients), kernel gradients after that, and weight updates last, so they fill cores the critical path leaves idle
instead of delaying it: layer L's kernel gradient and update overlap layer L-1's backward.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

import numpy as np
from dask.base import tokenize

from znn.errors import ShapeError
from znn.network import Network
from znn.pipeline.graph import direct_edges, fft_edges, one_to_one_edges, tasks
from znn.pipeline.graph.cache import SpectraCache
from znn.pipeline.graph.core import Graph, Key, Op, Phase, call
from znn.pipeline.graph.direct_edges import Finish
from znn.pipeline.graph.plan import NetPlan
from znn.spec import NodeGroup

__all__ = ["Graph", "Hyper", "Loss", "cached_spectra", "edge_hyper", "forward_graph", "step_data", "step_graph",
           "task_priorities", "layer_depths"]

Loss = Callable[[dict[str, np.ndarray]], tuple[float, dict[str, np.ndarray]]]


def forward_graph(plan: NetPlan, net: Network, inputs: Mapping[str, np.ndarray], *, training: bool = False,
                  seed: int = 0, step: int = 0, cache: SpectraCache | None = None, threads: int = 1,
                  token: str | None = None) -> Graph:
    """The forward pass for ``inputs`` (input node -> (maps, z, y, x) patches of the planned extent).

    ``threads``: the cores the graph will run on (the workers of a threaded scheduler, else 1); stages with
    fewer tasks than that give their tasks several threads. Keys and numbers do not depend on it.
    ``token``: the keys' token; by default one of the data, so that different data never share a key (a cluster
    may hold results of an earlier graph); a graph built to be run again on new values
    (:mod:`~znn.pipeline.graph.reuse`) names its own.
    """
    spec = plan.spec
    _check_inputs(plan, inputs)
    if token is None:
        token = tokenize(plan.output_patch, plan.workers, {k: plan.edges[k].mode for k in plan.edges}, net.kernels,
                         net.biases, dict(inputs), training, seed, step)
    g = Graph(plan, token, threads=max(1, int(threads)))
    _forward_data(g, net, inputs, training, step, cache)
    for node in spec.order():
        if spec.nodes[node].type == "input":
            continue
        finish = _fused_finish(g, node, training)
        for edge in spec.incoming[node]:
            _edge_forward(g, edge, training, seed, finish)
        if finish is not None:  # the conv edge's tasks applied the node: their results are its activations
            g.act[node] = list(g.fwd[spec.incoming[node][0]])
        else:
            _node_forward(g, node, training)
    return g


def _forward_data(g: Graph, net: Network, inputs: Mapping[str, np.ndarray], training: bool, step: int,
                  cache: SpectraCache | None) -> None:
    """Every value a forward pass starts with: parameters, the input patches (and their blocks), the step's
    number when training, the kernel spectra the cache holds."""
    spec = g.plan.spec
    for name in spec.conv_edges():
        g.params[name] = g.data(Op.KERNEL, name, value=net.kernels[name])
    for name in spec.bias_nodes():
        g.params[name] = g.data(Op.BIAS, name, value=net.biases[name])
    for name in spec.inputs:
        _input_node(g, name, inputs[name])
    if training:
        g.step_key = g.data(Op.STEP, "net", value=int(step))
    for name, spectra in cached_spectra(g.plan, cache).items():
        g.kspec[name] = [[g.data(Op.CACHED_SPECTRA, name, i, j, value=a) for j, a in enumerate(row)]
                         for i, row in enumerate(spectra)]


def cached_spectra(plan: NetPlan, cache: SpectraCache | None) -> dict[str, list[list[np.ndarray]]]:
    """The kernel spectra ``cache`` holds for FFT-mode conv edges of ``plan`` (edge -> [in block][out block])."""
    found = {}
    for name in plan.spec.conv_edges():
        ep = plan.edges[name]
        spectra = cache.get(name, ep.fft_shape) if cache is not None and ep.mode == "fft" else None
        if spectra is not None:
            found[name] = spectra
    return found


def _check_inputs(plan: NetPlan, inputs: Mapping[str, np.ndarray]) -> None:
    for name in plan.spec.inputs:
        if name not in inputs:
            raise ShapeError(f"no data for network input {name!r}; the network's inputs are {plan.spec.inputs}")
        want = (plan.spec.nodes[name].size, *plan.layout.extent[name])
        if tuple(inputs[name].shape) != want:
            raise ShapeError(f"input {name!r} has shape {tuple(inputs[name].shape)}, the network needs {want} "
                             f"for output patch {plan.output_patch}")


def _input_node(g: Graph, node: str, data: np.ndarray) -> None:
    blocks = g.plan.blocks[node]
    if len(blocks) == 1:
        g.act[node] = [g.data(Op.INPUT, node, 0, value=np.ascontiguousarray(data))]
        return
    whole = g.data(Op.INPUT, node, value=data)
    g.act[node] = [g.key(Op.INPUT_BLOCK, node, i) for i in range(len(blocks))]
    for k, b in zip(g.act[node], blocks):
        g.dsk[k] = call(tasks.take_maps, whole, block=b)


def _fused_finish(g: Graph, node: str, training: bool) -> Finish:
    """A node fed by one conv edge is applied by that edge's own tasks (bias and transfer on their fresh output,
    without a task and two copies of the maps): its transfer and bias key, else None."""
    spec = g.plan.spec
    incoming = spec.incoming[node]
    if len(incoming) != 1 or spec.edges[incoming[0]].type != "conv":
        return None
    group = spec.nodes[node]
    return _transfer(group, training), (g.params[node] if group.type == "transfer" else None)


def _edge_forward(g: Graph, name: str, training: bool, seed: int, finish: Finish) -> None:
    edge = g.plan.spec.edges[name]
    if edge.type != "conv":
        one_to_one_edges.forward(g, name, training, seed)
    elif g.plan.edges[name].mode == "direct":
        direct_edges.forward(g, name, finish)
    else:
        fft_edges.forward(g, name, finish)


def edge_output(g: Graph, name: str, block: int) -> Any:
    """The (task computing the) output block of an edge, without its auxiliary backward data."""
    if g.plan.spec.edges[name].type == "conv":
        return g.fwd[name][block]
    return one_to_one_edges.output(g, name, block)


def _node_forward(g: Graph, node: str, training: bool) -> None:
    spec = g.plan.spec
    group = spec.nodes[node]
    maxout = any(spec.edges[e].type == "maxout" for e in spec.incoming[node])
    keys = []
    for b, block in enumerate(g.plan.blocks[node]):
        parts = [edge_output(g, e, b) for e in spec.incoming[node]]
        bias = call(tasks.take_maps, g.params[node], block=block) if group.type == "transfer" else None
        k = g.key(Op.MAXOUT if maxout else Op.NODE, node, b)
        g.dsk[k] = call(tasks.node_forward, bias, parts, node=_transfer(group, training), maxout=maxout)
        if maxout:
            g.fwd["maxout:" + node] = g.fwd.get("maxout:" + node, []) + [k]
            k = g.key(Op.ACTIVATION, node, b)
            g.dsk[k] = (tasks.item, g.fwd["maxout:" + node][b], 0)
        keys.append(k)
    g.act[node] = keys


def _transfer(group: NodeGroup, training: bool) -> tasks.NodeTransfer:
    return tasks.NodeTransfer(group.type, group.function, tuple(group.function_args), training)


# --------------------------------------------------------------------------------------------------------------
# task priorities

_KERNEL_GRADIENT, _UPDATE = -1, -2
_DATA = 1 << 30  # parameters and inputs: no work, ready at once


def layer_depths(spec: Any) -> dict[str, int]:
    """Depth of each node group (inputs 0, else one more than its deepest input) and of each edge (its output's)."""
    depth: dict[str, int] = {}
    for node in spec.order():
        incoming = spec.incoming[node]
        depth[node] = 1 + max(depth[spec.edges[e].input] for e in incoming) if incoming else 0
    depth.update({name: depth[edge.output] for name, edge in spec.edges.items()})
    return depth


def task_priorities(g: Graph) -> dict[Key, int]:
    """Priorities of the graph's keys by the phase of their operation and the depth d of their layer (D the
    deepest): forward tasks 2D+2-d (there are D-d layers, the loss and the backward pass after them), the loss
    D+1, backward tasks d (d layers of input gradients still to go), kernel gradients -1 and updates -2 (nothing
    waits for them); data keys first."""
    depth = layer_depths(g.plan.spec)
    top = max(depth.values())
    by_phase: dict[Phase, Callable[[int], int]] = {
        Phase.DATA: lambda d: _DATA, Phase.FORWARD: lambda d: 2 * top + 2 - d, Phase.LOSS: lambda d: top + 1,
        Phase.BACKWARD: lambda d: d, Phase.KERNEL_GRADIENT: lambda d: _KERNEL_GRADIENT,
        Phase.UPDATE: lambda d: _UPDATE}
    priority = dict.fromkeys(g.dsk, _DATA)
    for key, (op, layer) in g.origin.items():
        if key in g.dsk:
            priority[key] = by_phase[op.phase](depth.get(layer, 0))
    return priority


# --------------------------------------------------------------------------------------------------------------
# training step

@dataclass(frozen=True)
class Hyper:
    """Learning parameters of one step."""

    eta: float
    momentum: float
    weight_decay: float
    patch_size: float = 1.0  # ZNN divides data gradients by the number of output voxels


class GraphOptions(TypedDict, total=False):
    """The keyword options of :func:`forward_graph` that a training step passes on (same meaning and defaults)."""

    seed: int
    step: int
    cache: SpectraCache | None
    threads: int
    token: str | None


def step_graph(plan: NetPlan, net: Network, inputs: Mapping[str, np.ndarray], loss: Loss, hyper: Hyper,
               **options: Unpack[GraphOptions]) -> tuple[Graph, dict[str, Any]]:
    """Forward, loss, backward and update. Returns the graph and the keys of its results:
    ``cost``, ``outputs`` (node -> block keys), ``kernels``/``biases`` (group -> key of (param, momentum, grad)),
    ``kspec`` (edge -> kernel spectra keys computed here, for edges that are not updated)."""
    g = forward_graph(plan, net, inputs, training=True, **options)
    _step_data(g, net, loss)
    outputs = {n: g.act[n] for n in plan.spec.outputs}
    loss_key = g.key(Op.LOSS, "net")
    g.dsk[loss_key] = call(tasks.loss_task, list(outputs.values()), g.loss_key, names=list(outputs))
    pre = _backward(g, loss_key)
    cost_key = g.key(Op.COST, "net")
    g.dsk[cost_key] = (tasks.item, loss_key, 0)
    results: dict[str, Any] = {"cost": cost_key, "outputs": outputs, **_updates(g, hyper, pre)}
    results["kspec"] = dict(g.new_kspec)
    return g, results


def _step_data(g: Graph, net: Network, loss: Loss) -> None:
    """The values a step starts with besides the forward pass's: the loss and every parameter's velocity."""
    g.loss_key = g.data(Op.LOSS_FUNCTION, "net", value=loss)
    for name in g.plan.spec.conv_edges():
        g.momenta["kernel", name] = g.data(Op.KERNEL_MOMENTUM, name, value=net.kernel_momentum[name])
    for name in g.plan.spec.bias_nodes():
        g.momenta["bias", name] = g.data(Op.BIAS_MOMENTUM, name, value=net.bias_momentum[name])


def step_data(plan: NetPlan, net: Network, inputs: Mapping[str, np.ndarray], loss: Loss, *, token: str,
              step: int = 0, cache: SpectraCache | None = None) -> dict[Key, Any]:
    """The values (key -> value) a training step graph built by :func:`step_graph` with ``token`` starts with,
    for these inputs, loss, step number and the network's current parameters: what running that graph again for
    a new step needs (:mod:`~znn.pipeline.graph.reuse`). The same functions put them into both."""
    _check_inputs(plan, inputs)
    g = Graph(plan, token)
    _forward_data(g, net, inputs, True, step, cache)
    _step_data(g, net, loss)
    return {k: g.dsk[k] for k in g.data_keys}


def _backward(g: Graph, loss_key: Key) -> dict[str, list[Any]]:
    """The backward pass from the loss: per node group, the keys of its blocks' pre-transfer gradients."""
    plan, spec = g.plan, g.plan.spec
    grad_in: dict[str, list[list[Any]]] = {n: [[] for _ in plan.blocks[n]] for n in spec.nodes}
    for n in spec.outputs:
        for b, block in enumerate(plan.blocks[n]):
            grad_in[n][b].append(call(tasks.take_maps, (tasks.item, (tasks.item, loss_key, 1), n), block=block))
    pre: dict[str, list[Any]] = {}
    for node in reversed(spec.order()):
        group = spec.nodes[node]
        if group.type == "input":
            continue
        pre[node] = []
        for b in range(len(plan.blocks[node])):
            k = g.key(Op.NODE_GRADIENT, node, b)
            g.dsk[k] = call(tasks.node_backward, g.act[node][b], grad_in[node][b], node=_transfer(group, True))
            pre[node].append(k)
        for edge in spec.incoming[node]:
            for b, contribution in enumerate(_edge_backward(g, edge, pre[node])):
                grad_in[spec.edges[edge].input][b].append(contribution)
    return pre


def _updates(g: Graph, hyper: Hyper, pre: Mapping[str, list[Any]]) -> dict[str, dict[str, Key]]:
    """The SGD update of every kernel (per-edge hyperparameters) and bias: ``kernels`` and ``biases``, group ->
    key of (param, momentum, grad)."""
    spec = g.plan.spec
    results: dict[str, dict[str, Key]] = {"kernels": {}, "biases": {}}
    for name in spec.conv_edges():
        h = edge_hyper(spec.edges[name].options, hyper)
        k = g.key(Op.UPDATE, name)
        g.dsk[k] = call(tasks.kernel_gradient_update, g.params[name], g.momenta["kernel", name], g.gw[name],
                        eta=h.eta, momentum=h.momentum, weight_decay=h.weight_decay, patch_size=h.patch_size)
        results["kernels"][name] = k
    for name in spec.bias_nodes():
        k = g.key(Op.UPDATE, name)
        grads = [(tasks.bias_gradient, p) for p in pre[name]]
        g.dsk[k] = call(tasks.bias_gradient_update, g.params[name], g.momenta["bias", name], grads, eta=hyper.eta,
                        momentum=hyper.momentum, weight_decay=hyper.weight_decay, patch_size=hyper.patch_size)
        results["biases"][name] = k
    return results


def edge_hyper(options: Mapping[str, str], hyper: Hyper) -> Hyper:
    """Per-edge `eta`, `momentum`, `weight_decay` of the .znn file override the job's."""
    values = {k: float(options[k]) if k in options else getattr(hyper, k) for k in ("eta", "momentum", "weight_decay")}
    return Hyper(values["eta"], values["momentum"], values["weight_decay"], hyper.patch_size)


def _edge_backward(g: Graph, name: str, gy: list[Any]) -> list[Any]:
    """Tasks giving this edge's gradient contribution to each block of its input node (padded to its extent)."""
    if g.plan.spec.edges[name].type != "conv":
        return one_to_one_edges.backward(g, name, gy)
    if g.plan.edges[name].mode == "direct":
        return direct_edges.backward(g, name, gy)
    return fft_edges.backward(g, name, gy)
