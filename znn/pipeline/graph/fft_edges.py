"""Graph builder of a conv edge in FFT mode: forward FFTs of each input block, kernel FFTs of each (input block,
output block), and per output block one multiply-accumulate over all input blocks followed by one inverse FFT per
output map. The input and kernel spectra of the forward pass are the ones the backward pass uses; kernel spectra
of edges that are not updated can come from a :class:`~znn.pipeline.graph.cache.SpectraCache` instead."""

from __future__ import annotations

from typing import Any

from znn.pipeline.graph import tasks
from znn.pipeline.graph.core import Graph, Op, call
from znn.pipeline.graph.direct_edges import Finish


def task_counts(in_blocks: int, out_blocks: int, *, training: bool, grad_input: bool,
                cached: bool) -> dict[Op, int]:
    """How many tasks of each operation :func:`forward` (and, ``training``, :func:`backward`) make for an edge of
    ``in_blocks`` input and ``out_blocks`` output map blocks; ``cached``: its kernel spectra come from the cache;
    ``grad_input``: its input is not a network input. The autotuner times one task of each and multiplies."""
    counts = {Op.INPUT_SPECTRA: in_blocks, Op.KERNEL_SPECTRA: 0 if cached else in_blocks * out_blocks,
              Op.CONV: out_blocks}
    if training:
        counts.update({Op.GRAD_SPECTRA: out_blocks, Op.GRAD_INPUT: in_blocks if grad_input else 0,
                       Op.GRAD_KERNEL: in_blocks * out_blocks})
    return counts


def forward(g: Graph, name: str, finish: Finish) -> None:
    """Input spectra, kernel spectra (unless the cache gave them: ``g.kspec`` holds them already), then the
    output blocks."""
    spec, ep = g.plan.spec, g.plan.edges[name]
    edge = spec.edges[name]
    in_blocks, out_blocks = g.plan.blocks[edge.input], g.plan.blocks[edge.output]
    xs, kernel = g.act[edge.input], g.params[name]
    g.xspec[name] = [g.key(Op.INPUT_SPECTRA, name, i) for i in range(len(in_blocks))]
    for key, x in zip(g.xspec[name], xs):
        g.dsk[key] = call(tasks.input_spectra, x, edge=ep)
    if name not in g.kspec:
        g.kspec[name] = [[g.key(Op.KERNEL_SPECTRA, name, i, j) for j in range(len(out_blocks))]
                         for i in range(len(in_blocks))]
        for i, ib in enumerate(in_blocks):
            for j, ob in enumerate(out_blocks):
                g.dsk[g.kspec[name][i][j]] = call(tasks.kernel_spectra, kernel, ib=ib, ob=ob, edge=ep)
        g.new_kspec[name] = g.kspec[name]
    node = finish[0] if finish is not None else None
    threads = g.task_threads(len(out_blocks))
    g.fwd[name] = [g.key(Op.CONV, name, j) for j in range(len(out_blocks))]
    for j, (key, block) in enumerate(zip(g.fwd[name], out_blocks)):
        column = [g.kspec[name][i][j] for i in range(len(in_blocks))]
        bias = (tasks.take_maps, finish[1], block) if finish is not None and finish[1] is not None else None
        g.dsk[key] = call(tasks.conv_fft_forward, g.xspec[name], column, bias, edge=ep, threads=threads, node=node)


def backward(g: Graph, name: str, gy: list[Any]) -> list[Any]:
    """Gradient spectra per output block, kernel gradients per (input block, output block) into ``g.gw`` and,
    unless the input is a network input, the input gradient of each input block (padded to its node)."""
    spec, ep = g.plan.spec, g.plan.edges[name]
    edge = spec.edges[name]
    in_blocks, out_blocks = g.plan.blocks[edge.input], g.plan.blocks[edge.output]
    gspec = [g.key(Op.GRAD_SPECTRA, name, j) for j in range(len(out_blocks))]
    for key, grad in zip(gspec, gy):
        g.dsk[key] = call(tasks.grad_output_spectra, grad, edge=ep)
    grads = []
    threads = g.task_threads(len(in_blocks))
    for i in range(len(in_blocks) if spec.nodes[edge.input].type != "input" else 0):  # inputs need no gradient
        key = g.key(Op.GRAD_INPUT, name, i)
        g.dsk[key] = call(tasks.conv_fft_grad_input, gspec, g.kspec[name][i], edge=ep, threads=threads)
        grads.append(key)
    gw = [[g.key(Op.GRAD_KERNEL, name, i, j) for j in range(len(out_blocks))] for i in range(len(in_blocks))]
    for i in range(len(in_blocks)):
        for j in range(len(out_blocks)):
            g.dsk[gw[i][j]] = call(tasks.conv_fft_grad_kernel, g.xspec[name][i], gspec[j], edge=ep)
    g.gw[name] = gw
    return grads
