"""The memory of one training step, predicted from its graph before it runs.

The model walks the step's own graph (:func:`~znn.pipeline.graph.build.step_graph`, so it follows whatever split
the plan chose) in the order one worker runs it (the graph's priorities, dask's order between equals): every task
holds its output until the last task that reads it has run, and while it runs it also holds its working arrays.
Output and working bytes of each operation come from the plan (:func:`task_bytes`); the values in the graph (the
input patch, kernels, biases, momenta, cached kernel spectra) are counted at their size. With ``workers`` > 1, each
further worker may hold one more task's working arrays at once (the largest), an upper bound of what running
tasks side by side adds (their outputs are in the walk already); and each worker's cached FFTW objects
keep the last arrays they ran on alive (up to :data:`znn.ops.fft.PLAN_CACHE_BYTES`), counted as full.

What it predicts is the peak of NumPy's arrays during the step (what ``tracemalloc`` sees); the process adds its
baseline (interpreter, libraries, FFTW plans) and the allocator's slack. ``znn bench net`` prints it beside the
measured peak.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from dask.core import get_dependencies, istask
from dask.order import order

from znn.network import Network
from znn.ops import fft as fftops
from znn.ops.conv import TILE_BYTES, grad_input_method, largest_tile
from znn.ops.conv_fft import joins_blocks, transform_method
from znn.ops.fft import PLAN_CACHE_BYTES
from znn.ops.pooling import GRADIENT_SLAB_BYTES
from znn.pipeline.graph.build import Graph, Hyper, step_graph, task_priorities
from znn.pipeline.graph.blocks import MapBlock
from znn.pipeline.graph.core import Op
from znn.pipeline.graph.plan import EdgePlan, NetPlan

__all__ = ["StepMemory", "step_memory", "task_bytes"]

# Products a kernel-gradient task holds at once (znn.ops.conv_fft's column chunks), at most.
_PRODUCTS_BYTES = 8 << 20


@dataclass(frozen=True)
class StepMemory:
    """A step's arrays: ``peak``, the most bytes it allocates beyond what it starts with, at once (predicted);
    ``at``, the task running then; ``data``, the bytes of the values it starts with (patch, kernels, biases,
    cached spectra, momenta), which exist before and after it."""

    peak: int
    at: str
    data: int
    workers: int


def step_memory(plan: NetPlan, net: Network, workers: int = 1) -> StepMemory:
    """Predict the peak bytes of NumPy arrays while one training step of ``net`` at ``plan`` runs on ``workers``."""
    inputs = {n: np.zeros((plan.spec.nodes[n].size, *plan.layout.extent[n]), net.dtype) for n in plan.spec.inputs}
    g, results = step_graph(plan, net, inputs, _never_called, Hyper(0.0, 0.0, 0.0), threads=1)
    wanted = {results["cost"], *(k for ks in results["outputs"].values() for k in ks),
              *results["kernels"].values(), *results["biases"].values()}
    itemsize = np.dtype(net.dtype).itemsize
    return _simulate(g, wanted, itemsize, max(1, int(workers)), _plan_cache_bytes(plan, itemsize))


def _plan_cache_bytes(plan: NetPlan, itemsize: int) -> int:
    """What one thread's cached FFTW objects keep alive at most (:data:`znn.ops.fft.PLAN_CACHE_BYTES`): the last
    arrays of each transform the step plans (input and gradient spectra, the inverses of outputs and input
    gradients), one per FFT shape and batch of maps, those the cache keeps, less the spectra the walk counts."""
    arrays: dict[tuple[Any, ...], int] = {}
    for name, ep in plan.edges.items():
        edge = plan.spec.edges[name]
        if edge.type != "conv" or ep.mode != "fft":
            continue
        real, spectra = _vox(ep.transform_shape) * itemsize, _freqs(ep) * 2 * itemsize
        for node in (edge.input, edge.output):
            for block in plan.blocks[node]:
                # a forward plan's output is the spectra the walk counts; its input and an inverse's arrays are not
                maps = _maps(block) * ep.phase_count
                arrays[("forward", ep.transform_shape, maps)] = maps * real
                arrays[("inverse", ep.transform_shape, maps)] = maps * (real + spectra)
    kept = sum(b for b in arrays.values() if b <= PLAN_CACHE_BYTES // 4)
    return min(PLAN_CACHE_BYTES, kept)


def _never_called(outputs: Mapping[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
    raise AssertionError("the memory model never runs the graph")


def _simulate(g: Graph, wanted: set[Any], itemsize: int, workers: int, plans: int) -> StepMemory:
    """Walk ``g`` in the order one worker runs it (highest priority first among ready tasks, dask's order between
    equals), each output held until its last reader ran (``wanted`` outputs to the end)."""
    deps = {k: get_dependencies(g.dsk, k) for k in g.dsk}
    dependents: dict[Any, list[Any]] = {k: [] for k in g.dsk}
    for k, ds in deps.items():
        for d in ds:
            dependents[d].append(k)
    readers = {k: len(ds) for k, ds in dependents.items()}
    waiting = {k: len(ds) for k, ds in deps.items()}
    sizes = {k: task_bytes(g, k, itemsize) for k in g.dsk}
    priority, tie = task_priorities(g), order(g.dsk)
    ready = [(-priority[k], tie[k], i, k) for i, k in enumerate(g.dsk) if not deps[k]]
    heapq.heapify(ready)
    live, peak, at, biggest, count = 0, 0, "", 0, len(g.dsk)
    while ready:
        key = heapq.heappop(ready)[-1]
        out, work = sizes[key]
        biggest = max(biggest, work)
        if live + out + work > peak:
            peak, at = live + out + work, _name(g, key)
        live += out
        for d in deps[key]:
            readers[d] -= 1
            if readers[d] == 0 and d not in wanted:
                live -= sizes[d][0]
        for k in dependents[key]:
            waiting[k] -= 1
            if waiting[k] == 0:
                count += 1
                heapq.heappush(ready, (-priority[k], tie[k], count, k))
    data = sum(_value_bytes(v) for v in g.dsk.values())
    return StepMemory(peak + (workers - 1) * biggest + workers * plans, at, data, workers)


def _name(g: Graph, key: Any) -> str:
    op, layer = g.origin.get(key, (None, ""))
    return f"{op.label}-{layer}" if op is not None else str(key[0] if isinstance(key, tuple) else key)


def task_bytes(g: Graph, key: Any, itemsize: int) -> tuple[int, int]:
    """(bytes of the output, bytes of the working arrays while it runs) of one key of the step's graph."""
    value = g.dsk[key]
    if key not in g.origin or not istask(value):
        return 0, 0  # a value the graph starts with (counted in StepMemory.data), or a key without work
    op, layer = g.origin[key]
    index = tuple(key[1:])
    rule = _RULES.get(op)
    return rule(g, layer, index, itemsize) if rule is not None else (0, 0)


