"""The functions that dask tasks run: thin, picklable wrappers around :mod:`znn.ops` on blocks of maps.

Every function takes and returns NumPy arrays (or tuples of them); the graph builder in
:mod:`znn.pipeline.graph.build` and the edge builders decide which block goes where; dependencies come first and
parameters by keyword (:func:`znn.pipeline.graph.core.call`). Kernels of a conv edge group are one array
(in, out, z, y, x); a task slices the (input block, output block) part it needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from znn.ops import conv as convops
from znn.ops import conv_fft, pointwise
from znn.ops.sgd import sgd_update
from znn.pipeline.graph import edges
from znn.pipeline.graph.blocks import MapBlock
from znn.pipeline.graph.edges import Draw, OneToOne
from znn.pipeline.graph.plan import EdgePlan
from znn.types import Triple


# -- slicing and cropping ------------------------------------------------------------------------------------
def take_maps(x: np.ndarray, block: MapBlock) -> np.ndarray:
    return np.ascontiguousarray(x[block[0]:block[1]])


def central(x: np.ndarray, lo: Triple, shape: Triple) -> np.ndarray:
    """The ``shape`` part of ``x`` (maps, z, y, x) starting at ``lo``; a view when nothing is cut."""
    if tuple(x.shape[1:]) == tuple(shape):
        return x
    return x[:, lo[0]:lo[0] + shape[0], lo[1]:lo[1] + shape[1], lo[2]:lo[2] + shape[2]]


def pad_back(g: np.ndarray, lo: Triple, full: Triple) -> np.ndarray:
    """Inverse of :func:`central` for gradients: zeros outside the cropped part."""
    if tuple(g.shape[1:]) == tuple(full):
        return g
    out = np.zeros((g.shape[0], *full), dtype=g.dtype)
    central(out, lo, g.shape[1:])[...] = g
    return out


def add_all(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Sum in the given order (fixed by the graph, so results do not depend on the scheduler). One part is
    returned as it is (tasks never write into their inputs or their results after returning them)."""
    if len(parts) == 1:
        return parts[0]
    total: np.ndarray = np.add(parts[0], parts[1])
    for p in parts[2:]:
        total += p
    return total


def join(parts: Sequence[np.ndarray], maxout: bool) -> tuple[np.ndarray, Any]:
    """What a node makes of its incoming edges' outputs: their sum (:func:`add_all`), or for a maxout node their
    element-wise maximum and the index of the winner (else None)."""
    if maxout:
        return pointwise.maxout(list(parts))
    return add_all(parts), None


def concat_maps(parts: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]


def item(value: Any, index: int) -> Any:
    return value[index]


@dataclass(frozen=True)
class NodeTransfer:
    """A node group as its tasks apply it: its type (only ``transfer`` nodes add a bias and apply a function),
    transfer function and arguments, and whether the pass trains. Frozen and small: tasks carry it; the bias
    is a task argument of its own (a graph key)."""

    kind: str
    function: str = ""
    args: tuple[float, ...] = ()
    training: bool = False


# -- nodes ---------------------------------------------------------------------------------------------------
def node_forward(bias: np.ndarray | None, parts: Sequence[np.ndarray], *, node: NodeTransfer, maxout: bool) -> Any:
    """Combine incoming edge outputs (sum, or element-wise max for maxout nodes), add bias, apply the transfer.

    Returns the activation, or (activation, which) for maxout nodes so the backward can route gradients.
    """
    y, which = join(parts, maxout)
    if node.kind == "transfer":
        if bias is not None:
            y = pointwise.add_bias(y, bias)
        y = pointwise.transfer_forward(node.function, y, node.args, training=node.training)
    return (y, which) if maxout else y


def node_backward(y: np.ndarray, parts: Sequence[np.ndarray], *, node: NodeTransfer) -> np.ndarray:
    """Gradient wrt the node's pre-transfer sum from the gradients of its outgoing edges (already padded)."""
    g = add_all(parts)
    if node.kind == "transfer":
        g = pointwise.transfer_backward(node.function, y, g, node.args, training=node.training)
    return g


def finish_node(y: np.ndarray, node: NodeTransfer | None, bias: np.ndarray | None) -> np.ndarray:
    """Bias and transfer of a node fed by one conv edge, applied by that edge's task to its own fresh output
    (the same numbers as :func:`node_forward`, without a task and two copies of the maps)."""
    if node is not None and node.kind == "transfer":
        if bias is not None:
            y += bias.astype(y.dtype, copy=False)[:, None, None, None]
        y = pointwise.transfer_forward(node.function, y, node.args, training=node.training)
    return y


