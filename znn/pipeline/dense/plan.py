"""The plan of a dense run, made once: which network, which output block and how it is computed, how much memory
it takes, the output volume and its block grid, and where each input patch starts.

:func:`plan_dense` makes it from the network, its input files and the caller's :class:`DenseOptions` (a job's keys
and command-line options, or a benchmark's settings); :func:`~znn.pipeline.dense.volume.infer_volume` runs it and
ships its :class:`BlockPlan` to every block task. The memory plan (:mod:`~znn.pipeline.dense.memplan`) and the
measured choice of conv modes (:func:`~znn.pipeline.forward.autotune.inference_modes`) are made here and nowhere
else in a dense run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from znn.errors import ConfigError, ShapeError
from znn.network import Network
from znn.pipeline.dense import memplan
from znn.pipeline.dense.grid import OutputBlock, block_grid, input_offsets, output_shape
from znn.pipeline.dense.inputs import InputFile, as_4d, input_files
from znn.pipeline.forward.evaluators import EVALUATORS
from znn.spec import NetworkSpec
from znn.types import Triple

__all__ = ["MemoryBudget", "DenseOptions", "BlockPlan", "DensePlan", "plan_dense", "patch_search", "memory_plan"]

Modes = str | Mapping[str, str]


@dataclass(frozen=True)
class MemoryBudget:
    """The memory one process of a dense run may use, and how its blocks share it: on ``threaded`` runs one block
    per core (or every core on one bigger block, whichever the speed model prefers), else (one block per
    single-threaded worker process of a cluster) one block. ``baseline``: the process's memory before any block
    (None: measured when planning)."""

    budget: int
    cores: int
    threaded: bool
    baseline: int | None = None

    @property
    def in_flight(self) -> int:
        """Blocks in memory at once in one process, at most."""
        return self.cores if self.threaded else 1


@dataclass(frozen=True)
class DenseOptions:
    """What a caller asks of a dense run.

    ``outsz``: the output block z,y,x, or ``auto`` (the largest that fits ``memory``); ``mirror``: the output has
    the input's size, borders mirrored (else valid-only, smaller by FOV - 1); ``modes``: ``fft``, ``direct``,
    ``optimize`` (timed per layer) or one per conv edge; ``spectra_cache``: keep kernel spectra across blocks
    (turned off when ``memory`` says they do not fit); ``block_threads``: threads working on one block (``auto``
    plans its own); ``evaluator``: ``phases`` or ``graph`` (:mod:`znn.pipeline.forward.evaluators`);
    ``cache_bytes``: a bound on the spectra cache; ``memory``: the budget to plan within (None: no memory plan)."""

    outsz: Sequence[int] | str = "auto"
    mirror: bool = True
    modes: Modes = "fft"
    spectra_cache: bool = True
    block_threads: int = 1
    evaluator: str = "phases"
    cache_bytes: int | None = None
    memory: MemoryBudget | None = None


@dataclass(frozen=True)
class BlockPlan:
    """How one output block is computed: what a block task ships to build its evaluator."""

    net: Network
    outsz: Triple
    modes: Modes
    spectra_cache: bool
    block_threads: int = 1
    evaluator: str = "phases"
    cache_bytes: int | None = None

    def make_evaluator(self) -> Any:
        """A forward evaluator of one block (it builds its kernel spectra lazily, see its ``warm``)."""
        kind = EVALUATORS[self.evaluator]
        return kind(self.net, self.outsz, self.modes, self.spectra_cache, self.cache_bytes, self.block_threads)


@dataclass(frozen=True)
class DensePlan:
    """A dense run's plan (see the module docstring). ``grid`` holds ``(index, origin, write_lo, write_hi)`` per
    block (:func:`~znn.pipeline.dense.grid.block_grid`); ``input_offsets`` the volume position of each input
    node's patch for output origin 0; ``memory`` the memory plan when one was made."""

    block: BlockPlan
    files: dict[str, list[InputFile]]
    mirror: bool
    volume: Triple
    out_shape: Triple
    fov: Triple
    input_offsets: dict[str, Triple]
    grid: list[OutputBlock]
    memory: memplan.MemoryPlan | None = None

    @property
    def net(self) -> Network:
        return self.block.net

    @property
    def outsz(self) -> Triple:
        return self.block.outsz

    @property
    def origin(self) -> tuple[float, float, float]:
        """Where output voxel 0 lies in the first input's file, in its voxels: the start of the input's z range, plus
        the centre of the field of view (``(fov - 1) // 2``) for a valid-only output (a mirrored one starts with its
        input)."""
        from znn.io.volume import parse_volume_path

        path = next(iter(self.files.values()))[0].path
        zrange = None if "://" in path else parse_volume_path(path).zrange
        first = float(zrange[0] or 0) if zrange else 0.0
        half = (0, 0, 0) if self.mirror else tuple((f - 1) // 2 for f in self.fov)
        return first + half[0], float(half[1]), float(half[2])


def plan_dense(net: Network, inputs: Mapping[str, Sequence[InputFile | str]], options: DenseOptions) -> DensePlan:
    """The plan of running ``net`` densely over ``inputs`` (files per network input node) with ``options``."""
    net = net.sliding_window()  # every output voxel is the network applied to its own window
    if options.evaluator not in EVALUATORS:
        raise ConfigError(f"evaluator {options.evaluator!r} is not known; use {' or '.join(EVALUATORS)}")
    files = input_files(net.spec, inputs)
    geometry = _geometry(net.spec, files, options.mirror)
    block, memory = _block(net, options, _search(net, geometry, options.spectra_cache))
    grid = block_grid(geometry.out_shape, block.outsz)
    return DensePlan(block, files, options.mirror, geometry.volume, geometry.out_shape, geometry.fov,
                     geometry.input_offsets, grid, memory)


def patch_search(net: Network, inputs: Mapping[str, Sequence[InputFile | str]], mirror: bool,
                 spectra_cache: bool) -> memplan.PatchSearch:
    """What the memory planner searches for ``net`` over ``inputs`` (see :class:`~.memplan.PatchSearch`)."""
    net = net.sliding_window()
    geometry = _geometry(net.spec, input_files(net.spec, inputs), mirror)
    return _search(net, geometry, spectra_cache)


@dataclass(frozen=True)
class _Geometry:
    volume: Triple
    out_shape: Triple
    fov: Triple
    input_offsets: dict[str, Triple]
    input_itemsize: int


def _geometry(spec: NetworkSpec, files: Mapping[str, list[InputFile]], mirror: bool) -> _Geometry:
    volume, input_itemsize = _volume(spec, files)
    offsets, fov = input_offsets(spec, mirror)
    out_shape = output_shape(volume, fov, mirror)
    if min(out_shape) < 1:
        raise _empty_output(next(iter(files.values()))[0].path, volume, fov, mirror)
    return _Geometry(volume, out_shape, fov, offsets, input_itemsize)


def _empty_output(path: str, volume: Triple, fov: Triple, mirror: bool) -> ShapeError:
    """Why the output would have no voxel, and the change that helps (mirroring helps only a volume that has some)."""
    if min(volume) < 1:
        return ShapeError(f"{path}: volume {volume} has no voxels along an axis, so there is nothing to predict; "
                          "give a volume (or z range) with at least one voxel per axis")
    return ShapeError(f"{path}: volume {volume} is smaller than the network's field of view {fov}; with "
                      "is_bd_mirror = no the output would be empty. Set is_bd_mirror = yes, or use a larger volume")


def _search(net: Network, geometry: _Geometry, spectra_cache: bool) -> memplan.PatchSearch:
    # spectra_cache off forces it off; on lets the planner turn it off where it does not fit
    return memplan.PatchSearch(geometry.out_shape, net.dtype.itemsize, geometry.input_itemsize,
                               None if spectra_cache else False)


def _block(net: Network, options: DenseOptions,
           search: memplan.PatchSearch) -> tuple[BlockPlan, memplan.MemoryPlan | None]:
    """The output block, whether kernel spectra are cached, threads per block (with the memory plan behind them
    when ``options.memory`` is given), and the conv modes for that block."""
    from znn.pipeline.forward.autotune import inference_modes

    patch, cache, threads = options.outsz, options.spectra_cache, max(1, options.block_threads)
    plan = None
    if options.memory is not None:
        plan = memory_plan(net.spec, options.memory, options.modes, search)
        assert plan.chosen is not None
        if isinstance(patch, str):  # auto
            patch = plan.chosen.outsz
            cache = cache and plan.chosen.spectra_cache
            if options.memory.threaded:
                threads = max(1, options.memory.in_flight // plan.in_flight)
        elif cache and not _spectra_fit(net, patch, options.modes, plan):
            cache = False  # kernel spectra do not fit beside the blocks: recompute them per block
    if isinstance(patch, str):
        raise ConfigError(f"output block {patch!r} needs a memory budget to be planned; give z,y,x or a budget")
    assert search.volume_out is not None
    outsz = _clipped(patch, search.volume_out)
    modes = inference_modes(net.spec, outsz, options.modes, net.dtype, cache, threads)
    return BlockPlan(net, outsz, modes, cache, threads, options.evaluator, options.cache_bytes), plan


def _spectra_fit(net: Network, patch: Sequence[int], modes: Modes, plan: memplan.MemoryPlan) -> bool:
    """Whether blocks of ``patch`` with kernel spectra cached fit the budget of ``plan``."""
    est = memplan.block_estimate(net.spec, patch, "fft" if modes == "optimize" else modes, True, net.dtype.itemsize)
    return est.total(plan.in_flight, plan.baseline) <= plan.budget


def memory_plan(spec: NetworkSpec, budget: MemoryBudget, modes: Modes,
                search: memplan.PatchSearch) -> memplan.MemoryPlan:
    """The memory plan of blocks of ``spec`` within ``budget`` (see :class:`MemoryBudget`)."""
    if budget.threaded:  # one block per thread, or all threads on bigger blocks
        return memplan.plan_parallel(spec, budget.budget, budget.in_flight, budget.baseline, modes, search)
    return memplan.plan_memory(spec, budget.budget, budget.in_flight, budget.baseline, modes, search)


def _volume(spec: NetworkSpec, files: Mapping[str, list[InputFile]]) -> tuple[Triple, int]:
    """The z,y,x size every input volume shares, and the largest item size of their stored values."""
    from znn.io.volume import volume_shape_dtype

    sizes: set[Triple] = set()
    itemsize = 1
    for node, found in files.items():
        shapes = []
        for f in found:
            shape, dtype = volume_shape_dtype(f.path)
            shapes.append(as_4d(shape, f.path))
            itemsize = max(itemsize, np.dtype(dtype).itemsize)
        maps = sum(s[0] for s in shapes)
        if maps != spec.nodes[node].size:
            raise ShapeError(f"network input {node!r} takes {spec.nodes[node].size} map(s) but its volume(s) "
                             f"{', '.join(f.path for f in found)} have {maps} channel(s)")
        sizes.update((s[1], s[2], s[3]) for s in shapes)
    if len(sizes) != 1:
        raise ShapeError(f"input volumes differ in size ({sorted(sizes)}); every input of a sample must have the "
                         "same z,y,x size (crop them, or use is_auto_crop)")
    return sizes.pop(), itemsize


def _clipped(patch: Sequence[int], out_shape: Sequence[int]) -> Triple:
    z, y, x = (min(int(p), int(o)) for p, o in zip(patch, out_shape))
    return (z, y, x)