def _value_bytes(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (list, tuple)) and not istask(value):
        return sum(_value_bytes(v) for v in value)
    return 0


# ------------------------------------------------------------------------------------------- per operation
def _maps(block: tuple[int, int]) -> int:
    return block[1] - block[0]


def _vox(shape: Any) -> int:
    return math.prod(int(v) for v in shape)


def _edge(g: Graph, name: str) -> tuple[Any, Any, list[tuple[int, int]], list[tuple[int, int]]]:
    edge, ep = g.plan.spec.edges[name], g.plan.edges[name]
    return edge, ep, g.plan.blocks[edge.input], g.plan.blocks[edge.output]


def _freqs(ep: Any) -> int:
    return _vox(fftops.spectrum_shape(ep.transform_shape))


def _node_block(g: Graph, node: str, b: int, itemsize: int) -> int:
    return _maps(g.plan.blocks[node][b]) * _vox(g.plan.layout.extent[node]) * itemsize


def _input_block(g: Graph, node: str, index: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    return _node_block(g, node, index[0], itemsize), 0


def _spectra(maps: int, ep: Any, itemsize: int) -> tuple[int, int]:
    """The spectra of ``maps`` maps (of their phases, when the edge is split), and the padded maps and a
    frequency-major copy while they are made."""
    maps *= ep.phase_count
    spectra = maps * _freqs(ep) * 2 * itemsize
    return spectra, maps * _vox(ep.transform_shape) * itemsize + spectra


def _input_spectra(g: Graph, name: str, index: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    _, ep, ib, _ = _edge(g, name)
    return _spectra(_maps(ib[index[0]]), ep, itemsize)


def _grad_spectra(g: Graph, name: str, index: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    _, ep, _, ob = _edge(g, name)
    return _spectra(_maps(ob[index[0]]), ep, itemsize)


def _transform_work(edge: Any, ep: Any, pairs: int, itemsize: int) -> int:
    """Working bytes of the kernel transforms of ``pairs`` map pairs, the way :mod:`znn.ops.conv_fft` makes them:
    pruned DFTs hold the partial stage over the kernel's lead taps; full FFTs the padded kernels, their spectra and
    a transposed copy."""
    shape = ep.transform_shape
    spectra = pairs * _freqs(ep) * 2 * itemsize
    if transform_method("auto", edge.size, shape) == "fft":
        return pairs * _vox(shape) * itemsize + spectra
    lead = edge.size[0] / shape[0] if shape[0] > 1 else edge.size[1] / shape[1]
    return int(spectra * lead)


def _kernel_spectra(g: Graph, name: str, index: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    edge, ep, ib, ob = _edge(g, name)
    pairs = _maps(ib[index[0]]) * _maps(ob[index[1]])
    return pairs * _freqs(ep) * 2 * itemsize, _transform_work(edge, ep, pairs, itemsize)


def _fft_accumulate(maps: int, blocks: Sequence[MapBlock], ep: EdgePlan, itemsize: int) -> int:
    """Working bytes of a product task of ``maps`` maps over the map ``blocks`` it contracts: the accumulated
    spectra (and one block's more), the inverse's copy and its real result; an edge split into phases transforms
    the result in place, and where it joins small blocks (conv_fft.joins_blocks) it holds the joined spectra and
    kernel spectra instead of one block's products."""
    freqs = _freqs(ep)
    if ep.phase_count > 1:
        maps *= ep.phase_count
        spectra = maps * freqs * 2 * itemsize
        real = maps * _vox(ep.transform_shape) * itemsize
        if len(blocks) == 1:
            return spectra + real
        if joins_blocks([_maps(b) for b in blocks], ep.phase_count):
            summed = blocks[-1][1] - blocks[0][0]
            joined = (ep.phase_count * summed + summed * maps // ep.phase_count) * freqs * 2 * itemsize
            return joined + spectra + real
        return 2 * spectra + real
    spectra = maps * freqs * 2 * itemsize
    return spectra * (3 if len(blocks) > 1 else 2) + maps * _vox(ep.transform_shape) * itemsize


def _conv(g: Graph, name: str, index: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    edge, ep, ib, ob = _edge(g, name)
    maps = _maps(ob[index[0]])
    out = maps * _vox(ep.out_extent) * itemsize
    if ep.mode == "fft":
        return out, _fft_accumulate(maps, ib, ep, itemsize)
    return (out if len(ep.out_slabs) > 1 else 0), 0  # one slab: a view of it


def _rows(extent: Any, axis: int, rows: tuple[int, int]) -> int:
    return _vox(_slab(extent, axis, rows))


def _direct_work(out_spatial: Any, w_shape: Any, dilation: Any, partial_maps: int, itemsize: int) -> int:
    """A direct conv's largest tile (:func:`~znn.ops.conv.largest_tile`): its gathered columns and partial sums of
    ``partial_maps`` maps (twice: a product and the sum it is added to)."""
    columns, voxels = largest_tile(out_spatial, w_shape, dilation, itemsize)
    return columns + 2 * partial_maps * voxels * itemsize


def _slab(extent: Any, axis: int, rows: tuple[int, int]) -> tuple[int, ...]:
    shape = [int(v) for v in extent]
    shape[axis] = rows[1] - rows[0]
    return tuple(shape)


def _conv_slab(g: Graph, name: str, index: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    edge, ep, _, _ = _edge(g, name)
    shape = g.plan.spec.kernel_shape(name)
    n_in, n_out = shape[:2]
    rows = ep.out_slabs[index[0]]
    span = (rows[0], rows[1] + (edge.size[ep.slab_axis] - 1) * ep.dilation[ep.slab_axis])
    gathered = n_in * _rows(ep.need, ep.slab_axis, span) * itemsize
    out = _slab(ep.out_extent, ep.slab_axis, rows)
    return n_out * _vox(out) * itemsize, gathered + _direct_work(out, shape, ep.dilation, n_out, itemsize)


def _grad_input_slab(g: Graph, name: str, index: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    edge, ep, _, _ = _edge(g, name)
    n_in, n_out = g.plan.spec.kernel_shape(name)[:2]
    rows = ep.in_slabs[index[0]]
    halo = [(k - 1) * d for k, d in zip(edge.size, ep.dilation)]
    axis = ep.slab_axis
    lo, hi = max(0, rows[0] - halo[axis]), min(ep.out_extent[axis], rows[1])  # the output rows that reach them
    reaching = list(ep.out_extent)
    reaching[axis] = hi - lo
    shape = g.plan.spec.kernel_shape(name)
    if grad_input_method(shape, reaching, ep.dilation, (rows[0] - lo, rows[1] - lo), axis) == "scatter":
        # the joined output-gradient rows, and one chunk of them with its products (conv._grad_input_scatter)
        plane = _vox(reaching) // reaching[axis]
        taps = _vox(edge.size) // edge.size[axis]
        chunk = min(hi - lo, max(1, TILE_BYTES // (taps * n_in * plane * itemsize)))
        work = (n_out * _vox(reaching) + (taps * n_in + n_out) * chunk * plane) * itemsize
        return n_in * _rows(ep.need, axis, rows) * itemsize, work
    # the joined output-gradient rows, padded by the halo, convolved with the transposed kernels
    padded = [e + 2 * h for e, h in zip(ep.out_extent, halo)]
    padded[axis] = rows[1] - rows[0] + 2 * halo[axis]
    gradient = n_out * (_vox(reaching) + _vox(padded)) * itemsize
    out = _slab(ep.need, axis, rows)
    transposed = (n_out, n_in, *edge.size)
    return n_in * _vox(out) * itemsize, gradient + _direct_work(out, transposed, ep.dilation, n_in, itemsize)


def _grad_kernel_slab(g: Graph, name: str, index: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    edge, ep, _, _ = _edge(g, name)
    shape = g.plan.spec.kernel_shape(name)
    n_in, n_out = shape[:2]
    rows = ep.out_slabs[index[0]]
    span = (rows[0], rows[1] + (edge.size[ep.slab_axis] - 1) * ep.dilation[ep.slab_axis])
    out = _slab(ep.out_extent, ep.slab_axis, rows)
    joined = (n_in * _rows(ep.need, ep.slab_axis, span) + n_out * _vox(out)) * itemsize
    # a tile's columns and its output-gradient rows (conv._grad_kernel_direct), the tiles' summed parts
    columns, voxels = largest_tile(out, shape, ep.dilation, itemsize)
    tile = columns + n_out * voxels * itemsize
    return _vox(shape) * itemsize, joined + tile + 2 * _vox(shape) * itemsize


def _grad_input(g: Graph, name: str, index: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    edge, ep, ib, ob = _edge(g, name)
    maps = _maps(ib[index[0]])
    return maps * _vox(ep.in_extent) * itemsize, _fft_accumulate(maps, ob, ep, itemsize) + \
        maps * _vox(ep.need) * itemsize


def _grad_kernel(g: Graph, name: str, index: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    edge, ep, ib, ob = _edge(g, name)
    pairs = _maps(ib[index[0]]) * _maps(ob[index[1]])
    if ep.phase_count > 1:
        return pairs * _vox(edge.size) * itemsize, _phase_grad_kernel_work(ep, ib[index[0]], ob[index[1]], itemsize)
    if transform_method("auto", edge.size, ep.transform_shape) == "fft":  # per input map: out maps' products
        per_map = _maps(ob[index[1]]) * (_freqs(ep) * 2 * itemsize + _vox(ep.transform_shape) * itemsize)
        return pairs * _vox(edge.size) * itemsize, per_map + _maps(ob[index[1]]) * _freqs(ep) * 2 * itemsize
    products = min(_PRODUCTS_BYTES, pairs * _freqs(ep) * 2 * itemsize)  # a chunk of the pairs' products
    return pairs * _vox(edge.size) * itemsize, _transform_work(edge, ep, pairs, itemsize) + products


def _phase_grad_kernel_work(ep: EdgePlan, ib: tuple[int, int], ob: tuple[int, int], itemsize: int) -> int:
    """Working bytes of the kernel gradient of an edge split into phases (``conv_fft._pruned_grad_kernel``): the
    conjugated input spectra, then either the pairs' summed products and their lead taps (many phases) or the
    weighted gradient spectra and the lead taps (few)."""
    n_in, n_out, phases = _maps(ib), _maps(ob), ep.phase_count
    shape, csize = ep.transform_shape, 2 * itemsize
    lead: int = ep.size[0] if shape[0] > 1 else ep.size[1]
    lead_len = shape[0] if shape[0] > 1 else shape[1]
    freqs = _freqs(ep)
    taps = n_in * n_out * lead * (freqs // lead_len) * csize
    if phases > lead:
        return (n_in * phases + n_in * n_out) * freqs * csize + 2 * taps
    return (n_in + n_out) * phases * freqs * csize + taps


def _one_to_one(g: Graph, name: str, index: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    edge, ep, ib, _ = _edge(g, name)
    maps = _maps(ib[index[0]])
    out = maps * _vox(ep.out_extent) * itemsize
    if edge.type == "max_filter":  # the values; the running maxima of one slab (a few hundred kB) aside
        return out, 0
    if edge.type == "max_pool":
        return out + maps * _vox(ep.out_extent) * 8, maps * _vox(ep.need) * itemsize
    if edge.type == "dropout":
        return out + maps * _vox(ep.out_extent), 0
    return out, 0


def _node(g: Graph, node: str, index: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    block = _node_block(g, node, index[0], itemsize)
    return block, block  # the sum of the parts, then the transfer's result


def _maxout(g: Graph, layer: str, index: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    if layer in g.plan.spec.nodes:  # a maxout node: the maximum and the index of the winning edge
        block = _node_block(g, layer, index[0], itemsize)
        return 2 * block, block
    return _one_to_one(g, layer, index, itemsize)


def _node_gradient(g: Graph, node: str, index: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    """The gradient of a block, from its outgoing edges' parts: those of one-to-one edges are computed inside this
    task (padded to the node), then summed; a max filter's gradient holds about four arrays of one of its slabs
    (running maxima, winners and parts: pooling.max_filter_gradient)."""
    block = _node_block(g, node, index[0], itemsize)
    spec = g.plan.spec
    max_filters = any(spec.edges[e].type == "max_filter" for e in spec.outgoing[node])
    slabs = 4 * min(block, GRADIENT_SLAB_BYTES) if max_filters else 0
    return block, block * (len(spec.outgoing[node]) + 1) + slabs


def _loss(g: Graph, layer: str, index: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    total = sum(g.plan.spec.nodes[n].size * _vox(g.plan.layout.extent[n]) * itemsize for n in g.plan.spec.outputs)
    return total, 2 * total


def _update(g: Graph, layer: str, index: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    spec = g.plan.spec
    size = _vox(spec.kernel_shape(layer)) if layer in spec.edges else spec.nodes[layer].size
    return 3 * size * itemsize, size * itemsize


_RULES = {
    Op.INPUT_BLOCK: _input_block, Op.INPUT_SPECTRA: _input_spectra, Op.KERNEL_SPECTRA: _kernel_spectra,
    Op.CONV: _conv, Op.CONV_SLAB: _conv_slab, Op.MAX_FILTER: _one_to_one, Op.MAX_POOL: _one_to_one,
    Op.DROPOUT: _one_to_one, Op.CROP: _one_to_one, Op.MAXOUT: _maxout, Op.NODE: _node, Op.LOSS: _loss,
    Op.NODE_GRADIENT: _node_gradient, Op.GRAD_SPECTRA: _grad_spectra, Op.GRAD_INPUT: _grad_input,
    Op.GRAD_INPUT_SLAB: _grad_input_slab, Op.GRAD_KERNEL: _grad_kernel, Op.GRAD_KERNEL_SLAB: _grad_kernel_slab,
    Op.UPDATE: _update,
}
