"""`znn describe`: a table of a network's node and edge groups with maps, sparsity, extent, parameters and memory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from znn.spec import Layout, NetworkSpec
from znn.text import format_bytes, format_table, zyx


def describe(spec: NetworkSpec, output_patch: Sequence[int] = (1, 1, 1), itemsize: int = 4) -> str:
    """The text `znn describe` prints: one row per node group (each followed by its outgoing edges), then totals,
    the FOV and the input patch. Memory counts one forward activation and one gradient per voxel of each group."""
    layout = spec.layout(output_patch)
    header = ("group", "kind", "type", "maps", "size", "stride", "sparsity", "extent", "params", "memory")
    rows: list[tuple[str, ...]] = []
    total_params, total_bytes = 0, 0
    for name in spec.order():
        node = spec.nodes[name]
        params = node.size if node.type == "transfer" else 0
        nbytes = 2 * node.size * int(np.prod(layout.extent[name])) * itemsize
        total_params, total_bytes = total_params + params, total_bytes + nbytes
        rows.append((name, "node", node.type + (f" {node.function}" if node.type == "transfer" else ""),
                     str(node.size), "", "", zyx(layout.sparsity[name]), zyx(layout.extent[name]), str(params),
                     format_bytes(nbytes)))
        for e in spec.outgoing[name]:
            edge = spec.edges[e]
            params = int(np.prod(spec.kernel_shape(e))) if edge.type == "conv" else 0
            total_params += params
            rows.append(("  " + e, "edge", f"{edge.type} -> {edge.output}", "", zyx(edge.size), zyx(edge.stride),
                         "", "", str(params), ""))
    total_bytes += 2 * total_params * itemsize  # parameters and their momentum
    lines = format_table(header, rows).split("\n")
    lines.append("")
    lines.append(f"parameters: {total_params:,}   memory estimate: {format_bytes(total_bytes)} "
                 f"(activations and gradients at output patch {zyx(layout.output_patch)}, float{8 * itemsize})")
    lines.extend(_fov_lines(layout))
    return "\n".join(lines)


def _fov_lines(layout: Layout) -> list[str]:
    lines = []
    for name, fov in layout.input_fov.items():
        lines.append(f"input {name}: FOV {zyx(fov)}   input patch {zyx(layout.extent[name])} "
                     f"for output patch {zyx(layout.output_patch)}")
    return lines


def load_any_network(path: str | Path) -> NetworkSpec:
    """The spec of a `.znn` file, or the one saved in a `.h5` checkpoint."""
    from znn.io.checkpoint import load_checkpoint
    from znn.io.netfile import load_network

    if str(path).endswith((".h5", ".hdf5")):
        return load_checkpoint(path).spec
    return load_network(path)
