"""The network spec: the DAG of a `.znn` file, validated, with the sparsity and extent passes.

A spec is built by :func:`znn.io.netfile.load_network`; this module only knows groups and their options.
Node groups hold ``size`` feature maps; edge groups connect two node groups. Sizes, strides, offsets and
extents are (z, y, x) tuples.

Sparsity (ZNN's dense sliding-window trick): a ``conv`` or ``max_filter`` edge never subsamples; its stride
multiplies the sparsity of the node it feeds, and every later window runs dilated by that sparsity.
Extents are computed backwards from the outputs: a window ``w`` at input sparsity ``s`` needs
``out + (w - 1) * s`` input voxels, a ``max_pool`` of ``w`` needs ``out * w``. The FOV is the input extent
that yields one output voxel.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from znn.errors import NetworkSpecError, ShapeError, closest, where
from znn.types import Triple

NODE_TYPES = ("input", "sum", "transfer")
EDGE_TYPES = ("conv", "max_filter", "max_pool", "dropout", "crop", "maxout")
ONE_TO_ONE = ("max_filter", "max_pool", "dropout", "crop", "maxout")
WINDOW_EDGES = ("conv", "max_filter")  # edges that run dilated by the sparsity
TRANSFER_FUNCTIONS = {
    # name: (minimum, maximum) number of function_args
    "linear": (0, 2),
    "rectify_linear": (0, 0),
    "tanh": (0, 2),
    "soft_sign": (0, 0),
    "logistics": (0, 0),
    "forward_logistics": (0, 0),
}


@dataclass
class Group:
    """Common part of node and edge groups: a name, a type, options, and where they were written."""

    name: str
    type: str
    options: dict[str, str] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    line: int | None = None  # line of the `nodes NAME` / `edges NAME` header
    path: str | None = None

    def at(self, key: str | None = None) -> str:
        """Location of this group (or one of its keys) for error messages."""
        line = self.lines.get(key, self.line) if key else self.line
        kind = "nodes" if isinstance(self, NodeGroup) else "edges"
        return f"{where(self.path, line)}: {kind} {self.name}" + (f", key {key!r}" if key else "")


@dataclass
class NodeGroup(Group):
    size: int = 1
    function: str = "linear"
    function_args: tuple[float, ...] = ()
    dense: bool = False
    init: str = "zero"
    init_args: tuple[float, ...] = ()


@dataclass
class EdgeGroup(Group):
    input: str = ""
    output: str = ""
    size: Triple = (1, 1, 1)
    stride: Triple = (1, 1, 1)
    offset: Triple = (0, 0, 0)
    ratio: float = 0.5
    init: str = "zero"
    init_args: tuple[float, ...] = ()


@dataclass(frozen=True)
class Layout:
    """The result of the sparsity and extent passes for one output patch size.

    ``extent[node]`` is the patch each node group computes, ``sparsity[node]`` its dilation,
    ``input_patch[node]`` the extent of each input node, ``fov`` the input extent for one output voxel
    (for networks with several inputs, of the first input; see ``input_fov``).
    """

    output_patch: Triple
    extent: dict[str, Triple]
    sparsity: dict[str, Triple]
    input_fov: dict[str, Triple]

    @property
    def fov(self) -> Triple:
        return next(iter(self.input_fov.values()))

    @property
    def input_patch(self) -> dict[str, Triple]:
        return {name: self.extent[name] for name in self.input_fov}


class NetworkSpec:
    """A validated network DAG. Build with :meth:`from_groups` (which validates) or load from a file."""

    def __init__(self, nodes: dict[str, NodeGroup], edges: dict[str, EdgeGroup], path: str | None = None):
        self.nodes = nodes
        self.edges = edges
        self.path = path
        self.incoming: dict[str, list[str]] = {n: [] for n in nodes}
        self.outgoing: dict[str, list[str]] = {n: [] for n in nodes}
        for edge in edges.values():
            if edge.output in self.incoming:
                self.incoming[edge.output].append(edge.name)
            if edge.input in self.outgoing:
                self.outgoing[edge.input].append(edge.name)

    @classmethod
    def from_groups(
        cls, nodes: Iterable[NodeGroup], edges: Iterable[EdgeGroup], path: str | Path | None = None
    ) -> "NetworkSpec":
        spec = cls({n.name: n for n in nodes}, {e.name: e for e in edges}, str(path) if path else None)
        spec.validate()
        return spec

    # -- structure ---------------------------------------------------------------------------------
    @property
    def inputs(self) -> list[str]:
        """Input node groups, in file order (the order of a sample's input1, input2, ...)."""
        return [n for n, g in self.nodes.items() if g.type == "input"]

    @property
    def outputs(self) -> list[str]:
        """Output node groups: those with no outgoing edge (the node `output` among them)."""
        return [n for n in self.nodes if not self.outgoing[n]]

    def order(self) -> list[str]:
        """Node groups in topological order (inputs first); raises on a cycle."""
        indegree = {n: len(self.incoming[n]) for n in self.nodes}
        ready = [n for n in self.nodes if indegree[n] == 0]
        order: list[str] = []
        while ready:
            node = ready.pop(0)
            order.append(node)
            for e in self.outgoing[node]:
                target = self.edges[e].output
                indegree[target] -= 1
                if indegree[target] == 0:
                    ready.append(target)
        if len(order) < len(self.nodes):
            stuck = [n for n in self.nodes if n not in order]
            cycle_edges = [e for e in self.edges.values() if e.output in stuck and e.input in stuck]
            first = cycle_edges[0] if cycle_edges else self.edges[self.incoming[stuck[0]][0]]
            raise NetworkSpecError(
                f"{first.at()}: the network has a cycle through node groups {', '.join(stuck)}; "
                "edges must form a directed acyclic graph from the inputs to the outputs"
            )
        return order

    def edge_order(self) -> list[str]:
        """Edge groups in an order where every edge comes after the edges feeding its input node."""
        rank = {n: i for i, n in enumerate(self.order())}
        return sorted(self.edges, key=lambda e: rank[self.edges[e].input])

    # -- validation --------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`NetworkSpecError` naming the file and line of the first inconsistency."""
        here = where(self.path)
        if not self.nodes:
            raise NetworkSpecError(f"{here}: the network has no node groups; add `nodes NAME` blocks")
        for edge in self.edges.values():
            self._check_edge_references(edge)
        self.order()  # cycles
        if not self.inputs:
            raise NetworkSpecError(f"{here}: the network has no input node group; add one with `type input`")
        for name in self.inputs:
            if self.incoming[name]:
                edge = self.edges[self.incoming[name][0]]
                raise NetworkSpecError(f"{edge.at('output')}: edges may not lead into input node group {name!r}")
        for name, node in self.nodes.items():
            if node.type != "input" and not self.incoming[name]:
                raise NetworkSpecError(
                    f"{node.at()}: node group {name!r} has no incoming edge; connect it or make it `type input`"
                )
        outputs = [n for n in self.outputs if self.nodes[n].type != "input"]
        if not outputs:
            raise NetworkSpecError(f"{here}: the network has no output node group (a node with no outgoing edge)")
        for edge in self.edges.values():
            self._check_one_to_one(edge)
        self._check_maxout_nodes()
        self.sparsity()

    def _check_edge_references(self, edge: EdgeGroup) -> None:
        for key in ("input", "output"):
            target = getattr(edge, key)
            if target not in self.nodes:
                raise NetworkSpecError(
                    f"{edge.at(key)}: node group {target!r} does not exist; {closest(target, self.nodes)}"
                )
        if edge.input == edge.output:
            raise NetworkSpecError(f"{edge.at('output')}: an edge may not connect node group {edge.input!r} to itself")

    def _check_one_to_one(self, edge: EdgeGroup) -> None:
        if edge.type not in ONE_TO_ONE:
            return
        n_in, n_out = self.nodes[edge.input].size, self.nodes[edge.output].size
        if n_in != n_out:
            raise NetworkSpecError(
                f"{edge.at()}: a {edge.type} edge is one-to-one, but input {edge.input!r} has {n_in} maps "
                f"and output {edge.output!r} has {n_out}; make the two sizes equal"
            )

    def _check_maxout_nodes(self) -> None:
        for name, edge_names in self.incoming.items():
            kinds = {self.edges[e].type == "maxout" for e in edge_names}
            if len(kinds) > 1:
                raise NetworkSpecError(
                    f"{self.nodes[name].at()}: node group {name!r} mixes maxout edges with other edges; "
                    "a maxout node takes only maxout edges"
                )

    # -- passes ------------------------------------------------------------------------------------
    def sparsity(self) -> dict[str, Triple]:
        """Sparsity (dilation) of every node group, forward from the inputs."""
        result: dict[str, Triple] = {}
        for name in self.order():
            node = self.nodes[name]
            if node.type == "input":
                result[name] = (1, 1, 1)
                continue
            candidates = {self._edge_sparsity(self.edges[e], result[self.edges[e].input]) for e in self.incoming[name]}
            if len(candidates) > 1:
                raise NetworkSpecError(
                    f"{node.at()}: incoming edges of {name!r} disagree on sparsity ({sorted(candidates)}); "
                    "give the branches the same strides, or set `dense 1`"
                )
            result[name] = (1, 1, 1) if node.dense else candidates.pop()
        return result

    @staticmethod
    def _edge_sparsity(edge: EdgeGroup, sparsity: Triple) -> Triple:
        if edge.type in WINDOW_EDGES:
            return _mul(sparsity, edge.stride)
        return sparsity

    def layout(self, output_patch: Sequence[int] = (1, 1, 1)) -> Layout:
        """Extents of every node group for an output patch (applied to every output), and the FOV."""
        outsz = _triple(output_patch)
        if min(outsz) < 1:
            raise ShapeError(f"output patch {outsz} must be at least 1 voxel on each axis")
        sparsity = self.sparsity()
        extent = self._extents(outsz, sparsity)
        ones = self._extents((1, 1, 1), sparsity)
        fov = {name: ones[name] for name in self.inputs}
        return Layout(outsz, extent, sparsity, fov)

    def _extents(self, outsz: Triple, sparsity: dict[str, Triple]) -> dict[str, Triple]:
        extent: dict[str, Triple] = {}
        for name in reversed(self.order()):
            needs = [self.edge_input_extent(self.edges[e], extent[self.edges[e].output], sparsity)
                     for e in self.outgoing[name]]
            if not needs:
                extent[name] = outsz
            else:  # ZNN takes the largest requirement per axis; other branches are cropped centrally
                extent[name] = tuple(max(axis) for axis in zip(*needs))
        return extent

    @staticmethod
    def edge_input_extent(edge: EdgeGroup, out: Triple, sparsity: dict[str, Triple]) -> Triple:
        s = sparsity[edge.input]
        if edge.type in WINDOW_EDGES:
            return _triple(o + (w - 1) * d for o, w, d in zip(out, edge.size, s))
        if edge.type == "max_pool":
            return _mul(out, edge.size)
        if edge.type == "crop":
            return _triple(o + 2 * c for o, c in zip(out, edge.offset))
        return out

    def sliding_window(self) -> "NetworkSpec":
        """The dense twin of this network, for sliding-window inference.

        A ``max_pool`` edge subsamples: run over a patch larger than one output voxel, the pooled network gives
        outputs a pool's width apart, not neighbours. Its twin replaces each ``max_pool`` by a ``max_filter`` of the
        same window whose stride is the window, so every later window runs dilated by it (ZNN's sparsity; ZNNi's
        max-pooling fragments give the same values). At any output patch, each output voxel of the twin is this
        network applied to that voxel's own field of view; the FOV and the parameters are the same. A network
        without ``max_pool`` edges is its own twin.
        """
        if not any(e.type == "max_pool" for e in self.edges.values()):
            return self
        edges = [replace(e, type="max_filter", stride=e.size) if e.type == "max_pool" else e
                 for e in self.edges.values()]
        return NetworkSpec.from_groups(self.nodes.values(), edges, self.path)

    # -- parameters --------------------------------------------------------------------------------
    def conv_edges(self) -> list[str]:
        return [e for e, g in self.edges.items() if g.type == "conv"]

    def bias_nodes(self) -> list[str]:
        return [n for n, g in self.nodes.items() if g.type == "transfer"]

    def kernel_shape(self, edge: str) -> tuple[int, int, int, int, int]:
        """Shape of a conv edge group's kernels: (in_maps, out_maps, z, y, x)."""
        g = self.edges[edge]
        return (self.nodes[g.input].size, self.nodes[g.output].size, *g.size)

    def parameter_count(self) -> int:
        kernels = sum(int(np.prod(self.kernel_shape(e))) for e in self.conv_edges())
        return kernels + sum(self.nodes[n].size for n in self.bias_nodes())


def _mul(a: Sequence[int], b: Sequence[int]) -> Triple:
    return (a[0] * b[0], a[1] * b[1], a[2] * b[2])


def _triple(values: Iterable[int]) -> Triple:
    triple = tuple(int(v) for v in values)
    if len(triple) != 3:
        raise ShapeError(f"expected a z,y,x triple, got {triple}")
    return triple
