"""Graph builder of a conv edge in direct (BLAS) mode: its forward, input-gradient and kernel-gradient work as
tasks over slabs of rows (``EdgePlan.out_slabs`` / ``in_slabs``, sized for the plan's workers), each slab over
every map; small tasks assemble the node's map blocks from the slabs."""

from __future__ import annotations

from typing import Any

from znn.pipeline.graph import tasks
from znn.pipeline.graph.core import Graph, Op, call

# How the output node's bias and transfer are applied by the edge's own tasks: (transfer, the bias key or None).
Finish = tuple[tasks.NodeTransfer, Any] | None


def forward(g: Graph, name: str, finish: Finish) -> None:
    """Slab tasks of every output map, then the output node's blocks joined from them."""
    spec, ep = g.plan.spec, g.plan.edges[name]
    edge = spec.edges[name]
    xs, kernel = g.act[edge.input], g.params[name]
    node, bias = finish if finish is not None else (None, None)
    slabs = [g.key(Op.CONV_SLAB, name, s) for s in range(len(ep.out_slabs))]
    threads = g.task_threads(len(slabs))
    for key, out_rows in zip(slabs, ep.out_slabs):
        g.dsk[key] = call(tasks.conv_direct_slab, xs, kernel, bias, edge=ep, out_rows=out_rows, threads=threads,
                          node=node)
    g.fwd[name] = [g.key(Op.CONV, name, j) for j in range(len(g.plan.blocks[edge.output]))]
    for key, block in zip(g.fwd[name], g.plan.blocks[edge.output]):
        g.dsk[key] = call(tasks.slab_maps, slabs, block=block, axis=ep.slab_axis)


def backward(g: Graph, name: str, gy: list[Any]) -> list[Any]:
    """Kernel-gradient shares per output slab (summed in slab order into ``g.gw``) and, unless the input is a
    network input, input-gradient slabs; returns the input gradient of each input block (padded to its node)."""
    spec, ep = g.plan.spec, g.plan.edges[name]
    edge = spec.edges[name]
    xs, kernel = g.act[edge.input], g.params[name]
    grad_input = spec.nodes[edge.input].type != "input"
    threads = g.task_threads(len(ep.out_slabs) + (len(ep.in_slabs) if grad_input else 0))
    shares = [g.key(Op.GRAD_KERNEL_SLAB, name, s) for s in range(len(ep.out_slabs))]
    for key, out_rows in zip(shares, ep.out_slabs):
        g.dsk[key] = call(tasks.conv_direct_grad_kernel_slab, xs, gy, edge=ep, kernel_shape=spec.kernel_shape(name),
                          out_rows=out_rows, threads=threads)
    g.gw[name] = [[call(tasks.add_all, shares)]]
    if not grad_input:
        return []
    slabs = [g.key(Op.GRAD_INPUT_SLAB, name, s) for s in range(len(ep.in_slabs))]
    for key, in_rows in zip(slabs, ep.in_slabs):
        g.dsk[key] = call(tasks.conv_direct_grad_input_slab, gy, kernel, edge=ep, in_rows=in_rows, threads=threads)
    return [call(tasks.grad_input_block, slabs, block=block, edge=ep) for block in g.plan.blocks[edge.input]]
