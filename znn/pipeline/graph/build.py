"""Dask graphs of a network: one forward pass, and one training step (forward, loss, backward, update).

Keys are ``("<op>-<layer>-<token>", block...)``: the same network, inputs and step give the same keys. Feature
maps are grouped into blocks (:mod:`znn.pipeline.graph.blocks`); a conv edge in FFT mode becomes forward FFTs of each
input block, kernel FFTs of each (input block, output block), and per output block one multiply-accumulate over
all input blocks followed by one inverse FFT per output map. The input and kernel spectra of the forward pass are
the ones the backward pass uses; kernel spectra of edges that are not updated can come from a
:class:`~znn.pipeline.graph.cache.SpectraCache` instead of being recomputed.

Every task has a priority (:func:`task_priorities`; higher runs first among ready tasks), from the depth of its
layer, as in ZNN: the longer the chain of layers still to run after a task, the sooner it runs (the forward pass
shallow layers first, so kernel spectra of deep layers fill idle cores instead of delaying layer one; then the
loss; then the backward chain of input gradients), kernel gradients after that, and weight updates last, so they
fill cores the critical path leaves idle instead of delaying it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict, Unpack

import numpy as np
from dask.base import tokenize

from znn.errors import ShapeError
from znn.network import Network
from znn.pipeline.graph import tasks
from znn.pipeline.graph.cache import SpectraCache
from znn.pipeline.graph.edges import OneToOne
from znn.pipeline.graph.plan import NetPlan
from znn.spec import NodeGroup

Key = tuple[Any, ...]
Loss = Callable[[dict[str, np.ndarray]], tuple[float, dict[str, np.ndarray]]]


@dataclass
class Graph:
    """A task graph being built, with the keys of each node group's activation blocks."""

    plan: NetPlan
    token: str
    dsk: dict[Any, Any] = field(default_factory=dict)
    act: dict[str, list[Key]] = field(default_factory=dict)  # node -> activation block keys
    fwd: dict[str, list[Key]] = field(default_factory=dict)  # edge -> forward result keys (tuples with aux data)
    xspec: dict[str, list[Key]] = field(default_factory=dict)  # conv edge -> input spectra per input block
    kspec: dict[str, list[list[Any]]] = field(default_factory=dict)  # conv edge -> [ib][ob] key or cached array
    new_kspec: dict[str, list[list[Key]]] = field(default_factory=dict)  # kernel spectra computed in this graph
    params: dict[str, Key] = field(default_factory=dict)
    whole: dict[str, Key] = field(default_factory=dict)  # direct-mode conv edge -> the layer's one forward task
    gw: dict[str, list[list[Any]]] = field(default_factory=dict)  # conv edge -> kernel gradient [ib][ob] tasks
    threads: int = 1  # cores the graph runs on (workers of a threaded scheduler; 1 for one-thread workers)
    origin: dict[Key, tuple[str, str]] = field(default_factory=dict)  # task key -> (op, layer) it was made for

    def key(self, op: str, layer: str, *index: int) -> Key:
        key = (f"{op}-{layer}-{self.token}", *index)
        self.origin[key] = (op, layer)
        return key

    @property
    def priority(self) -> dict[Key, int]:
        """The priority of every key in the graph (see :func:`task_priorities`)."""
        return task_priorities(self)

    def task_threads(self, width: int) -> int:
        """Threads for each of ``width`` tasks that run side by side: a stage narrower than the machine splits
        its tasks over the idle cores (only kernels whose numbers do not depend on the split take them)."""
        return max(1, self.threads // max(1, width))


def forward_graph(plan: NetPlan, net: Network, inputs: Mapping[str, np.ndarray], *, training: bool = False,
                  seed: int = 0, step: int = 0, cache: SpectraCache | None = None, threads: int = 1) -> Graph:
    """The forward pass for ``inputs`` (input node -> (maps, z, y, x) patches of the planned extent).

    ``threads``: the cores the graph will run on (the workers of a threaded scheduler, else 1); stages with
    fewer blocks than that give their tasks several threads. Keys and numbers do not depend on it.
    """
    spec = plan.spec
    _check_inputs(plan, inputs)
    token = tokenize(plan.output_patch, {k: plan.edges[k].mode for k in plan.edges}, net.kernels, net.biases,
                     dict(inputs), training, seed, step)
    g = Graph(plan, token, threads=max(1, int(threads)))
    for name in spec.conv_edges():
        g.params[name] = ("kernel-" + name + "-" + token,)
        g.dsk[g.params[name]] = net.kernels[name]
    for name in spec.bias_nodes():
        g.params[name] = ("bias-" + name + "-" + token,)
        g.dsk[g.params[name]] = net.biases[name]
    for node in spec.order():
        if spec.nodes[node].type == "input":
            _input_node(g, node, inputs[node])
            continue
        for edge in spec.incoming[node]:
            _edge_forward(g, edge, net, training, seed, step, cache)
        _node_forward(g, node, training)
    return g


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
        g.act[node] = [g.key("input", node, 0)]
        g.dsk[g.act[node][0]] = np.ascontiguousarray(data)
        return
    whole = g.key("input", node)
    g.dsk[whole] = data
    g.act[node] = [g.key("inblock", node, i) for i in range(len(blocks))]
    for k, b in zip(g.act[node], blocks):
        g.dsk[k] = (tasks.take_maps, whole, b)


def _edge_forward(g: Graph, name: str, net: Network, training: bool, seed: int, step: int,
                  cache: SpectraCache | None) -> None:
    spec, ep = g.plan.spec, g.plan.edges[name]
    edge = spec.edges[name]
    xs = g.act[edge.input]
    if edge.type == "conv":
        _conv_forward(g, name, cache)
        return
    op = OneToOne.of(edge, ep.dilation)
    keys = [g.key(edge.type, name, i) for i in range(len(xs))]
    for i, (k, x) in enumerate(zip(keys, xs)):
        draw = _seed(seed, step, name, i) if training else None
        g.dsk[k] = (tasks.one_to_one, x, ep, op, draw)
    g.fwd[name] = keys


def _seed(seed: int, step: int, edge: str, block: int) -> tuple[int, ...]:
    import zlib

    return (int(seed), int(step), zlib.crc32(edge.encode()), int(block))


def edge_output(g: Graph, name: str, block: int) -> Any:
    """The (task computing the) output block of an edge, without its auxiliary backward data."""
    edge = g.plan.spec.edges[name]
    key = g.fwd[name][block]
    if edge.type != "conv" and OneToOne.of(edge, g.plan.edges[name].dilation).keeps_backward_data:
        return (tasks.item, key, 0)
    return key


def _conv_forward(g: Graph, name: str, cache: SpectraCache | None) -> None:
    spec, ep = g.plan.spec, g.plan.edges[name]
    edge = spec.edges[name]
    in_blocks, out_blocks = g.plan.blocks[edge.input], g.plan.blocks[edge.output]
    xs, kernel = g.act[edge.input], g.params[name]
    if ep.mode == "direct":  # one task for the layer, on every core of the graph (tasks.conv_direct_layer)
        whole = g.key("conv", name)
        g.dsk[whole] = (tasks.conv_direct_layer, xs, kernel, out_blocks, ep, g.threads)
        g.fwd[name] = [g.key("conv", name, j) for j in range(len(out_blocks))]
        for j, k in enumerate(g.fwd[name]):
            g.dsk[k] = (tasks.item, whole, j)
        g.whole[name] = whole
        return
    shape = ep.fft_shape
    g.xspec[name] = [g.key("xfft", name, i) for i in range(len(in_blocks))]
    for k, x in zip(g.xspec[name], xs):
        g.dsk[k] = (tasks.input_spectra, x, ep.crop_lo, ep.need, shape)
    cached = cache.get(name, shape) if cache is not None else None
    if cached is not None:
        g.kspec[name] = cached
    else:
        g.kspec[name] = [[g.key("kfft", name, i, j) for j in range(len(out_blocks))] for i in range(len(in_blocks))]
        for i, ib in enumerate(in_blocks):
            for j, ob in enumerate(out_blocks):
                g.dsk[g.kspec[name][i][j]] = (tasks.kernel_spectra, kernel, ib, ob, ep.dilation, shape)
        g.new_kspec[name] = g.kspec[name]
    keys = [g.key("conv", name, j) for j in range(len(out_blocks))]
    for j, k in enumerate(keys):
        column = [g.kspec[name][i][j] for i in range(len(in_blocks))]
        g.dsk[k] = (tasks.conv_fft_forward, g.xspec[name], column, ep, g.task_threads(len(out_blocks)))
    g.fwd[name] = keys


def _node_forward(g: Graph, node: str, training: bool) -> None:
    spec = g.plan.spec
    group = spec.nodes[node]
    incoming = spec.incoming[node]
    if len(incoming) == 1 and spec.edges[incoming[0]].type == "conv":
        _fuse_into_conv(g, node, incoming[0], training)
        return
    maxout = any(spec.edges[e].type == "maxout" for e in incoming)
    keys = []
    for b, block in enumerate(g.plan.blocks[node]):
        parts = [edge_output(g, e, b) for e in spec.incoming[node]]
        bias = (tasks.take_maps, g.params[node], block) if group.type == "transfer" else None
        k = g.key("maxout" if maxout else "node", node, b)
        g.dsk[k] = (tasks.node_forward, _transfer(group, training), bias, parts, maxout)
        if maxout:
            g.fwd["maxout:" + node] = g.fwd.get("maxout:" + node, []) + [k]
            k = g.key("act", node, b)
            g.dsk[k] = (tasks.item, g.fwd["maxout:" + node][b], 0)
        keys.append(k)
    g.act[node] = keys


def _fuse_into_conv(g: Graph, node: str, edge: str, training: bool) -> None:
    """A node fed by one conv edge: each of the edge's output-block tasks also adds the bias and applies the
    transfer (the task's arguments end with the node's), and its result is the node's activation block."""
    group = g.plan.spec.nodes[node]
    keys = g.fwd[edge]
    if edge in g.whole:  # direct mode: the layer's one task, with the whole bias
        bias = g.params[node] if group.type == "transfer" else None
        g.dsk[g.whole[edge]] = (*g.dsk[g.whole[edge]], _transfer(group, training), bias)
        g.act[node] = list(keys)
        return
    for b, block in enumerate(g.plan.blocks[node]):
        bias = (tasks.take_maps, g.params[node], block) if group.type == "transfer" else None
        g.dsk[keys[b]] = (*g.dsk[keys[b]], _transfer(group, training), bias)
    g.act[node] = list(keys)


def _transfer(group: NodeGroup, training: bool) -> tasks.NodeTransfer:
    return tasks.NodeTransfer(group.type, group.function, tuple(group.function_args), training)


# --------------------------------------------------------------------------------------------------------------
# task priorities

_BACKWARD_OPS = frozenset({"gpre", "gfft", "gx", "gconv"})  # the chain of input gradients, output to input
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
    """Priorities of the graph's keys by the depth d of their layer (D the deepest): forward tasks 2D+2-d (there
    are D-d layers, the loss and the backward pass after them), the loss D+1, backward tasks d (d layers of input
    gradients still to go), kernel gradients -1 and updates -2 (nothing waits for them); data keys first."""
    depth = layer_depths(g.plan.spec)
    top = max(depth.values())
    priority = dict.fromkeys(g.dsk, _DATA)
    for key, (op, layer) in g.origin.items():
        if key not in g.dsk:
            continue
        if op == "update":
            priority[key] = _UPDATE
        elif op == "gw":
            priority[key] = _KERNEL_GRADIENT
        elif op in _BACKWARD_OPS:
            priority[key] = depth[layer]
        elif op in ("loss", "cost"):
            priority[key] = top + 1
        elif op not in ("input", "inblock"):
            priority[key] = 2 * top + 2 - depth[layer]
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


def step_graph(plan: NetPlan, net: Network, inputs: Mapping[str, np.ndarray], loss: Loss, hyper: Hyper,
               **options: Unpack[GraphOptions]) -> tuple[Graph, dict[str, Any]]:
    """Forward, loss, backward and update. Returns the graph and the keys of its results:
    ``cost``, ``outputs`` (node -> block keys), ``kernels``/``biases`` (group -> key of (param, momentum, grad)),
    ``kspec`` (edge -> kernel spectra keys computed here, for edges that are not updated)."""
    g = forward_graph(plan, net, inputs, training=True, **options)
    outputs = {n: g.act[n] for n in plan.spec.outputs}
    loss_key = g.key("loss", "net")
    g.dsk[loss_key] = (tasks.loss_task, loss, list(outputs), list(outputs.values()))
    pre = _backward(g, loss_key)
    cost_key = g.key("cost", "net")
    g.dsk[cost_key] = (tasks.item, loss_key, 0)
    results: dict[str, Any] = {"cost": cost_key, "outputs": outputs, **_updates(g, net, hyper, pre)}
    results["kspec"] = dict(g.new_kspec)
    return g, results


def _backward(g: Graph, loss_key: Key) -> dict[str, list[Any]]:
    """The backward pass from the loss: per node group, the keys of its blocks' pre-transfer gradients."""
    plan, spec = g.plan, g.plan.spec
    grad_in: dict[str, list[list[Any]]] = {n: [[] for _ in plan.blocks[n]] for n in spec.nodes}
    for n in spec.outputs:
        for b, block in enumerate(plan.blocks[n]):
            grad_in[n][b].append((tasks.take_maps, (tasks.item, (tasks.item, loss_key, 1), n), block))
    pre: dict[str, list[Any]] = {}
    for node in reversed(spec.order()):
        group = spec.nodes[node]
        if group.type == "input":
            continue
        pre[node] = []
        for b in range(len(plan.blocks[node])):
            k = g.key("gpre", node, b)
            g.dsk[k] = (tasks.node_backward, _transfer(group, True), g.act[node][b], grad_in[node][b])
            pre[node].append(k)
        for edge in spec.incoming[node]:
            for b, contribution in enumerate(_edge_backward(g, edge, pre[node])):
                grad_in[spec.edges[edge].input][b].append(contribution)
    return pre


def _updates(g: Graph, net: Network, hyper: Hyper, pre: Mapping[str, list[Any]]) -> dict[str, dict[str, Key]]:
    """The SGD update of every kernel (per-edge hyperparameters) and bias: ``kernels`` and ``biases``, group ->
    key of (param, momentum, grad)."""
    spec = g.plan.spec
    results: dict[str, dict[str, Key]] = {"kernels": {}, "biases": {}}
    for name in spec.conv_edges():
        h = _edge_hyper(spec.edges[name].options, hyper)
        k = g.key("update", name)
        g.dsk[k] = (tasks.kernel_gradient_update, g.params[name], net.kernel_momentum[name], g.gw[name],
                    h.eta, h.momentum, h.weight_decay, h.patch_size)
        results["kernels"][name] = k
    for name in spec.bias_nodes():
        k = g.key("update", name)
        grads = [(tasks.bias_gradient, p) for p in pre[name]]
        g.dsk[k] = (tasks.bias_gradient_update, g.params[name], net.bias_momentum[name], grads, hyper.eta,
                    hyper.momentum, hyper.weight_decay, hyper.patch_size)
        results["biases"][name] = k
    return results


def _edge_hyper(options: Mapping[str, str], hyper: Hyper) -> Hyper:
    """Per-edge `eta`, `momentum`, `weight_decay` of the .znn file override the job's."""
    values = {k: float(options[k]) if k in options else getattr(hyper, k) for k in ("eta", "momentum", "weight_decay")}
    return Hyper(values["eta"], values["momentum"], values["weight_decay"], hyper.patch_size)


def _edge_backward(g: Graph, name: str, gy: list[Any]) -> list[Any]:
    """Tasks giving this edge's gradient contribution to each block of its input node (padded to its extent)."""
    spec, ep = g.plan.spec, g.plan.edges[name]
    edge = spec.edges[name]
    if edge.type == "conv":
        return _conv_backward(g, name, gy)
    op = OneToOne.of(edge, ep.dilation)
    if edge.type == "maxout":  # the node routes each voxel's gradient to the edge that won it
        which = g.fwd["maxout:" + edge.output]
        index = spec.incoming[edge.output].index(name)
        gy = [(tasks.maxout_route, gy[b], (tasks.item, which[b], 1), index) for b in range(len(gy))]
    fwd = g.fwd[name] if op.keeps_backward_data else [None] * len(gy)
    return [(tasks.one_to_one_backward, gy[b], fwd[b], ep, op) for b in range(len(gy))]


def _conv_backward(g: Graph, name: str, gy: list[Any]) -> list[Any]:
    spec, ep = g.plan.spec, g.plan.edges[name]
    edge = spec.edges[name]
    in_blocks, out_blocks = g.plan.blocks[edge.input], g.plan.blocks[edge.output]
    xs, kernel = g.act[edge.input], g.params[name]
    if ep.mode == "direct":
        grad_input = spec.nodes[edge.input].type != "input"  # a network input needs no gradient
        k = g.key("gconv", name)
        g.dsk[k] = (tasks.conv_direct_layer_backward, xs, kernel, in_blocks, gy, ep, g.threads, grad_input)
        g.gw[name] = [[(tasks.item, k, 1)]]
        return [(tasks.item, (tasks.item, k, 0), i) for i in range(len(in_blocks))] if grad_input else []
    shape = ep.fft_shape
    gspec = [g.key("gfft", name, j) for j in range(len(out_blocks))]
    for j, k in enumerate(gspec):
        g.dsk[k] = (tasks.grad_output_spectra, gy[j], shape, edge.size, ep.dilation)
    grads = []
    for i in range(len(in_blocks) if spec.nodes[edge.input].type != "input" else 0):  # inputs need no gradient
        k = g.key("gx", name, i)
        g.dsk[k] = (tasks.conv_fft_grad_input, gspec, g.kspec[name][i], shape, ep.need, ep.crop_lo, ep.in_extent,
                    g.task_threads(len(in_blocks)))
        grads.append(k)
    gw = [[g.key("gw", name, i, j) for j in range(len(out_blocks))] for i in range(len(in_blocks))]
    for i in range(len(in_blocks)):
        for j in range(len(out_blocks)):
            g.dsk[gw[i][j]] = (tasks.conv_fft_grad_kernel, g.xspec[name][i], gspec[j], shape, edge.size, ep.dilation)
    g.gw[name] = gw
    return grads
