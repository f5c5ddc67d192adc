"""A plain, sequential evaluation of a network with the ops kernels on whole node groups: no dask, no blocks.

The reference the task graphs are tested against, and a debugging aid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from znn.network import Network
from znn.ops import conv as convops
from znn.ops import pointwise
from znn.pipeline.graph.edges import OneToOne, one_to_one_forward
from znn.pipeline.graph.tasks import central, join
from znn.spec import Layout
from znn.types import Triple


def sequential_forward(net: Network, inputs: Mapping[str, np.ndarray], output_patch: Sequence[int],
                       mode: str = "direct", keep: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Outputs of ``net`` in inference mode, node group by node group in topological order (every node group's
    values are also put into ``keep`` when given)."""
    spec = net.spec
    layout = spec.layout(output_patch)
    values: dict[str, np.ndarray] = {n: np.asarray(inputs[n], dtype=net.dtype) for n in spec.inputs}
    for node in spec.order():
        group = spec.nodes[node]
        if group.type == "input":
            continue
        parts = [_edge_forward(net, name, values, layout, mode) for name in spec.incoming[node]]
        y = join(parts, any(spec.edges[e].type == "maxout" for e in spec.incoming[node]))[0]
        if group.type == "transfer":
            y = pointwise.transfer_forward(group.function, pointwise.add_bias(y, net.biases[node]),
                                           group.function_args, training=False)
        values[node] = y
    if keep is not None:
        keep.update(values)
    return {n: values[n] for n in spec.outputs}


def _edge_forward(net: Network, name: str, values: Mapping[str, np.ndarray], layout: Layout,
                  mode: str) -> np.ndarray:
    """Edge ``name`` on the central part of its input node's values that it reads."""
    edge = net.spec.edges[name]
    need = net.spec.edge_input_extent(edge, layout.extent[edge.output], layout.sparsity)
    have = layout.extent[edge.input]
    lo: Triple = ((have[0] - need[0]) // 2, (have[1] - need[1]) // 2, (have[2] - need[2]) // 2)
    x = np.ascontiguousarray(central(values[edge.input], lo, need))
    dilation = layout.sparsity[edge.input]
    if edge.type == "conv":
        return convops.conv_forward(x, net.kernels[name], dilation, mode=mode)
    return one_to_one_forward(OneToOne.of(edge, dilation), x)[0]
