"""Conv mode ``optimize``: time each conv layer in both modes on its real shapes, keep the faster, remember it.

For every conv edge group whose mode is ``optimize``, :func:`resolve_modes` times one training pass of the
layer (forward, kernel gradient, and the input gradient unless the input is a network input) in FFT and in
direct mode, as the graph runs it: the graph's own task functions (:mod:`znn.pipeline.graph.tasks`) on the plan's
map blocks, single-threaded. One task of each kind is timed (blocks of a node differ by at most one map) and
multiplied by how many the graph has; the sum is the work the graph does for the layer. Timing the whole
layer in one call would mislead: a direct convolution split into blocks of a few output maps runs its
products far below the speed of one call on all maps, while FFTs of input blocks are shared by all pairs.

Dense inference (:func:`inference_modes`, used by ``znn forward`` for ``forward_conv_mode = optimize``) times the
layer as its evaluator runs it instead: the phase-FFT convolution (kernel spectra cached or made per block) and
the direct convolution of a block, on the block's threads. A layer whose speed model says one mode is far slower
is not timed at all (:func:`_modelled`); the others are timed on a slab of the block (:class:`Slab`: one phase of
the dilation along the block's longest axis, a few of its tiles, the block's own tile shape, so the FFT plans
FFTW measures for it are the ones the run then uses) and scaled up by tiles (fft) and output voxels (direct):
timing a large block's layer whole took minutes of a first run, most of them in the mode that lost.

Choices are kept in a JSON file (``cache_path``, else ``$ZNN_CACHE_DIR/autotune.json``, else
``~/.cache/znn/autotune.json``), keyed by the layer's shape, dilation, dtype, FFTW planner effort and the
machine (:func:`machine_id`), and written atomically; a later run reads them instead of measuring. A corrupt
or unreadable file is remeasured (with a warning) and rewritten.
"""

from __future__ import annotations

import dataclasses
import functools

import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from znn.environment import cache_dir, cpu_model
from znn.ops import fft as fftops
from znn.ops.conv import Tile as DirectTile
from znn.pipeline.graph import fft_edges, tasks
from znn.pipeline.graph.core import Op
from znn.pipeline.graph.plan import CONV_MODES, EdgePlan, fft_geometry, make_plan
from znn.pipeline.run.schedulers import single_threaded_kernels
from znn.spec import NetworkSpec
from znn.types import Triple

__all__ = ["LayerProblem", "TimedPass", "Slab", "resolve_modes", "inference_modes", "wants_optimize", "machine_id",
           "cache_file", "time_layer"]

log = logging.getLogger("znn.autotune")

Timer = Callable[["LayerProblem", str], float]
CACHE_VERSION = 1
# The phase evaluator's revision: raise it when its kernels change, so timings stored for the old code are not
# taken for the new (2: fewer copies in phase_conv_fft; 3: tiles of a small FFT shape; 4: bundled gathers,
# maps-last spectra, recycled activations).
PHASES_REVISION = 4
# The graph's FFT tasks' revision, likewise (2: dilated and one-plane kernels split into phases; 3: products over
# large map blocks summed, not joined: conv_fft.joins_blocks).
GRAPH_FFT_REVISION = 3
# After one timed run per mode, a mode this many times slower has lost: no need for more repetitions.
_CLEAR_WIN = 2.0
# Layers whose modelled times differ by more than this are not timed (see _modelled).
_MODEL_CLEAR = 8.0
# A slab (see Slab) takes as many tiles along its axis as keep its slower mode's modelled one-core time within this
# (at least one): long enough to time steadily, short next to the layer.
_SLAB_SECONDS = 0.3


