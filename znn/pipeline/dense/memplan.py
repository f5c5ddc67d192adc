"""Memory planning for dense inference: predict the peak memory of one output block before running it, and pick the
largest FFT-friendly output patch that fits a memory budget.

The model follows what one block holds while its evaluator runs it (intermediates released as soon as their last
reader ran). For the phase evaluator of dense inference (:class:`~znn.pipeline.forward.phases.PhaseForward`, the
default):

* activations: each node group's maps over its extent, kept until every edge that reads them has run; a node group
  with one incoming edge is biased and transferred in place, one with several holds their outputs and their sum;
* a conv edge in FFT mode (:func:`~znn.ops.phase.phase_conv_fft`): its output, the input and output spectra of one
  group of tiles (``TileGeometry.group`` x ``item_bytes``), each thread's real tile buffers, and the kernel spectra
  at the tile shape unless they come from the cache (the input is read in place, a view of the live activation);
* a conv edge in direct mode: its output, and per thread the gathered column tile (``znn.ops.conv.TILE_BYTES``) and
  the partial sums;
* max filters: the output and each thread's running maxima of one slab (``znn.ops.pooling.max_filter_values``);
* recycled activations (PhaseForward): an output takes the memory of a released activation of at most twice its
  size, and at most two released buffers wait (for the next block too). Activations shrink along the network, so
  a layer then holds what an earlier layer held (its input and output), which the model counted there; each
  output is counted at its own size;
* per block: the raw input read from the file, its float copy with the mirrored border, the transformed output
  and its copy handed to the store.

The graph evaluator (``evaluator="graph"``) keeps the older, per-map-block model of the training engine's tasks.
On top of the blocks: the kernel spectra cache (every FFT conv layer's ``in x out`` spectra at its tile shape,
shared by all blocks of the process) and the process baseline (interpreter, libraries, FFTW plans), measured.
Peak = baseline + run overhead + cache + blocks in flight x per-block peak x ``SAFETY``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from znn.environment import proc_bytes
from znn.errors import ShapeError
from znn.ops import fft as fftops
from znn.ops.conv import TILE_BYTES, TILE_VOXELS, direct_seconds
from znn.ops.phase import TileGeometry
from znn.pipeline.graph.plan import NetPlan, make_plan
from znn.spec import NetworkSpec
from znn.text import format_bytes, format_table, parse_bytes, zyx
from znn.types import Triple

__all__ = [
    "BlockEstimate",
    "MemoryPlan",
    "PatchSearch",
    "parse_bytes",
    "format_bytes",
    "process_rss",
    "block_estimate",
    "candidate_patches",
    "choose_modes",
    "plan_memory",
    "plan_parallel",
    "predicted_seconds",
]

# Allocator slack, temporaries the model leaves out (dask's bookkeeping, NumPy scratch of pointwise ops).
SAFETY = 1.2
# Per block in flight: a thread's stack, its FFTW plans, zarr/numcodecs buffers.
PER_BLOCK_OVERHEAD = 16 << 20
# Per process, once the run starts: the scheduler's thread pool and bookkeeping, zarr/numcodecs codec buffers,
# FFTW plans and their scratch, allocator fragmentation across threads (measured: 50-70 MiB on the development
# machine for a small network).
RUN_OVERHEAD = 64 << 20
# Bytes of gathered columns of one direct-convolution tile.
DIRECT_TILE_BYTES = TILE_BYTES
# Threads whose tile buffers the model counts per block (more threads hold a few megabytes more each).
_TILE_THREADS = 4

def process_rss() -> int:
    """Resident memory of this process now, in bytes (Linux /proc; 0 where unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss() -> int:
    """Peak resident memory of this process image, in bytes (Linux VmHWM; 0 where unknown).

    Unlike ``ru_maxrss``, which a child inherits from the process that forked it, VmHWM starts afresh at exec, and
    writing ``5`` to ``/proc/self/clear_refs`` resets it to the current RSS."""
    return proc_bytes("/proc/self/status", "VmHWM")


@dataclass(frozen=True)
class BlockEstimate:
    """Predicted memory of one output block at ``outsz``: ``per_block`` bytes while it runs (``layers`` says where
    the peak is) and ``cache`` bytes of kernel spectra shared by every block when ``spectra_cache`` is on."""

    outsz: Triple
    input_patch: Triple
    modes: dict[str, str]
    spectra_cache: bool
    per_block: int
    cache: int
    peak_at: str
    layers: dict[str, int] = field(default_factory=dict)

    def total(self, in_flight: int, baseline: int) -> int:
        return int(baseline + RUN_OVERHEAD + (self.cache if self.spectra_cache else 0) + in_flight * self.per_block)


@dataclass(frozen=True)
class MemoryPlan:
    """The chosen output patch and what the planner predicted for it and for the other candidates."""

    budget: int
    baseline: int
    in_flight: int
    chosen: BlockEstimate | None
    candidates: list[BlockEstimate]

    @property
    def predicted_peak(self) -> int:
        if self.chosen is None:
            return 0
        return self.chosen.total(self.in_flight, self.baseline)

    def table(self) -> str:
        """One row per candidate (largest first): patch, per block, cache, predicted peak, fits."""
        head = ("output patch", "input patch", "per block", "spectra cache", "peak", "fits")
        rows = []
        for est in sorted(self.candidates, key=lambda e: -math.prod(e.outsz)):
            peak = est.total(self.in_flight, self.baseline)
            mark = "<- chosen" if est == self.chosen else ("yes" if peak <= self.budget else "no")
            rows.append((zyx(est.outsz), zyx(est.input_patch), format_bytes(est.per_block),
                         format_bytes(est.cache) if est.spectra_cache else "off (recomputed)", format_bytes(peak),
                         mark))
        lines = [format_table(head, rows)]
        lines.append(f"budget {format_bytes(self.budget)} = baseline {format_bytes(self.baseline)} + run overhead "
                     f"{format_bytes(RUN_OVERHEAD)} + spectra cache "
                     f"+ {self.in_flight} block(s) in flight x per block")
        return "\n".join(lines)



def _vox(shape: Sequence[int]) -> int:
    return math.prod(int(v) for v in shape)


# -------------------------------------------------------------------------------------------------- the model
def _edge_sizes(plan: NetPlan, name: str, itemsize: int) -> tuple[int, int, int, int]:
    """(input maps, output maps, bytes of the input crop it reads, bytes of its output) of edge ``name``."""
    ep, edge = plan.edges[name], plan.spec.edges[name]
    n_in, n_out = plan.spec.nodes[edge.input].size, plan.spec.nodes[edge.output].size
    return n_in, n_out, n_in * _vox(ep.need) * itemsize, n_out * _vox(ep.out_extent) * itemsize


def _edge_working(plan: NetPlan, name: str, itemsize: int, cached: bool) -> tuple[int, int]:
    """(transient bytes while edge ``name`` runs, bytes of its kernel spectra) for one block."""
    ep, edge = plan.edges[name], plan.spec.edges[name]
    n_in, n_out, in_bytes, out_bytes = _edge_sizes(plan, name, itemsize)
    if edge.type == "conv" and ep.mode == "fft":
        shape = ep.fft_shape
        assert shape is not None
        freq = _vox(fftops.spectrum_shape(shape))
        csize = 2 * itemsize
        in_blocks, out_blocks = plan.blocks[edge.input], plan.blocks[edge.output]
        ib = max(b - a for a, b in in_blocks)
        ob = max(b - a for a, b in out_blocks)
        phases = ep.phase_count  # maps are transformed phase by phase; kernels once, at the phase shape
        x_spec = n_in * phases * freq * csize
        transform = ib * phases * (_vox(shape) * itemsize + freq * csize)  # padded real, spectrum
        k_pair = ib * ob * freq * csize
        kernels = n_in * n_out * freq * csize
        # the pruned DFT of one block pair: its result plus the (kz of Z) partial stage of 3D kernels
        k_transient = k_pair * (edge.size[0] / shape[0] if shape[0] > 1 else 0.1)
        # accumulators and the real result of the inverse
        per_out = ob * phases * (2 * freq * csize + _vox(shape) * itemsize)
        work = x_spec + max(transform, per_out + ob * _vox(ep.out_extent) * itemsize)
        if cached:
            return int(work), int(kernels)
        # without the cache each output block's task makes the kernel spectra of its column and drops them
        column = n_in * ob * freq * csize
        return int(work + column + k_transient), int(kernels)
    if edge.type == "conv":
        tile = min(DIRECT_TILE_BYTES, math.prod(edge.size[1:]) * n_in * _vox(ep.out_extent) * itemsize
                   + n_in * _vox(ep.need) * itemsize)
        parts = len(plan.blocks[edge.input])
        return int(tile + 2 * out_bytes + parts * out_bytes), 0
    if edge.type in ("max_filter", "max_pool"):
        return int(4 * in_bytes + out_bytes), 0
    return int(in_bytes + out_bytes), 0


def _tiles(plan: NetPlan, itemsize: int) -> dict[str, TileGeometry]:
    from znn.pipeline.forward.phases import fft_tiles

    return fft_tiles(plan, itemsize)


def _edge_working_phases(plan: NetPlan, name: str, itemsize: int, cached: bool) -> tuple[int, int]:
    """(transient bytes, kernel spectra bytes) of edge ``name`` in :class:`znn.pipeline.forward.phases.PhaseForward`,
    its output included: an FFT conv holds its output, one group of tiles' spectra and each thread's tile buffers
    (the input is read in place); a max filter its output and each thread's slab of running maxima."""
    from znn.ops.pooling import MAX_FILTER_SLAB_BYTES

    ep, edge = plan.edges[name], plan.spec.edges[name]
    _, n_out, in_bytes, out_bytes = _edge_sizes(plan, name, itemsize)
    if edge.type == "conv" and ep.mode == "fft":
        tiles = _tiles(plan, itemsize)[name]
        kernels = tiles.spectra_bytes(itemsize)
        work = (out_bytes + tiles.group(itemsize) * tiles.item_bytes(itemsize)
                + _TILE_THREADS * tiles.thread_bytes(itemsize))
        return int(work + (0 if cached else kernels)), int(kernels)
    if edge.type == "conv":  # its output, and per thread a tile's gathered columns and partial sums
        return int(out_bytes + _TILE_THREADS * (DIRECT_TILE_BYTES + 2 * n_out * TILE_VOXELS * itemsize)), 0
    if edge.type == "max_filter":
        return int(out_bytes + _TILE_THREADS * 2 * min(in_bytes, MAX_FILTER_SLAB_BYTES)), 0
    return _edge_working(plan, name, itemsize, cached)


def _joining(spec: NetworkSpec, node: str, nbytes: int, evaluator: str) -> int:
    """Bytes a node group holds beyond its edges' outputs while it joins them and applies its transfer: the phase
    evaluator sums several outputs into a new array and biases and transfers in place; the graph's tasks make a
    new array for each step."""
    if evaluator != "phases":
        return 2 * nbytes
    return nbytes if len(spec.incoming[node]) > 1 else 0


def block_estimate(spec: NetworkSpec, outsz: Sequence[int], modes: str | Mapping[str, str] = "fft",
                   spectra_cache: bool = True, itemsize: int = 4, input_itemsize: int = 1,
                   evaluator: str = "phases") -> BlockEstimate:
    """Predict the memory of one block at output patch ``outsz`` (see the module docstring for the model).

    ``itemsize`` is the network's float size (4 or 8); ``input_itemsize`` that of the stored input volume;
    ``evaluator`` the block evaluator of :mod:`znn.pipeline.forward.evaluators` (``phases`` or ``graph``).
    """
    working = _edge_working_phases if evaluator == "phases" else _edge_working
    plan = make_plan(spec, tuple(int(v) for v in outsz), modes)
    walk = _Walk(plan, itemsize, input_itemsize, spectra_cache, working, evaluator == "phases")
    walk.block()  # the first block; the second starts with the buffers the first left for reuse
    peak, peak_at, layers, cache = walk.block()
    per_block = int(SAFETY * peak) + PER_BLOCK_OVERHEAD
    mode_map = {e: plan.edges[e].mode for e in spec.conv_edges()}
    first = spec.inputs[0]
    # the cache is the exact size of the spectra arrays: no allowance for temporaries
    return BlockEstimate(plan.output_patch, plan.layout.extent[first], mode_map, spectra_cache, per_block,
                         int(cache) if spectra_cache else 0, peak_at, layers)


class _Walk:
    """One block's memory, node group by node group, as its evaluator holds it. With ``recycled`` (PhaseForward),
    activations live in buffers handed on by :func:`~znn.pipeline.forward.phases.reuse_spare` (each held at the
    size of the buffer it took) and released buffers wait for reuse, across blocks too."""

    def __init__(self, plan: NetPlan, itemsize: int, input_itemsize: int, spectra_cache: bool,
                 working: Callable[[NetPlan, str, int, bool], tuple[int, int]], recycled: bool) -> None:
        self.plan, self.itemsize, self.input_itemsize = plan, itemsize, input_itemsize
        self.spectra_cache, self.working, self.recycled = spectra_cache, working, recycled
        self.spare: list[int] = []

    def _take(self, node: str, need: int) -> int:
        from znn.pipeline.forward.phases import reuse_spare

        if not self.recycled or node in self.plan.spec.outputs:
            return need
        index = reuse_spare(self.spare, need)
        return need if index is None else self.spare.pop(index)

    def _release(self, size: int) -> None:
        from znn.pipeline.forward.phases import keep_spares

        if self.recycled:
            self.spare = keep_spares([*self.spare, size])

    def block(self) -> tuple[int, str, dict[str, int], int]:
        """(peak bytes, where, bytes per node group, kernel spectra bytes) of one block."""
        plan, itemsize = self.plan, self.itemsize
        spec, extent = plan.spec, plan.layout.extent
        node_bytes = {n: spec.nodes[n].size * _vox(extent[n]) * itemsize for n in spec.nodes}
        consumers = {n: len(spec.outgoing[n]) for n in spec.nodes}
        live: dict[str, int] = {}
        layers: dict[str, int] = {}
        cache = 0
        in_bytes = sum(node_bytes[n] for n in spec.inputs)
        read = sum(spec.nodes[n].size * _vox(extent[n]) * (self.input_itemsize + itemsize) for n in spec.inputs)
        out_bytes = sum(node_bytes[n] for n in spec.outputs)
        peak, peak_at = read + in_bytes + sum(self.spare), "input"
        for node in spec.order():
            if spec.nodes[node].type == "input":
                live[node] = node_bytes[node]
                continue
            edge_outputs, work = 0, 0
            held = [self._take(node, node_bytes[node]) for _ in spec.incoming[node]]
            for e, size in zip(spec.incoming[node], held):
                w, k = self.working(plan, e, itemsize, self.spectra_cache)
                cache += k if plan.edges[e].mode == "fft" and spec.edges[e].type == "conv" else 0
                work = max(work, edge_outputs + w - node_bytes[node] + size)
                edge_outputs += size
            joining = _joining(spec, node, node_bytes[node], "phases" if self.recycled else "graph")
            here = sum(live.values()) + sum(self.spare) + max(work, edge_outputs + joining)
            layers[node] = here
            if here > peak:
                peak, peak_at = here, node
            for e in spec.incoming[node]:  # inputs of this node's edges are released once all their readers ran
                src = spec.edges[e].input
                consumers[src] -= 1
                if consumers[src] == 0 and src in live:
                    size = live.pop(src)
                    if spec.nodes[src].type != "input":
                        self._release(size)
            live[node] = held[0] if len(held) == 1 else node_bytes[node]  # a sum of parts is a new array
            for size in held if len(held) > 1 else ():
                self._release(size)
        finish = sum(live.values()) + sum(self.spare) + 3 * out_bytes  # transform, the copy written to the store
        if finish > peak:
            peak, peak_at = finish, "output"
        for node in spec.outputs:
            live.pop(node, None)
        for size in live.values():
            self._release(size)
        return peak, peak_at, layers, cache


# -------------------------------------------------------------------------------------------------- modes
def _seconds(plan: NetPlan, name: str, spectra_cache: bool) -> tuple[float, float]:
    """Predicted (direct, fft) seconds of conv edge ``name`` for one block with the phase evaluator."""
    spec, ep = plan.spec, plan.edges[name]
    edge = spec.edges[name]
    n_in, n_out = spec.nodes[edge.input].size, spec.nodes[edge.output].size
    direct = direct_seconds(n_in, n_out, edge.size, ep.out_extent)
    return direct, _tiles(plan, 4)[name].seconds(spectra_cache)


def choose_modes(spec: NetworkSpec, outsz: Sequence[int], spectra_cache: bool = True) -> dict[str, str]:
    """Per conv edge, ``fft`` or ``direct``, whichever the speed model above predicts faster for one block (used
    for ``optimize`` when the autotuner is absent, and by the forward benchmark)."""
    plan = make_plan(spec, tuple(int(v) for v in outsz), "fft")
    modes: dict[str, str] = {}
    for name in spec.conv_edges():
        direct, fft = _seconds(plan, name, spectra_cache)
        modes[name] = "fft" if fft < direct else "direct"
    return modes


def predicted_seconds(spec: NetworkSpec, outsz: Sequence[int], modes: Mapping[str, str],
                      spectra_cache: bool = True) -> float:
    """Predicted seconds of the conv layers of one block (one thread) under ``modes``."""
    plan = make_plan(spec, tuple(int(v) for v in outsz), "fft")
    return sum(_seconds(plan, e, spectra_cache)[0 if modes.get(e) == "direct" else 1] for e in spec.conv_edges())


# -------------------------------------------------------------------------------------------------- candidates
def _smooth_sizes(limit: int) -> list[int]:
    return [n for n in range(1, limit + 1) if fftops.fast_len(n) == n]


def candidate_patches(spec: NetworkSpec, volume_out: Sequence[int] | None = None,
                      max_side: int | None = None) -> list[Triple]:
    """FFT-friendly output patches (input patch extent a 7-smooth length on every axis), clipped to the output
    volume ``volume_out``; 2D networks (FOV 1 in z) get planes ``1 x s x s`` and then thicker slabs once a plane
    covers the volume. Sorted by voxels, ascending."""
    fov = spec.layout((1, 1, 1)).fov
    two_d = fov[0] == 1
    limit = max_side or (4096 if two_d else 1024)
    vol = tuple(int(v) for v in volume_out) if volume_out is not None else (10**9,) * 3

    def axis(a: int, s: int) -> int:
        size = s - fov[a] + 1
        return size

    sides = [n for n in _smooth_sizes(limit + max(fov)) if n - max(fov[1:]) + 1 >= 1]
    found: set[Triple] = set()
    for n in sides:
        y, x = min(axis(1, n), vol[1]), min(axis(2, n), vol[2])
        if y < 1 or x < 1:
            continue
        if two_d:
            found.add((1, y, x))
            if y == vol[1] and x == vol[2]:
                for z in (2, 4, 8, 16, 32, 64):
                    found.add((min(z, vol[0]), y, x))
        else:
            z = min(axis(0, n) if n - fov[0] + 1 >= 1 else 1, vol[0])
            if z >= 1:
                found.add((z, y, x))
    return sorted(found, key=lambda t: (math.prod(t), t))


# -------------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class PatchSearch:
    """Which output patches the planner tries and what one block of them reads and holds.

    ``volume_out``: the output volume (candidates are clipped to it and evened out over it); ``itemsize``: the
    network's float size; ``input_itemsize``: that of the stored input volume; ``spectra_cache``: None tries
    caching kernel spectra and recomputing them, True or False forces one; ``candidates``: the patches to try
    (default :func:`candidate_patches`)."""

    volume_out: Sequence[int] | None = None
    itemsize: int = 4
    input_itemsize: int = 1
    spectra_cache: bool | None = None
    candidates: Sequence[Sequence[int]] | None = None

    def patches(self, spec: NetworkSpec) -> list[Triple]:
        found = [tuple(int(v) for v in p) for p in (self.candidates or candidate_patches(spec, self.volume_out))]
        if self.volume_out is None:
            return found  # type: ignore[return-value]
        # same block count, blocks of even size: no block computes mostly overlap
        volume_out = self.volume_out
        return sorted({_even(volume_out, p) for p in found}, key=lambda t: (math.prod(t), t))


def plan_memory(spec: NetworkSpec, budget: int, in_flight: int = 1, baseline: int | None = None,
                modes: str | Mapping[str, str] = "fft", search: PatchSearch | None = None) -> MemoryPlan:
    """Pick the largest candidate output patch (of ``search``) whose predicted peak fits ``budget`` bytes.

    ``in_flight`` blocks run at once (each with its own memory); ``baseline`` is the process's memory before any
    block (default: measured now). Kernel spectra are cached across blocks when that fits, else recomputed per
    block (``search.spectra_cache`` forces one or the other). ``modes`` may be ``optimize`` (chosen per patch by
    :func:`choose_modes`). Raises :class:`ShapeError` if not even the smallest candidate fits.
    """
    search = search or PatchSearch()
    base = process_rss() if baseline is None else int(baseline)
    patches = search.patches(spec)
    volume_out, itemsize, input_itemsize = search.volume_out, search.itemsize, search.input_itemsize
    options = (True, False) if search.spectra_cache is None else (search.spectra_cache,)
    estimates: list[BlockEstimate] = []
    chosen: BlockEstimate | None = None
    busy: BlockEstimate | None = None  # the largest that fits and still gives every block in flight work
    for patch in patches:
        best_here = None
        for cache in options:
            m = choose_modes(spec, patch, cache) if modes == "optimize" else modes
            est = block_estimate(spec, patch, m, cache, itemsize, input_itemsize)
            if best_here is None or (est.total(in_flight, base) <= budget and
                                     best_here.total(in_flight, base) > budget):
                best_here = est
        assert best_here is not None
        estimates.append(best_here)
        if best_here.total(in_flight, base) <= budget:
            chosen = best_here
            if volume_out is None or _blocks(volume_out, patch) >= in_flight:
                busy = best_here
    chosen = busy or chosen
    if chosen is None:
        smallest = estimates[0] if estimates else None
        need = format_bytes(smallest.total(in_flight, base)) if smallest else "?"
        raise ShapeError(f"no output patch fits {format_bytes(budget)}: the smallest candidate "
                         f"{zyx(smallest.outsz) if smallest else '?'} needs {need} with {in_flight} block(s) in "
                         "flight (baseline " + format_bytes(base) + "); give more memory or fewer threads")
    return MemoryPlan(budget, base, in_flight, chosen, estimates)


_THREAD_GAIN = 0.75
_BLOCK_CONTENTION = 0.1


def plan_parallel(spec: NetworkSpec, budget: int, cores: int, baseline: int | None = None,
                  modes: str | Mapping[str, str] = "fft", search: PatchSearch | None = None) -> MemoryPlan:
    """:func:`plan_memory` for one block per core, and for one block using every core; the plan whose chosen patch
    promises more output voxels per second (by the speed model of :func:`predicted_seconds`) wins. Its
    ``in_flight`` says how many blocks run at once (each on ``cores // in_flight`` threads)."""
    base = process_rss() if baseline is None else int(baseline)
    best: tuple[float, MemoryPlan] | None = None
    failure: ShapeError | None = None
    for in_flight in sorted({max(1, cores), 1}, reverse=True):
        try:
            plan = plan_memory(spec, budget, in_flight, base, modes, search)
        except ShapeError as exc:
            failure = exc
            continue
        est = plan.chosen
        assert est is not None
        threads = max(1, cores // in_flight)
        # measured on n337 (2-core development machine, one PhaseForward block, median of 3): two threads on one
        # block are 1.75x as fast as one at 32^3 (5.6 s -> 3.2 s) and 1.7x at 64^3 (14.0 s -> 8.4 s); two blocks
        # side by side on one thread each take 1.1x as long as one alone (memory bandwidth)
        speedup = 1.0 + _THREAD_GAIN * (threads - 1)
        slowdown = 1.0 + _BLOCK_CONTENTION * (in_flight - 1)
        seconds = predicted_seconds(spec, est.outsz, est.modes, est.spectra_cache) / speedup * slowdown
        rate = in_flight * math.prod(est.outsz) / max(seconds, 1e-9)
        if best is None or rate > best[0]:
            best = (rate, plan)
    if best is None:
        assert failure is not None
        raise failure
    return best[1]


def _even(volume_out: Sequence[int], patch: Sequence[int]) -> Triple:
    return tuple(math.ceil(int(v) / math.ceil(int(v) / int(p))) for v, p in zip(volume_out, patch))  # type: ignore[return-value]


def _blocks(volume_out: Sequence[int], patch: Sequence[int]) -> int:
    return math.prod(math.ceil(int(v) / int(p)) for v, p in zip(volume_out, patch))


def describe_estimate(est: BlockEstimate) -> dict[str, Any]:
    """A JSON-friendly summary of an estimate."""
    return {"outsz": list(est.outsz), "input_patch": list(est.input_patch), "per_block": est.per_block,
            "cache": est.cache, "spectra_cache": est.spectra_cache, "peak_at": est.peak_at, "modes": est.modes}