def maxout_route(g: np.ndarray, which: np.ndarray, index: int) -> np.ndarray:
    return np.where(which == index, g, 0).astype(g.dtype, copy=False)


def bias_gradient(g: np.ndarray) -> np.ndarray:
    return pointwise.bias_gradient(g)


# -- one-to-one edges (the dispatch on their type is znn.pipeline.graph.edges) --------------------------------
def one_to_one(x: np.ndarray, step: int | None = None, *, edge: EdgePlan, op: OneToOne,
               draw: tuple[int, int, int] | None = None) -> Any:
    """The edge on its part of the input block: ``(values, backward data)`` for edges that keep backward data
    (:attr:`OneToOne.keeps_backward_data`), else the values. Training gives the step's number and ``draw``, the
    block's seeds less the step (seed, edge, block); inference neither."""
    full: Draw | None = None if draw is None else (draw[0], int(step or 0), *draw[1:])
    y, kept = edges.one_to_one_forward(op, central(x, edge.crop_lo, edge.need), full)
    return (y, kept) if op.keeps_backward_data else y


def one_to_one_backward(g: np.ndarray, fwd: Any, edge: EdgePlan, op: OneToOne) -> np.ndarray:
    """The input gradient of one block, padded to the input node's extent; ``fwd`` is the forward's result (only
    read for edges that keep backward data)."""
    kept = fwd[1] if op.keeps_backward_data else None
    return pad_back(edges.one_to_one_backward(op, g, kept, edge.need), edge.crop_lo, edge.in_extent)


# -- conv edges ----------------------------------------------------------------------------------------------
def kernel_block(kernel: np.ndarray, ib: MapBlock, ob: MapBlock) -> np.ndarray:
    return np.ascontiguousarray(kernel[ib[0]:ib[1], ob[0]:ob[1]])


def input_spectra(x: np.ndarray, *, edge: EdgePlan) -> np.ndarray:
    """Spectra of the part of an input block an FFT conv edge reads (of its phases when the edge is split)."""
    maps = central(x, edge.crop_lo, edge.need)
    if edge.phase_count > 1:  # reads its phases as strided views: no contiguous copy first
        return conv_fft.phase_spectra(maps, edge.phases, edge.transform_shape)
    return conv_fft.input_spectra(np.ascontiguousarray(maps), edge.transform_shape)


def kernel_spectra(kernel: np.ndarray, ib: MapBlock, ob: MapBlock, *, edge: EdgePlan) -> np.ndarray:
    return conv_fft.kernel_spectra(kernel_block(kernel, ib, ob), edge.transform_dilation, edge.transform_shape)


def _inverse(spec: np.ndarray, edge: EdgePlan, output: bool) -> np.ndarray:
    """The maps of the edge's output (``output``) or of its input gradient from their spectra (their phases'
    when the edge is split); ``spec``, the task's own accumulated spectra, is transformed where it is."""
    extent = edge.out_extent if output else edge.need
    offset = conv_fft.output_offset(edge.size, edge.transform_dilation) if output else (0, 0, 0)
    if edge.phase_count == 1:
        return conv_fft.inverse_valid(spec, edge.transform_shape, extent, offset, destroy=True)
    lengths = conv_fft.phase_lengths(edge.need, edge.phases)
    if output:  # each phase's valid part is its input's less the kernel
        k = edge.size
        lengths = (lengths[0] - k[0] + 1, lengths[1] - k[1] + 1, lengths[2] - k[2] + 1)
    phase_maps = conv_fft.inverse_valid(spec, edge.transform_shape, lengths, offset, destroy=True)
    return conv_fft.merge_phases(phase_maps, edge.phases, extent)