@dataclass(frozen=True)
class LayerProblem:
    """What one conv layer computes in a training step: the shapes that decide fft against direct."""

    maps_in: int
    maps_out: int
    in_extent: Triple  # the part of the input node the edge reads
    kernel: Triple
    dilation: Triple
    dtype: str
    grad_input: bool  # False when the input is a network input: no input gradient is computed
    in_blocks: tuple[tuple[int, int], ...] = ()  # the plan's map blocks of the input and output nodes
    out_blocks: tuple[tuple[int, int], ...] = ()
    training: bool = True  # False: forward passes with cached kernel spectra (inference)
    # "graph": the training engine's tasks; "phases": dense inference's PhaseForward, with kernel spectra cached
    # per worker (``cached_spectra``) or made per block
    evaluator: str = "graph"
    cached_spectra: bool = True
    threads: int = 1  # threads per block of the phase evaluator (graph tasks are timed on one thread each)
    # the graph's direct tasks: its slabs of output rows (forward, kernel gradient) and of input rows (input
    # gradient) when it is planned for several workers; (): one task each
    out_slabs: tuple[tuple[int, int], ...] = ()
    in_slabs: tuple[tuple[int, int], ...] = ()
    slab_axis: int = 0

    def __post_init__(self) -> None:
        if not self.in_blocks:
            object.__setattr__(self, "in_blocks", ((0, self.maps_in),))
        if not self.out_blocks:
            object.__setattr__(self, "out_blocks", ((0, self.maps_out),))

    @property
    def pass_name(self) -> str:
        if self.evaluator == "phases":
            return f"phases{'' if self.cached_spectra else '-uncached'}@{PHASES_REVISION}"
        return f"{'train' if self.training else 'forward'}@{GRAPH_FFT_REVISION}"

    @property
    def out_extent(self) -> Triple:
        o = [n - (k - 1) * d for n, k, d in zip(self.in_extent, self.kernel, self.dilation)]
        return (o[0], o[1], o[2])

    def edge_plan(self, mode: str) -> EdgePlan:
        """The layer as the graph's tasks see it: reading all of ``in_extent``."""
        shape, phases = fft_geometry(self.in_extent, self.kernel, self.dilation) if mode == "fft" else (None, (1, 1, 1))
        return EdgePlan("autotune", self.in_extent, self.in_extent, (0, 0, 0), self.out_extent, self.dilation, mode,
                        shape, self.kernel, phases=phases)

    def key(self, machine: str) -> str:
        fields = [f"maps={self.maps_in},{self.maps_out}", "in=" + ",".join(map(str, self.in_extent)),
                  "kernel=" + ",".join(map(str, self.kernel)), "dilation=" + ",".join(map(str, self.dilation)),
                  f"blocks={len(self.in_blocks)},{len(self.out_blocks)}", f"dtype={self.dtype}",
                  f"grad_input={int(self.grad_input)}", f"pass={self.pass_name}",
                  f"planner={fftops.planner_effort()}", f"machine={machine}"]
        if self.threads != 1:
            fields.insert(-2, f"threads={self.threads}")
        if self.out_slabs:
            fields.insert(-2, f"slabs={len(self.out_slabs)},{len(self.in_slabs)}")
        return "|".join(fields)


@dataclass(frozen=True)
class TimedPass:
    """Which pass :func:`resolve_modes` times: a training step of the graph (``training``), a forward pass of the
    graph with kernel spectra cached, or (``evaluator="phases"``) dense inference's phase evaluator, with its kernel
    spectra cached (``spectra_cache``) or made per block, on ``threads`` threads per block."""

    training: bool = True
    evaluator: str = "graph"
    spectra_cache: bool = True
    threads: int = 1


