"""A plain, sequential evaluation of a network with the ops kernels on whole node groups: no dask, no blocks.

The reference the task graphs are tested against, and a debugging aid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from znn.network import Network
from znn.ops import conv as convops
from znn.ops import pointwise, pooling
from znn.pipeline.graph.tasks import central


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
        parts = []
        for name in spec.incoming[node]:
            edge = spec.edges[name]
            need = spec.edge_input_extent(edge, layout.extent[node], layout.sparsity)
            have = layout.extent[edge.input]
            lo = tuple((a - b) // 2 for a, b in zip(have, need))
            x = np.ascontiguousarray(central(values[edge.input], lo, need))  # type: ignore[arg-type]
            dilation = layout.sparsity[edge.input]
            if edge.type == "conv":
                parts.append(convops.conv_forward(x, net.kernels[name], dilation, mode=mode))
            elif edge.type == "max_filter":
                parts.append(pooling.max_filter(x, edge.size, dilation)[0])
            elif edge.type == "max_pool":
                parts.append(pooling.max_pool(x, edge.size)[0])
            elif edge.type == "dropout":
                parts.append(pointwise.dropout(x, edge.ratio, np.random.default_rng(0), training=False)[0])
            elif edge.type == "crop":
                parts.append(pointwise.crop(x, edge.offset))
            else:
                parts.append(x)
        if any(spec.edges[e].type == "maxout" for e in spec.incoming[node]):
            y = pointwise.maxout(parts)[0]
        else:
            y = sum(parts[1:], parts[0].copy())
        if group.type == "transfer":
            y = pointwise.transfer_forward(group.function, pointwise.add_bias(y, net.biases[node]),
                                           group.function_args, training=False)
        values[node] = y
    if keep is not None:
        keep.update(values)
    return {n: values[n] for n in spec.outputs}