def conv_fft_forward(x_specs: Sequence[np.ndarray], k_specs: Sequence[np.ndarray], bias: np.ndarray | None = None,
                     *, edge: EdgePlan, threads: int = 1, node: NodeTransfer | None = None) -> np.ndarray:
    """One output block: the product over all input blocks' maps in the frequency domain, summed block by block
    (their spectra joined first when the edge is split into phases and its blocks are small:
    :func:`~znn.ops.conv_fft.joins_blocks`), one inverse per output map; with ``node``, then the output node's bias
    and transfer (:func:`finish_node`).

    ``threads`` split the products over frequencies (each frequency's product is the same whatever the split);
    the inverse FFTs stay on one thread, so the numbers do not depend on ``threads``.
    """
    phases = edge.phase_count
    if conv_fft.joins_blocks([s.shape[0] // phases for s in x_specs], phases):
        # one (P x in) @ (in x out) product per frequency instead of one per block pair
        acc = conv_fft.multiply_accumulate(conv_fft.join_map_spectra(x_specs, phases),
                                           conv_fft.join_kernel_spectra(k_specs, 0), threads, phases)
    else:  # large blocks: the products of block pairs cost less than joining copies of the kernel spectra
        acc = conv_fft.multiply_accumulate(x_specs[0], k_specs[0], threads, phases)
        for xs, ks in zip(x_specs[1:], k_specs[1:]):
            acc += conv_fft.multiply_accumulate(xs, ks, threads, phases)
    y = _inverse(acc, edge, output=True)
    return finish_node(y, node, bias)


def grad_output_spectra(g: np.ndarray, *, edge: EdgePlan) -> np.ndarray:
    """Spectra of an output-gradient block, placed where the valid output sits in the circle."""
    offset = conv_fft.output_offset(edge.size, edge.transform_dilation)
    if edge.phase_count > 1:
        return conv_fft.phase_spectra(g, edge.phases, edge.transform_shape, offset=offset)
    return conv_fft.input_spectra(g, edge.transform_shape, offset=offset)


def conv_fft_grad_input(gy_specs: Sequence[np.ndarray], k_specs: Sequence[np.ndarray], *, edge: EdgePlan,
                        threads: int = 1) -> np.ndarray:
    """Input gradient of one input block: the product over all output blocks' maps, one inverse per input map
    (``threads`` as in :func:`conv_fft_forward`), padded to the input node's extent."""
    phases = edge.phase_count
    if conv_fft.joins_blocks([s.shape[0] // phases for s in gy_specs], phases):  # as in conv_fft_forward
        acc = conv_fft.grad_input_spectra(conv_fft.join_map_spectra(gy_specs, phases),
                                          conv_fft.join_kernel_spectra(k_specs, 1), threads, phases)
    else:
        acc = conv_fft.grad_input_spectra(gy_specs[0], k_specs[0], threads, phases)
        for gs, ks in zip(gy_specs[1:], k_specs[1:]):
            acc += conv_fft.grad_input_spectra(gs, ks, threads, phases)
    return pad_back(_inverse(acc, edge, output=False), edge.crop_lo, edge.in_extent)


def conv_fft_grad_kernel(x_spec: np.ndarray, gy_spec: np.ndarray, *, edge: EdgePlan) -> np.ndarray:
    return conv_fft.grad_kernel(x_spec, gy_spec, edge.transform_shape, edge.size, edge.transform_dilation,
                                phases=edge.phase_count)


def joined_maps(blocks: Sequence[np.ndarray], lo: Triple, need: Triple) -> np.ndarray:
    """The ``need`` part (from ``lo``) of every block, joined along the maps: one contiguous array."""
    if len(blocks) == 1:
        return np.ascontiguousarray(central(blocks[0], lo, need))
    return np.concatenate([central(b, lo, need) for b in blocks])


def joined_rows(blocks: Sequence[np.ndarray], axis: int, lo: int, hi: int) -> np.ndarray:
    """Rows ``lo..hi`` of every block, joined along the maps: one contiguous array."""
    if len(blocks) == 1:
        return np.ascontiguousarray(convops.rows_along(blocks[0], axis, lo, hi))
    return np.concatenate([convops.rows_along(b, axis, lo, hi) for b in blocks])


def slab_input(edge: EdgePlan, out_rows: MapBlock) -> tuple[Triple, Triple]:
    """``(lo, extent)`` in the input node of what output rows ``out_rows`` (along ``edge.slab_axis``) of a direct
    conv edge read: those rows of its ``need`` part and the kernel's span below them."""
    axis = edge.slab_axis
    lo, need = list(edge.crop_lo), list(edge.need)
    lo[axis] += out_rows[0]
    need[axis] = out_rows[1] - out_rows[0] + (edge.size[axis] - 1) * edge.dilation[axis]
    return (lo[0], lo[1], lo[2]), (need[0], need[1], need[2])


def slab_maps(slabs: Sequence[np.ndarray], block: MapBlock, axis: int) -> np.ndarray:
    """Maps ``block`` of a layer computed as slabs of rows along ``axis``, the slabs joined (one slab: a view)."""
    parts = [s[block[0]:block[1]] for s in slabs]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1 + axis)


def conv_direct_slab(xs: Sequence[np.ndarray], kernel: np.ndarray, bias: np.ndarray | None = None, *,
                     edge: EdgePlan, out_rows: MapBlock, threads: int = 1,
                     node: NodeTransfer | None = None) -> np.ndarray:
    """Output rows ``out_rows`` of every output map of a direct-mode conv edge (from the input blocks ``xs``),
    then with ``node`` the output node's bias (all maps) and transfer (:func:`finish_node`).

    Slabs of rows rather than blocks of output maps: each task gathers the columns of its own rows once, where
    splitting the output maps would repeat the gather and shrink the products. ``threads`` split the slab's tiles;
    each tile is computed the same way whatever the split, so the numbers do not depend on it.
    """
    lo, need = slab_input(edge, out_rows)
    y = convops.conv_forward_direct(joined_maps(xs, lo, need), kernel, edge.dilation, threads)
    return finish_node(y, node, bias)


def conv_direct_grad_input_slab(gys: Sequence[np.ndarray], kernel: np.ndarray, *, edge: EdgePlan,
                                in_rows: MapBlock, threads: int = 1) -> np.ndarray:
    """Input rows ``in_rows`` (of the edge's ``need`` part, along ``edge.slab_axis``) of the input gradient of
    every input map, from the output rows that reach them."""
    axis = edge.slab_axis
    lo = max(0, in_rows[0] - (edge.size[axis] - 1) * edge.dilation[axis])
    hi = min(edge.out_extent[axis], in_rows[1])
    gy = joined_rows(gys, axis, lo, hi).astype(kernel.dtype, copy=False)
    return convops.conv_grad_input_direct(kernel, gy, edge.dilation, threads, (in_rows[0] - lo, in_rows[1] - lo),
                                          axis)


def grad_input_block(slabs: Sequence[np.ndarray], *, block: MapBlock, edge: EdgePlan) -> np.ndarray:
    """Maps ``block`` of a direct conv edge's input gradient from its slabs, padded to the input node's extent."""
    return pad_back(slab_maps(slabs, block, edge.slab_axis), edge.crop_lo, edge.in_extent)


def conv_direct_grad_kernel_slab(xs: Sequence[np.ndarray], gys: Sequence[np.ndarray], *, edge: EdgePlan,
                                 kernel_shape: tuple[int, ...], out_rows: MapBlock,
                                 threads: int = 1) -> np.ndarray:
    """The share of output rows ``out_rows`` in a direct conv edge's kernel gradient (the shares add up to it)."""
    lo, need = slab_input(edge, out_rows)
    x = joined_maps(xs, lo, need)
    gy = joined_rows(gys, edge.slab_axis, *out_rows).astype(x.dtype, copy=False)
    return convops.conv_grad_kernel_direct(x, gy, kernel_shape, edge.dilation, threads)


# -- updates -------------------------------------------------------------------------------------------------
def assemble_kernel_gradient(blocks: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """(in blocks x out blocks) gradient pieces -> one (in, out, z, y, x) array."""
    return np.concatenate([np.concatenate(row, axis=1) for row in blocks], axis=0)


def update(param: np.ndarray, velocity: np.ndarray, grad: np.ndarray, eta: float, momentum: float,
           weight_decay: float, patch_size: float) -> tuple[np.ndarray, np.ndarray]:
    """A functional SGD step (copies, so a graph can be recomputed on another worker after a failure)."""
    p, v = param.copy(), velocity.copy()
    sgd_update(p, grad.astype(p.dtype, copy=False), v, eta, momentum, weight_decay, patch_size)
    return p, v


def kernel_gradient_update(param: np.ndarray, velocity: np.ndarray, blocks: Sequence[Sequence[np.ndarray]],
                           eta: float, momentum: float, weight_decay: float,
                           patch_size: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    grad = assemble_kernel_gradient(blocks)
    p, v = update(param, velocity, grad, eta, momentum, weight_decay, patch_size)
    return p, v, grad


def bias_gradient_update(param: np.ndarray, velocity: np.ndarray, blocks: Sequence[np.ndarray], eta: float,
                         momentum: float, weight_decay: float,
                         patch_size: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    grad = np.concatenate(blocks)
    p, v = update(param, velocity, grad, eta, momentum, weight_decay, patch_size)
    return p, v, grad


def loss_task(blocks: Sequence[Sequence[np.ndarray]], loss: Callable[..., tuple[float, dict[str, np.ndarray]]], *,
              names: Sequence[str]) -> tuple[float, dict[str, np.ndarray]]:
    """The loss of the whole output node groups (blocks joined); ``names[i]`` has blocks ``blocks[i]``."""
    return loss({name: concat_maps(parts) for name, parts in zip(names, blocks)})