def resolve_modes(spec: NetworkSpec, output_patch: Sequence[int], modes: str | Mapping[str, str],
                  dtype: Any = np.float32, *, cache_path: str | Path | None = None, repeat: int = 3,
                  timer: Timer | None = None, timed: TimedPass = TimedPass(), workers: int = 1) -> dict[str, str]:
    """The conv mode of every conv edge group, with ``optimize`` replaced by the faster of fft and direct.

    ``modes`` is one mode for all conv edges or a dict per edge (missing edges are ``fft``, as in
    :func:`~znn.pipeline.graph.plan.make_plan`). Layers whose choice is in the cache are not measured; the others
    are timed ``repeat`` times per mode (median; fewer when one mode is clearly slower) and written back.
    ``timer(problem, mode)`` returns the seconds of one run and replaces the real measurement (tests).
    ``timed`` says which pass is timed (:class:`TimedPass`: a training step by default); ``workers``: the graph's
    tasks are those of a plan for that many workers (its map blocks and direct slabs: a layer split 16 ways runs
    smaller products than one split two ways, and the faster mode may differ).
    """
    wanted = {e: (modes if isinstance(modes, str) else modes.get(e, "fft")) for e in spec.conv_edges()}
    for edge, mode in wanted.items():
        if mode not in (*CONV_MODES, "optimize"):
            from znn.errors import ConfigError

            raise ConfigError(f"conv mode {mode!r} for edge {edge!r} is not valid; use fft, direct or optimize")
    todo = [e for e, m in wanted.items() if m == "optimize"]
    if not todo:
        return wanted
    problems = _problems(spec, output_patch, todo, np.dtype(dtype), timed, workers)
    path = cache_file(cache_path)
    machine = machine_id()
    stored = _read(path)
    measure = timer or time_layer
    keys = {edge: problems[edge].key(machine) for edge in todo}  # edges of one shape share a key
    measured: dict[str, dict[str, Any]] = {}
    how: dict[str, str] = {}  # key -> cached, modelled or timed
    for edge in todo:
        key = keys[edge]
        entry = stored.get(key)
        if entry is not None and entry.get("mode") in CONV_MODES:
            how[key] = "cached"
        elif (modelled := _modelled(problems[edge])) is not None:
            measured[key], how[key] = modelled, "modelled"
    first_of: dict[str, str] = {}  # key -> the first edge of that shape still to time
    for edge in todo:
        if keys[edge] not in how:
            first_of.setdefault(keys[edge], edge)
    to_time = list(first_of.values())
    t0 = time.perf_counter()
    if to_time:  # the one step of planning that takes long: say what it does
        log.info("choosing conv modes: timing %s in fft and direct mode%s", ", ".join(to_time),
                 " on slabs of the block" if timed.evaluator == "phases" else "")
    for edge in to_time:
        measured[keys[edge]], how[keys[edge]] = _measure(problems[edge], measure, repeat), "timed"
    entries = {**stored, **measured}
    for edge in todo:
        entry = entries[keys[edge]]
        wanted[edge] = entry["mode"]
        log.debug("autotune %s: %s (%s; fft %s, direct %s)", edge, entry["mode"], how[keys[edge]],
                  _fmt(entry.get("fft_s")), _fmt(entry.get("direct_s")))
    log.info("conv modes%s: %s", f" chosen in {time.perf_counter() - t0:.1f} s" if to_time else "",
             ", ".join(f"{e} {wanted[e]} ({how[keys[e]]})" for e in todo))
    if measured:
        _write(path, measured)
    return wanted


def _fmt(seconds: Any) -> str:
    return f"{1e3 * seconds:.1f} ms" if isinstance(seconds, (int, float)) else "?"


def _problems(spec: NetworkSpec, output_patch: Sequence[int], edges: Sequence[str], dtype: np.dtype[Any],
              timed: TimedPass, workers: int = 1) -> dict[str, LayerProblem]:
    phases = timed.evaluator == "phases"
    workers = 1 if phases else max(1, int(workers))
    plan = make_plan(spec, output_patch, "fft", workers)
    direct = make_plan(spec, output_patch, "direct", workers) if workers > 1 else None
    out = {}
    for name in edges:
        edge, ep = spec.edges[name], plan.edges[name]
        n_in, n_out = spec.kernel_shape(name)[:2]
        problem = LayerProblem(n_in, n_out, ep.need, edge.size, ep.dilation, dtype.name,
                               spec.nodes[edge.input].type != "input", tuple(plan.blocks[edge.input]),
                               tuple(plan.blocks[edge.output]), timed.training and not phases, timed.evaluator,
                               timed.spectra_cache, max(1, int(timed.threads)) if phases else 1)
        if direct is not None:
            dp = direct.edges[name]
            problem = dataclasses.replace(problem, out_slabs=dp.out_slabs, in_slabs=dp.in_slabs,
                                          slab_axis=dp.slab_axis)
        out[name] = problem
    return out


