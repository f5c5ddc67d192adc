"""The static plan of a network at one output patch: extents, sparsities, map blocks, conv modes, crops.

Computed once from the spec (the one FOV computation lives in :mod:`znn.spec`) and shared by the forward and
training graphs.
"""

from __future__ import annotations

import dataclasses

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from znn.errors import ConfigError
from znn.ops import conv_fft
from znn.ops import fft as fftops
from znn.ops.conv import MODES as CONV_MODES  # noqa: F401  (re-exported: the one list of conv modes)
from znn.pipeline.graph.blocks import MapBlock, even_split, map_blocks, slab_count, voxels_of
from znn.spec import ONE_TO_ONE, Layout, NetworkSpec
from znn.types import Triple

__all__ = ["CONV_MODES", "EdgePlan", "NetPlan", "make_plan"]


@dataclass(frozen=True)
class EdgePlan:
    """What one edge group reads and writes: its input crop (central, per axis) and output extent."""

    name: str
    in_extent: Triple  # the extent of the input node
    need: Triple  # the part of it this edge reads (centrally cropped)
    crop_lo: Triple  # offset of that part inside the input node's extent
    out_extent: Triple  # the extent of the output node
    dilation: Triple  # sparsity of the input node: taps of conv/max_filter are this far apart
    mode: str  # conv edges: fft or direct
    fft_shape: Triple | None  # conv edges in fft mode (of one phase when ``phases`` splits the edge)
    size: Triple = (1, 1, 1)  # the edge's window: a conv edge's kernel, a max filter's or max pool's window
    # direct conv edges: the spatial axis (0 z, 1 y, 2 x) their tasks split, the output rows of each forward and
    # kernel-gradient task, and the input (``need``) rows of each input-gradient task
    slab_axis: int = 0
    out_slabs: tuple[MapBlock, ...] = ()
    in_slabs: tuple[MapBlock, ...] = ()
    # fft conv edges: the phases the convolution is split into (conv_fft.phase_split: its dilation, and every
    # plane of a one-plane kernel), each an undilated convolution at ``fft_shape``; (1, 1, 1): not split
    phases: Triple = (1, 1, 1)

    @property
    def phase_count(self) -> int:
        return self.phases[0] * self.phases[1] * self.phases[2]

    @property
    def transform_dilation(self) -> Triple:
        """The dilation of the kernel taps in the transforms: none when the edge is split into phases."""
        return (1, 1, 1) if self.phase_count > 1 else self.dilation

    @property
    def transform_shape(self) -> Triple:
        """The FFT shape of a conv edge in fft mode."""
        if self.fft_shape is None:
            raise ValueError(f"edge {self.name!r} is not planned as an FFT convolution (mode {self.mode!r})")
        return self.fft_shape


@dataclass(frozen=True)
class NetPlan:
    spec: NetworkSpec
    layout: Layout
    blocks: dict[str, list[MapBlock]]
    edges: dict[str, EdgePlan]
    workers: int = 1  # the workers the task split is sized for (blocks.py)

    @property
    def output_patch(self) -> Triple:
        return self.layout.output_patch


def make_plan(spec: NetworkSpec, output_patch: Sequence[int], modes: str | Mapping[str, str] = "fft",
              workers: int = 1) -> NetPlan:
    """Plan ``spec`` for ``output_patch``; ``modes`` is one conv mode for all conv edges or one per edge;
    ``workers``: the cores the graphs' tasks are split for (1: as few tasks as make each worth it)."""
    workers = max(1, int(workers))
    layout = spec.layout(output_patch)
    blocks = _node_blocks(spec, layout, workers)
    edges = {name: _edge_plan(spec, layout, name, _mode(modes, name, spec), workers) for name in spec.edges}
    return NetPlan(spec, layout, blocks, edges, workers)


def _node_blocks(spec: NetworkSpec, layout: Layout, workers: int) -> dict[str, list[MapBlock]]:
    """Map blocks per node group. Nodes joined by one-to-one edges share one partition (block i feeds block i),
    sized for the largest of them."""
    group = {n: n for n in spec.nodes}

    def root(n: str) -> str:
        while group[n] != n:
            n = group[n]
        return n

    for edge in spec.edges.values():
        if edge.type in ONE_TO_ONE:
            group[root(edge.output)] = root(edge.input)
    voxels: dict[str, int] = {}
    for n in spec.nodes:
        voxels[root(n)] = max(voxels.get(root(n), 0), voxels_of(layout.extent[n]))
    return {n: map_blocks(g.size, voxels[root(n)], workers) for n, g in spec.nodes.items()}


def _mode(modes: str | Mapping[str, str], edge: str, spec: NetworkSpec) -> str:
    mode = modes if isinstance(modes, str) else modes.get(edge, "fft")
    if spec.edges[edge].type == "conv" and mode not in CONV_MODES:
        raise ConfigError(f"conv mode {mode!r} for edge {edge!r} is not valid; use fft or direct "
                          "(optimize is resolved by the autotuner first)")
    return mode


def _edge_plan(spec: NetworkSpec, layout: Layout, name: str, mode: str, workers: int) -> EdgePlan:
    edge = spec.edges[name]
    in_extent, out_extent = layout.extent[edge.input], layout.extent[edge.output]
    need = spec.edge_input_extent(edge, out_extent, layout.sparsity)
    crop_lo: Triple = (
        (in_extent[0] - need[0]) // 2, (in_extent[1] - need[1]) // 2, (in_extent[2] - need[2]) // 2)
    dilation = layout.sparsity[edge.input]
    fft_shape, phases = None, (1, 1, 1)
    if edge.type == "conv" and mode == "fft":
        fft_shape, phases = fft_geometry(need, edge.size, dilation)
    plan = EdgePlan(name, in_extent, need, crop_lo, out_extent, dilation, mode, fft_shape, edge.size,
                    phases=phases)
    if edge.type == "conv" and mode == "direct":
        return _slabbed(plan, spec.kernel_shape(name), workers)
    return plan


def fft_geometry(need: Triple, size: Triple, dilation: Triple) -> tuple[Triple, Triple]:
    """``(fft_shape, phases)`` of an FFT conv edge reading ``need``: split into phases
    (:func:`~znn.ops.conv_fft.phase_split`) where that splits anything, each phase transformed at its own small
    shape; else the whole input at its FFT shape."""
    phases = conv_fft.phase_split(need, size, dilation)
    if phases == (1, 1, 1):
        return fftops.fft_shape(need, size, dilation), phases
    return conv_fft.phase_fft_shape(need, size, phases), phases


def _slabbed(plan: EdgePlan, kernel_shape: Sequence[int], workers: int) -> EdgePlan:
    """A direct conv edge's slabs for ``workers``: along its longest of z and y (x rows stay whole, they are
    the columns of every GEMM), the same count for the output rows and the input-gradient rows."""
    axis = 0 if plan.out_extent[0] >= plan.out_extent[1] else 1
    rows = plan.out_extent[axis]
    n_in, n_out = kernel_shape[0], kernel_shape[1]
    row_work = n_in * n_out * voxels_of(plan.size) * voxels_of(plan.out_extent) // rows
    count = slab_count(rows, row_work, workers)
    return dataclasses.replace(plan, slab_axis=axis, out_slabs=tuple(even_split(rows, count)),
                               in_slabs=tuple(even_split(plan.need[axis], min(count, plan.need[axis]))))
