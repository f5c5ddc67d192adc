"""The functions that dask tasks run: thin, picklable wrappers around :mod:`znn.ops` on blocks of maps.

Every function takes and returns NumPy arrays (or tuples of them); the graph builder in
:mod:`znn.pipeline.graph.build` decides which block goes where. Kernels of a conv edge group are one array
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
from znn.pipeline.graph.blocks import Block
from znn.pipeline.graph.edges import Draw, OneToOne
from znn.pipeline.graph.plan import EdgePlan
from znn.types import Triple


# -- slicing and cropping ------------------------------------------------------------------------------------
def take_maps(x: np.ndarray, block: Block) -> np.ndarray:
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
def node_forward(node: NodeTransfer, bias: np.ndarray | None, parts: Sequence[np.ndarray], maxout: bool) -> Any:
    """Combine incoming edge outputs (sum, or element-wise max for maxout nodes), add bias, apply the transfer.

    Returns the activation, or (activation, which) for maxout nodes so the backward can route gradients.
    """
    y, which = join(parts, maxout)
    if node.kind == "transfer":
        if bias is not None:
            y = pointwise.add_bias(y, bias)
        y = pointwise.transfer_forward(node.function, y, node.args, training=node.training)
    return (y, which) if maxout else y


def node_backward(node: NodeTransfer, y: np.ndarray, parts: Sequence[np.ndarray]) -> np.ndarray:
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
def one_to_one(x: np.ndarray, edge: EdgePlan, op: OneToOne, draw: Draw | None) -> Any:
    """The edge on its part of the input block: ``(values, backward data)`` for edges that keep backward data
    (:attr:`OneToOne.keeps_backward_data`), else the values."""
    y, kept = edges.one_to_one_forward(op, central(x, edge.crop_lo, edge.need), draw)
    return (y, kept) if op.keeps_backward_data else y


def one_to_one_backward(g: np.ndarray, fwd: Any, edge: EdgePlan, op: OneToOne) -> np.ndarray:
    """The input gradient of one block, padded to the input node's extent; ``fwd`` is the forward's result (only
    read for edges that keep backward data)."""
    kept = fwd[1] if op.keeps_backward_data else None
    return pad_back(edges.one_to_one_backward(op, g, kept, edge.need), edge.crop_lo, edge.in_extent)


# -- conv edges ----------------------------------------------------------------------------------------------
def kernel_block(kernel: np.ndarray, ib: Block, ob: Block) -> np.ndarray:
    return np.ascontiguousarray(kernel[ib[0]:ib[1], ob[0]:ob[1]])


def input_spectra(x: np.ndarray, lo: Triple, need: Triple, shape: Triple) -> np.ndarray:
    return conv_fft.input_spectra(np.ascontiguousarray(central(x, lo, need)), shape)


def kernel_spectra(kernel: np.ndarray, ib: Block, ob: Block, dilation: Triple, shape: Triple) -> np.ndarray:
    return conv_fft.kernel_spectra(kernel_block(kernel, ib, ob), dilation, shape)


def conv_fft_forward(x_specs: Sequence[np.ndarray], k_specs: Sequence[np.ndarray], edge: EdgePlan,
                     threads: int = 1, node: NodeTransfer | None = None,
                     bias: np.ndarray | None = None) -> np.ndarray:
    """One output block: accumulate over input blocks in the frequency domain, one inverse per output map;
    with ``node``, then the output node's bias and transfer (:func:`finish_node`).

    ``threads`` split the products over frequencies (each frequency's product is the same whatever the split);
    the inverse FFTs stay on one thread, so the numbers do not depend on ``threads``.
    """
    acc = conv_fft.multiply_accumulate(x_specs[0], k_specs[0], threads)
    for xs, ks in zip(x_specs[1:], k_specs[1:]):
        acc += conv_fft.multiply_accumulate(xs, ks, threads)
    y = conv_fft.inverse_valid(acc, edge.transform_shape, edge.out_extent,
                               conv_fft.output_offset(edge.size, edge.dilation))
    return finish_node(y, node, bias)


def grad_output_spectra(g: np.ndarray, shape: Triple, kernel_size: Triple, dilation: Triple) -> np.ndarray:
    return conv_fft.grad_output_spectra(g, shape, kernel_size, dilation)


def conv_fft_grad_input(gy_specs: Sequence[np.ndarray], k_specs: Sequence[np.ndarray], shape: Triple,
                        need: Triple, lo: Triple, full: Triple, threads: int = 1) -> np.ndarray:
    """Input gradient of one input block: accumulate over output blocks, one inverse per input map
    (``threads`` as in :func:`conv_fft_forward`)."""
    acc = conv_fft.grad_input_spectra(gy_specs[0], k_specs[0], threads)
    for gs, ks in zip(gy_specs[1:], k_specs[1:]):
        acc += conv_fft.grad_input_spectra(gs, ks, threads)
    return pad_back(conv_fft.inverse_valid(acc, shape, need, (0, 0, 0)), lo, full)


def conv_fft_grad_kernel(x_spec: np.ndarray, gy_spec: np.ndarray, shape: Triple, kernel_size: Triple,
                         dilation: Triple) -> np.ndarray:
    return conv_fft.grad_kernel(x_spec, gy_spec, shape, kernel_size, dilation)


def joined_maps(blocks: Sequence[np.ndarray], lo: Triple, need: Triple) -> np.ndarray:
    """The ``need`` part (from ``lo``) of every block, joined along the maps: one contiguous array."""
    if len(blocks) == 1:
        return np.ascontiguousarray(central(blocks[0], lo, need))
    return np.concatenate([central(b, lo, need) for b in blocks])


def conv_direct_layer(xs: Sequence[np.ndarray], kernel: np.ndarray, out_blocks: Sequence[Block], edge: EdgePlan,
                      threads: int = 1, node: NodeTransfer | None = None,
                      bias: np.ndarray | None = None) -> list[np.ndarray]:
    """A whole direct-mode conv layer in one task, returned as the output node's blocks (views of one array);
    with ``node``, then the node's bias (all maps) and transfer (:func:`finish_node`).

    One task rather than one per block: each call gathers its input columns once, so splitting the output
    maps would repeat the gather and shrink the products (blocks of a few maps run several times slower).
    ``threads`` split the output tiles instead; each tile is computed the same way whatever the split, so the
    numbers do not depend on it.
    """
    y = convops.conv_forward_direct(joined_maps(xs, edge.crop_lo, edge.need), kernel, edge.dilation, threads)
    y = finish_node(y, node, bias)
    return [y[a:b] for a, b in out_blocks]


def conv_direct_layer_backward(xs: Sequence[np.ndarray], kernel: np.ndarray, in_blocks: Sequence[Block],
                               gys: Sequence[np.ndarray], edge: EdgePlan, threads: int = 1,
                               grad_input: bool = True) -> tuple[list[np.ndarray] | None, np.ndarray]:
    """(input gradient per input block, padded to the node's extent; kernel gradient) of a direct-mode layer;
    without ``grad_input`` (the input is a network input) only the kernel gradient, and None."""
    x = joined_maps(xs, edge.crop_lo, edge.need)
    gy = concat_maps(gys).astype(x.dtype, copy=False)
    if not grad_input:
        # ops' kernel-gradient half of conv_backward_direct
        return None, convops._grad_kernel_direct(x, gy, kernel.shape, edge.dilation, threads)
    gx, gw = convops.conv_backward_direct(x, kernel, gy, edge.dilation, threads)
    return [pad_back(gx[a:b], edge.crop_lo, edge.in_extent) for a, b in in_blocks], gw


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


def loss_task(loss: Callable[..., tuple[float, dict[str, np.ndarray]]], names: Sequence[str],
              blocks: Sequence[Sequence[np.ndarray]]) -> tuple[float, dict[str, np.ndarray]]:
    """The loss of the whole output node groups (blocks joined); ``names[i]`` has blocks ``blocks[i]``."""
    return loss({name: concat_maps(parts) for name, parts in zip(names, blocks)})