def _modelled(problem: LayerProblem) -> dict[str, Any] | None:
    """The mode of a dense-inference layer whose speed model (``direct_seconds``, ``TileGeometry.seconds``) says
    the other mode is over ``_MODEL_CLEAR`` times slower, without timing it (else None): timing the slow mode of a
    large patch (a direct 80 x 80 map layer over 185^3 takes minutes) costs more than the run it tunes."""
    from znn.ops.conv import direct_seconds
    from znn.ops.phase import TileGeometry, choose_tile

    if problem.evaluator != "phases" or problem.training:
        return None
    w_shape = (problem.maps_in, problem.maps_out, *problem.kernel)
    itemsize = np.dtype(problem.dtype).itemsize
    tile = choose_tile(problem.in_extent, w_shape, problem.dilation, itemsize=itemsize)
    geometry = TileGeometry.of(problem.in_extent, w_shape, problem.dilation, tile)
    fft = geometry.seconds(problem.cached_spectra)
    direct = direct_seconds(problem.maps_in, problem.maps_out, problem.kernel, geometry.out)
    if max(fft, direct) < _MODEL_CLEAR * min(fft, direct):
        return None
    return {"mode": "fft" if fft < direct else "direct", "fft_s": fft, "direct_s": direct, "modelled": True}


