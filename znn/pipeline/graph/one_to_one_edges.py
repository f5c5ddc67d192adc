"""Graph builder of the edges that are not convolutions (max filter, max pool, dropout, crop, maxout): one task
per map block each way, through the one dispatch on their type (:mod:`znn.pipeline.graph.edges`)."""

from __future__ import annotations

import zlib
from typing import Any

from znn.pipeline.graph import tasks
from znn.pipeline.graph.core import Graph, Op, call
from znn.pipeline.graph.edges import OneToOne


def forward(g: Graph, name: str, training: bool, seed: int) -> None:
    """One task per block; training ones read the step's number (``g.step_key``), which seeds dropout."""
    edge, ep = g.plan.spec.edges[name], g.plan.edges[name]
    op = OneToOne.of(edge, ep.dilation)
    xs = g.act[edge.input]
    g.fwd[name] = [g.key(Op.of_edge(edge.type), name, i) for i in range(len(xs))]
    for i, (key, x) in enumerate(zip(g.fwd[name], xs)):
        if training:
            g.dsk[key] = call(tasks.one_to_one, x, g.step_key, edge=ep, op=op, draw=_draw(seed, name, i))
        else:
            g.dsk[key] = call(tasks.one_to_one, x, edge=ep, op=op)


def output(g: Graph, name: str, block: int) -> Any:
    """The (task computing the) output block of the edge, without its auxiliary backward data."""
    edge = g.plan.spec.edges[name]
    key = g.fwd[name][block]
    if OneToOne.of(edge, g.plan.edges[name].dilation).keeps_backward_data:
        return (tasks.item, key, 0)
    return key


def backward(g: Graph, name: str, gy: list[Any]) -> list[Any]:
    """Tasks giving the edge's gradient contribution to each block of its input node (padded to its extent)."""
    spec, ep = g.plan.spec, g.plan.edges[name]
    edge = spec.edges[name]
    op = OneToOne.of(edge, ep.dilation)
    if edge.type == "maxout":  # the node routes each voxel's gradient to the edge that won it
        which = g.fwd["maxout:" + edge.output]
        index = spec.incoming[edge.output].index(name)
        gy = [call(tasks.maxout_route, gy[b], (tasks.item, which[b], 1), index=index) for b in range(len(gy))]
    fwd = g.fwd[name] if op.keeps_backward_data else [None] * len(gy)
    return [call(tasks.one_to_one_backward, gy[b], fwd[b], edge=ep, op=op) for b in range(len(gy))]


def _draw(seed: int, edge: str, block: int) -> tuple[int, int, int]:
    """The seeds of one block of an edge's randomness, less the step's number (the task adds it): the same on
    every worker that runs it."""
    return (int(seed), zlib.crc32(edge.encode()), int(block))