@dataclass(frozen=True)
class Slab:
    """What dense inference's autotune times of a layer, and the factors that scale its fft and direct seconds to
    the whole layer.

    FFT: ``extent`` of the input, one phase of the layer's dilation along ``axis`` (the block's longest; dilation 1
    there, ``dilation``) and ``tiles`` of that phase's tiles, at the layer's own tile shape (``tile``): the work per
    tile is the same whatever the extent, so it scales by the tile count (``fft_scale``), and the FFT plans FFTW
    measures for it are the ones the run uses. Direct: the first of the layer's own output tiles
    (``direct_tiles``, of :func:`~znn.ops.conv.direct_tiles`; dilation and halo as in the run), scaled by output
    voxels (``direct_scale``). Each takes as much as keeps its modelled one-core time within ``_SLAB_SECONDS``."""

    extent: Triple
    dilation: Triple
    tile: Triple
    axis: int
    tiles: int
    fft_scale: float
    direct_tiles: tuple[DirectTile, ...]
    direct_scale: float

    @classmethod
    def of(cls, problem: LayerProblem) -> Slab:
        from znn.ops.phase import TileGeometry, choose_tile

        w_shape = (problem.maps_in, problem.maps_out, *problem.kernel)
        tile = choose_tile(problem.in_extent, w_shape, problem.dilation,
                           itemsize=np.dtype(problem.dtype).itemsize)  # as the evaluator picks it
        whole = TileGeometry.of(problem.in_extent, w_shape, problem.dilation, tile)
        axis = max(range(3), key=lambda a: whole.out[a])
        k = problem.kernel[axis]
        step = tile[axis] - k + 1  # valid outputs of one tile along the axis
        rows = -(-whole.out[axis] // problem.dilation[axis])  # outputs of the axis's longest phase
        dilation = _with(problem.dilation, axis, 1)
        found = None
        for tiles in range(1, -(-rows // step) + 1):
            slab = TileGeometry.of(_with(problem.in_extent, axis, min(rows, tiles * step) + k - 1), w_shape,
                                   dilation, tile)
            if found is not None and slab.seconds() > _SLAB_SECONDS:
                break
            found = (tiles, slab)
        assert found is not None
        tiles, slab = found
        chosen, voxels = _first_direct_tiles(problem, whole.out)
        return cls(slab.extent, dilation, tile, axis, tiles, whole.count() / slab.count(), chosen,
                   math.prod(whole.out) / voxels)


def _first_direct_tiles(problem: LayerProblem, out: Triple) -> tuple[tuple[DirectTile, ...], int]:
    """The first of the layer's direct-mode output tiles whose modelled one-core time is within ``_SLAB_SECONDS``
    (at least one per thread), and their output voxels."""
    from znn.ops.conv import direct_seconds, direct_tiles

    w_shape = (problem.maps_in, problem.maps_out, *problem.kernel)
    every = direct_tiles(out, w_shape, problem.dilation, np.dtype(problem.dtype).itemsize)
    chosen: list[DirectTile] = []
    voxels = 0
    for z0, z1, y0, y1 in every:
        more = (z1 - z0) * (y1 - y0) * out[2]
        seconds = direct_seconds(problem.maps_in, problem.maps_out, problem.kernel, (voxels + more, 1, 1))
        if len(chosen) >= problem.threads and seconds > _SLAB_SECONDS:
            break
        chosen.append((z0, z1, y0, y1))
        voxels += more
    return tuple(chosen), voxels


def _with(values: Triple, axis: int, value: int) -> Triple:
    out = list(values)
    out[axis] = value
    return (out[0], out[1], out[2])


def _measure(problem: LayerProblem, timer: Timer, repeat: int) -> dict[str, Any]:
    """Time both modes, interleaved; stop early when one mode is clearly slower after one timed run each."""
    runs: dict[str, list[float]] = {m: [] for m in CONV_MODES}
    for mode in CONV_MODES:
        timer(problem, mode)  # warm-up: FFT plans, DFT matrices, page faults
    for rep in range(max(1, repeat)):
        for mode in CONV_MODES:
            runs[mode].append(timer(problem, mode))
        fft, direct = runs["fft"][-1], runs["direct"][-1]
        if rep == 0 and max(fft, direct) > _CLEAR_WIN * min(fft, direct):
            break
    med = {m: float(statistics.median(v)) for m, v in runs.items()}
    best = min(CONV_MODES, key=lambda m: med[m])
    return {"mode": best, "fft_s": med["fft"], "direct_s": med["direct"], "runs": len(runs["fft"]),
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}


# ---------------------------------------------------------------------------------------------- measurement


def time_layer(problem: LayerProblem, mode: str, seed: int = 0) -> float:
    """Seconds of the graph's work for one training pass (or, with ``problem.training`` false, one inference
    pass) of the layer in ``mode`` (single-threaded tasks): one task of each kind timed, times their number."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(problem.dtype)
    if problem.evaluator == "phases":
        slab = Slab.of(problem)
        w = (rng.standard_normal((problem.maps_in, problem.maps_out, *problem.kernel)) * 0.1).astype(dt)
        with single_threaded_kernels():  # BLAS as dense inference runs a block; problem.threads split the work
            return _phase_forward(problem, slab, w, mode, rng)
    xs = [rng.standard_normal((b - a, *problem.in_extent)).astype(dt) for a, b in problem.in_blocks]
    w = (rng.standard_normal((problem.maps_in, problem.maps_out, *problem.kernel)) * 0.1).astype(dt)
    gys = [rng.standard_normal((b - a, *problem.out_extent)).astype(dt) for a, b in problem.out_blocks]
    run = _fft_tasks if mode == "fft" else _direct_tasks
    with single_threaded_kernels():
        return run(problem, xs, w, gys)


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0


def _fft_tasks(p: LayerProblem, xs: list[np.ndarray], w: np.ndarray, gys: list[np.ndarray]) -> float:
    """The FFT-mode tasks of the layer (:mod:`znn.pipeline.graph.fft_edges`): one of each operation timed, times
    how many of it the builder makes (:func:`~znn.pipeline.graph.fft_edges.task_counts`)."""
    edge = p.edge_plan("fft")
    ib0, ob0 = p.in_blocks[0], p.out_blocks[0]
    seconds: dict[Op, float] = {}
    spectra = functools.partial(tasks.input_spectra, edge=edge)
    xspec, seconds[Op.INPUT_SPECTRA] = _timed(spectra, xs[0])
    xspecs = [xspec] + [spectra(x) for x in xs[1:]]
    kernels = functools.partial(tasks.kernel_spectra, edge=edge)
    kspec, seconds[Op.KERNEL_SPECTRA] = _timed(kernels, w, ib0, ob0)
    column = [kspec] + [kernels(w, ib, ob0) for ib in p.in_blocks[1:]]
    _, seconds[Op.CONV] = _timed(functools.partial(tasks.conv_fft_forward, edge=edge), xspecs, column)
    if p.training:
        grads = functools.partial(tasks.grad_output_spectra, edge=edge)
        gspec, seconds[Op.GRAD_SPECTRA] = _timed(grads, gys[0])
        if p.grad_input:
            gspecs = [gspec] + [grads(g) for g in gys[1:]]
            row = [kspec] + [kernels(w, ib0, ob) for ob in p.out_blocks[1:]]
            _, seconds[Op.GRAD_INPUT] = _timed(functools.partial(tasks.conv_fft_grad_input, edge=edge), gspecs, row)
        _, seconds[Op.GRAD_KERNEL] = _timed(functools.partial(tasks.conv_fft_grad_kernel, edge=edge), xspec, gspec)
    # inference: kernel spectra come from the cache
    counts = fft_edges.task_counts(len(p.in_blocks), len(p.out_blocks), training=p.training,
                                   grad_input=p.grad_input, cached=not p.training)
    return sum(n * seconds[op] for op, n in counts.items() if n)


def _direct_tasks(p: LayerProblem, xs: list[np.ndarray], w: np.ndarray, gys: list[np.ndarray]) -> float:
    """The direct-mode tasks of the layer (forward, input and kernel gradient): one slab of every row on one
    worker; for a plan of several workers the first of its slabs of each kind, times their number (the slabs
    are an even split of the rows)."""
    edge = dataclasses.replace(p.edge_plan("direct"), slab_axis=p.slab_axis)
    axis = edge.slab_axis
    out_slabs = p.out_slabs or ((0, edge.out_extent[axis]),)
    in_slabs = p.in_slabs or ((0, edge.need[axis]),)
    _, t_fwd = _timed(functools.partial(tasks.conv_direct_slab, edge=edge, out_rows=out_slabs[0]), xs, w)
    if not p.training:
        return t_fwd * len(out_slabs)
    _, t_gw = _timed(functools.partial(tasks.conv_direct_grad_kernel_slab, edge=edge, kernel_shape=w.shape,
                                       out_rows=out_slabs[0]), xs, gys)
    t_gx = 0.0
    if p.grad_input:
        _, t_gx = _timed(functools.partial(tasks.conv_direct_grad_input_slab, edge=edge, in_rows=in_slabs[0]),
                         gys, w)
    return (t_fwd + t_gw) * len(out_slabs) + t_gx * len(in_slabs)


def _phase_forward(p: LayerProblem, slab: Slab, w: np.ndarray, mode: str, rng: np.random.Generator) -> float:
    """What :class:`~znn.pipeline.forward.phases.PhaseForward` runs for this layer on one block, timed on ``slab``
    and scaled to the whole layer. The memory of input and output is made before the timing, as the evaluator's
    are recycled from block to block."""
    from znn.ops import conv as convops
    from znn.ops.phase import PHASE_GROUP_BYTES, TileGeometry, group_spectra, phase_conv_fft, phase_kernel_spectra

    if mode == "direct":
        # the whole input and output, of which the slab's tiles use a few planes: only those are given memory
        x = np.zeros((p.maps_in, *p.in_extent), w.dtype)
        out = np.empty((p.maps_out, *p.out_extent), w.dtype)
        z0, z1, y0, y1 = (f(t[i] for t in slab.direct_tiles) for i, f in enumerate((min, max, min, max)))
        x[:, z0:z1 + (p.kernel[0] - 1) * p.dilation[0], y0:y1 + (p.kernel[1] - 1) * p.dilation[1]].fill(0)
        out[:, z0:z1, y0:y1].fill(0)
        return slab.direct_scale * _timed(functools.partial(convops.conv_forward_direct, out=out,
                                                            tiles=slab.direct_tiles), x, w, p.dilation,
                                          p.threads)[1]
    x = rng.standard_normal((p.maps_in, *slab.extent)).astype(w.dtype)
    geometry = TileGeometry.of(slab.extent, w.shape, slab.dilation, slab.tile)
    out = np.zeros((p.maps_out, *geometry.out), w.dtype)
    # the group spectra too: the layer reuses one group's for all its tiles, a slab would fault in its every tile's
    spectra = group_spectra(geometry, w.dtype, PHASE_GROUP_BYTES)
    for a in (out, *spectra):
        a.fill(0)
    wf, made = _timed(phase_kernel_spectra, w, slab.tile)  # once per block without the cache: not scaled
    seconds = slab.fft_scale * _timed(functools.partial(phase_conv_fft, out=out, spectra=spectra), x, w,
                                      slab.dilation, wf, PHASE_GROUP_BYTES, p.threads, slab.tile)[1]
    return seconds if p.cached_spectra else seconds + made


def wants_optimize(modes: str | Mapping[str, str]) -> bool:
    """Whether ``modes`` (one mode, or one per conv edge) leaves any layer to be measured."""
    return modes == "optimize" if isinstance(modes, str) else "optimize" in modes.values()


def inference_modes(spec: NetworkSpec, output_patch: Sequence[int], modes: str | Mapping[str, str],
                    dtype: Any = np.float32, spectra_cache: bool = True, threads: int = 1) -> str | dict[str, str]:
    """``modes`` for dense inference at ``output_patch``: ``optimize`` resolved per layer by timing the phase
    evaluator's fft and direct convolutions on the layer's real shapes with ``threads`` threads per block
    (remembered in the autotune file)."""
    if not wants_optimize(modes):
        return modes if isinstance(modes, str) else dict(modes)
    return resolve_modes(spec, output_patch, modes, dtype,
                         timed=TimedPass(training=False, evaluator="phases", spectra_cache=spectra_cache,
                                         threads=threads))


# ---------------------------------------------------------------------------------------------- the cache


def machine_id() -> str:
    """What a timing depends on besides the layer: architecture, CPU model, NumPy (its BLAS) and pyfftw."""
    from importlib.metadata import version

    return f"{platform.machine()};{cpu_model()};numpy {np.__version__};pyfftw {version('pyfftw')}"


def cache_file(path: str | Path | None = None) -> Path:
    """The autotune file: ``path`` if given, else ``autotune.json`` in :func:`znn.environment.cache_dir`
    (``$ZNN_CACHE_DIR``, else ``~/.cache/znn`` on Linux)."""
    if path is not None:
        return Path(path)
    return cache_dir() / "autotune.json"


def _read(path: Path) -> dict[str, dict[str, Any]]:
    """The stored entries; a missing file is empty, a corrupt one is empty with a warning."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        warnings.warn(f"{path}: cannot read the autotune cache ({exc}); measuring again", RuntimeWarning,
                      stacklevel=3)
        return {}
    try:
        data = json.loads(text)
        entries = data["entries"]
        if data.get("version") != CACHE_VERSION or not isinstance(entries, dict):
            raise ValueError(f"version {data.get('version')!r}, expected {CACHE_VERSION}")
        return {k: v for k, v in entries.items() if isinstance(v, dict)}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        warnings.warn(f"{path}: the autotune cache is corrupt ({exc}); measuring again and rewriting it "
                      "(delete the file to silence this)", RuntimeWarning, stacklevel=3)
        return {}


def _write(path: Path, new: Mapping[str, dict[str, Any]]) -> None:
    """Merge ``new`` into the file (re-read just before, so concurrent runs keep each other's entries) and
    replace it atomically. A cache that cannot be written only costs a remeasurement next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            entries = _read(path)
        entries.update(new)
        fd, tmp = tempfile.mkstemp(prefix=".autotune-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        warnings.warn(f"{path}: cannot write the autotune cache ({exc}); set ZNN_CACHE_DIR to a writable folder",
                      RuntimeWarning, stacklevel=3)
