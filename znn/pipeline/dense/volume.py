"""Dense inference over volumes far larger than memory: tiled, seam-free, resumable.

The output volume is cut into output blocks of one patch size (the last block along an axis is shifted back to end
at the border, and writes only its own part). Each block is one dask task that

1. reads its input region with the FOV halo from the input files (lazily: zarr/h5/tif regions), mirrored at the
   volume border when ``mirror`` is on (then the output has the input's size) or valid-only otherwise (the output is
   smaller by FOV - 1), and applies the sample's preprocessing with statistics computed beforehand over the whole
   volume (so a block sees exactly what a whole-volume run sees);
2. runs the network's forward graph in-process on one thread (single-threaded kernels), taking the kernel spectra
   from a per-process :class:`~znn.pipeline.graph.cache.SpectraCache` shared by every block (or recomputing them per block
   when the memory plan says they do not fit);
3. applies the output transform (softmax or sigmoid over channels) and writes its region into the output image's
   full-resolution array, whose chunks are the output blocks (no two tasks write one chunk), then marks the block
   done in the manifest (:mod:`znn.pipeline.dense.manifest`) and saves the FFT plans its process made so far to the
   per-user wisdom cache (:mod:`znn.ops.wisdom`; nothing to do once a process plans nothing new). Chunks are
   written atomically (:class:`~znn.io.atomic_store.AtomicLocalStore`:
   a temporary file renamed into place), so a worker killed mid-write never leaves a half-written chunk.

Each output is an OME-Zarr image (:mod:`znn.io.ngff`: axes, voxel size, where it lies in the input, provenance);
with ``pyramid`` its downsampled levels are made after every block is written, block by block on the same runner
(mean of each window). Every run rewrites the outputs' metadata and drops the levels of an earlier run (level 0 may
have changed under them), then makes its own.

The run is planned beforehand, once (:func:`~znn.pipeline.dense.plan.plan_dense`: output block, conv modes,
spectra cache, memory, block grid); :func:`infer_volume` takes that plan in a :class:`DenseRequest` and runs it on
a :class:`~znn.pipeline.run.schedulers.Runner`. Every store write goes through :mod:`znn.io.stores`.

On a dask.distributed cluster, blocks lost with a dead worker (running, or finished but not yet collected) are
recomputed on the remaining workers by the scheduler; rewriting a block gives the same bytes, and its marker is
written after its chunk, so the output and the manifest stay right whatever dies when.

Blocks are a dask graph whose tasks return only small statistics, so at most one block per worker thread is in
memory: memory is bounded by the block size times the blocks in flight, never by the volume.

Output layout (``<prefix>`` is the job's ``output_prefix``)::

    <prefix>_sample<id>_output.zarr/<node>     an OME-Zarr image per network output node group: <node>/0 float32
                                               (maps, z, y, x) full resolution, <node>/1, ... the pyramid
    <prefix>_sample<id>_output.zarr/znn-manifest/{run.json, done/<i>_<j>_<k>}
    <prefix>_sample<id>_output.zarr.lock       the run lock (:mod:`znn.io.locks`: one run per store; the holder's
                                               pid, host and start time in ``.lock.json`` while it runs)
    <prefix>_sample<id>_output.h5:/<node>      with output_format = h5 (copied from the zarr at the end)
    <prefix>_sample<id>_output.tif             with output_format = tif (``..._output_<node>.tif`` for several)
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np

from znn.errors import ConfigError
from znn.io.locks import RunLock, lock_beside
from znn.io.stores import (
    ArrayLayout,
    ImageMeta,
    arrays_match,
    check_output_store,
    clear_partial,
    create_arrays,
    update_metadata,
    write_pyramid,
    write_region,
)
from znn.network import Network
from znn.ops import wisdom
from znn.ops.transform import OUTPUT_TRANSFORMS, apply_transform
from znn.pipeline.dense.grid import OutputBlock
from znn.pipeline.dense.inputs import Source, open_sources, read_region
from znn.pipeline.dense.manifest import Manifest, digest_of, weights_digest
from znn.pipeline.dense.plan import BlockPlan, DensePlan
from znn.pipeline.run.schedulers import Runner, make_runner
from znn.types import Index, Triple

__all__ = ["DenseRequest", "InferenceResult", "infer_volume", "run_block"]

log = logging.getLogger("znn.forward")


class Reporter(Protocol):
    """What progress of a run is reported to (:class:`~znn.pipeline.run.progress.Progress` is one)."""

    def update(self, n: int = 1, **fields: Any) -> None: ...

    def close(self) -> None: ...


#: a progress factory: ``(total blocks, blocks already done) -> reporter``
ProgressFactory = Callable[[int, int], Reporter]


@dataclass
class DenseRequest:
    """A dense run: the ``plan`` (:func:`~znn.pipeline.dense.plan.plan_dense`), the zarr ``store`` to write,
    the output ``transform`` (``none``/``softmax``/``sigmoid``: resolve ``auto`` with
    :func:`~znn.pipeline.dense.outputs.resolve_transform`), where blocks run (``scheduler``: ``threads``,
    ``synchronous``, ``local``, an address, or a :class:`~znn.pipeline.run.schedulers.Runner`, which stays open;
    ``num_threads`` for a runner made here), ``progress`` (a bool or a :data:`ProgressFactory`), ``fresh``
    (redo blocks finished earlier with the same model and settings, which are skipped otherwise), ``image`` (the
    outputs' voxel size and provenance; their origin comes from the plan) and ``pyramid`` (downsampled levels to
    make: 0 none, a count, or ``auto``: until a level is small, see :func:`~znn.io.ngff.pyramid_factors`); progress
    goes to ``notes`` (None: stderr)."""

    plan: DensePlan
    store: str | Path
    transform: str = "none"
    scheduler: str | Runner = "threads"
    num_threads: int = 0
    progress: bool | ProgressFactory = True
    fresh: bool = False
    image: ImageMeta = field(default_factory=ImageMeta)
    pyramid: int | str = 0
    notes: TextIO | None = None


@dataclass
class _Context:
    """Everything a block task needs (picklable; shipped once per worker on a cluster)."""

    token: str
    block: BlockPlan
    sources: dict[str, list[Source]]
    input_lo: dict[str, Triple]  # volume position of input patch start for output origin 0
    mirror: bool
    transform: str
    store: str
    outputs: list[str]
    digest: str
    layout: str
    dtype: str


_ENGINES: dict[str, Any] = {}
_ENGINES_LOCK = threading.Lock()


def _engine(ctx: _Context) -> Any:
    with _ENGINES_LOCK:
        engine = _ENGINES.get(ctx.token)
        if engine is None:
            _ENGINES.clear()  # one network at a time per process: free the previous one's spectra
            engine = ctx.block.make_evaluator()
            _ENGINES[ctx.token] = engine
    engine.warm()
    return engine


def run_block(ctx: _Context, index: Index, origin: Triple, lo: Triple, hi: Triple) -> dict[str, Any]:
    """The task of one block: read, forward, transform, write its chunk, mark done. Returns small statistics."""
    started, t0 = time.time(), time.perf_counter()
    engine = _engine(ctx)
    dtype = np.dtype(ctx.dtype)
    inputs = {}
    for node, srcs in ctx.sources.items():
        patch = engine.input_patch[node]
        start = tuple(o + s for o, s in zip(origin, ctx.input_lo[node]))
        parts = [read_region(s, start, patch, ctx.mirror, dtype) for s in srcs]
        inputs[node] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    t1 = time.perf_counter()
    outs = engine.forward(inputs)
    t2 = time.perf_counter()
    cut = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin))
    region = (slice(None), *(slice(a, b) for a, b in zip(lo, hi)))
    for node in ctx.outputs:
        write_region(ctx.store, node, region, apply_transform(outs[node], ctx.transform)[(slice(None), *cut)])
    Manifest(ctx.store, ctx.digest, ctx.layout).mark_done(index)
    wisdom.save_cache()  # this process's new FFT plans, for later runs (a no-op once nothing new is planned)
    t3 = time.perf_counter()
    return {"index": index, "voxels": int(np.prod([b - a for a, b in zip(lo, hi)])), "read_s": t1 - t0,
            "forward_s": t2 - t1, "write_s": t3 - t2, "started": started, "finished": started + (t3 - t0),
            "pid": os.getpid()}


# ---------------------------------------------------------------------------------------------------- the run
@dataclass
class InferenceResult:
    """What :func:`infer_volume` did: where the output is and how many blocks it ran or skipped."""

    store: Path
    arrays: dict[str, str]
    out_shape: Triple
    outsz: Triple
    blocks_total: int
    blocks_skipped: int
    blocks_run: int
    seconds: float
    voxels_run: int
    transform: str
    spectra_cache: bool
    modes: Any
    stats: list[dict[str, Any]] = field(default_factory=list)
    pyramid: dict[str, list[str]] = field(default_factory=dict)  # output node -> volume paths of levels 1, 2, ...

    @property
    def voxels_per_second(self) -> float:
        return self.voxels_run / self.seconds if self.seconds > 0 else 0.0


def _model_settings(net: Network, sources: Mapping[str, list[Source]], mirror: bool, transform: str,
                    dtype: str) -> dict[str, Any]:
    spec = net.spec
    structure = {
        "nodes": {n: [g.type, g.size, g.function, list(g.function_args), g.dense] for n, g in spec.nodes.items()},
        "edges": {e: [g.type, g.input, g.output, list(g.size), list(g.stride), list(g.offset), g.ratio]
                  for e, g in spec.edges.items()},
    }
    inputs = {n: [{"path": str(Path(s.path).resolve()) if "://" not in s.path else s.path, "shape": list(s.shape),
                   "offset": s.norm.offset, "divisor": s.norm.divisor, "shift": s.norm.shift} for s in srcs]
              for n, srcs in sources.items()}
    return {"weights": weights_digest(net.kernels, net.biases), "structure": structure, "inputs": inputs,
            "mirror": mirror, "transform": transform, "dtype": dtype}


def _prepare_store(store: Path, layouts: Mapping[str, ArrayLayout], dtype: str, manifest: Manifest,
                   meta: ImageMeta) -> dict[str, str]:
    """The output images (level-0 chunks = output blocks), created unless the store already holds them with this
    layout (then only their metadata is rewritten, and the pyramid of an earlier run dropped); creating them forgets
    every finished block first, so no marker outlives its chunk."""
    clear_partial(store)  # temporary files of writers killed mid-write in an earlier run
    if manifest.layout_matches() and arrays_match(store, layouts):
        update_metadata(store, list(layouts), meta)
        return {n: f"{store}/{n}" for n in layouts}
    manifest.reset()
    return create_arrays(store, layouts, dtype, meta)


@dataclass
class _Prepared:
    """A run ready to go: the block tasks' context, the output arrays and the blocks left to run."""

    ctx: _Context
    arrays: dict[str, str]
    todo: list[OutputBlock]


def _prepare(request: DenseRequest) -> _Prepared:
    """Preprocessing statistics, the run's digests, the output store and manifest, the blocks left to run."""
    plan, store = request.plan, Path(request.store)
    net, outsz = plan.net, plan.outsz
    sources = {n: open_sources(fs) for n, fs in plan.files.items()}
    dtype = np.dtype(net.dtype).name
    settings = _model_settings(net, sources, plan.mirror, request.transform, dtype)
    digest = digest_of(settings)
    outputs = {n: net.spec.nodes[n].size for n in net.spec.outputs}
    layout = digest_of({"outputs": outputs, "shape": plan.out_shape, "patch": outsz, "dtype": dtype,
                        "format": "ome-zarr 0.5"})
    manifest = Manifest(store, digest, layout)
    if request.fresh:
        manifest.reset()
    layouts = {n: ArrayLayout((maps, *plan.out_shape), (maps, *outsz)) for n, maps in outputs.items()}
    arrays = _prepare_store(store, layouts, dtype, manifest, replace(request.image, origin=plan.origin))
    manifest.begin({"out_shape": plan.out_shape, "outsz": outsz, "mirror": plan.mirror,
                    "transform": request.transform, "weights": settings["weights"],
                    "inputs": {n: [s.path for s in v] for n, v in sources.items()}})
    done = manifest.done_blocks()
    todo = [b for b in plan.grid if b[0] not in done]
    block = plan.block
    token = digest_of({"digest": digest, "outsz": outsz, "modes": block.modes, "cache": block.spectra_cache,
                       "ev": block.evaluator})
    # absolute paths: a worker on another machine (with a shared file system) may run in another directory
    ctx = _Context(token, block, _absolute(sources), plan.input_offsets, plan.mirror, request.transform,
                   str(store.absolute()), list(outputs), digest, layout, dtype)
    return _Prepared(ctx, arrays, todo)


def _reporter(request: DenseRequest, runner: Runner, skipped: int) -> Reporter:
    """The progress reporter of a run (announcing the dashboard of a cluster it did not start itself)."""
    from znn.pipeline.run.progress import Progress

    total, progress = len(request.plan.grid), request.progress
    if callable(progress) and not isinstance(progress, bool):
        reporter = progress(total, skipped)
    else:
        name = Path(request.store).name
        reporter = Progress(total, "blocks", f"forward {name}", request.notes, initial=skipped,
                            enabled=bool(progress))
    if progress is not False and runner.distributed and runner.dashboard and not runner.started_cluster:
        print(f"dask dashboard: {runner.dashboard}", file=getattr(reporter, "stream", None) or sys.stderr, flush=True)
    return reporter


def infer_volume(request: DenseRequest) -> InferenceResult:
    """Run ``request.plan`` densely over its input volumes and write its outputs into the zarr ``request.store``.

    ``block_threads`` threads of the plan work on each block (FFTs, products, BLAS), and ``threads /
    block_threads`` blocks run at once: more threads per block for networks whose blocks are too big to have one
    per thread in memory. Blocks are a graph whose tasks return only statistics, so at most one block per
    ``block_threads`` worker threads is in memory."""
    if request.transform not in OUTPUT_TRANSFORMS:
        raise ConfigError(f"transform {request.transform!r} must be none, softmax or sigmoid here (resolve auto "
                          "first)")
    store = check_output_store(request.store)
    # one run per store: a second run (e.g. with --fresh) would reset the manifest and arrays under the first
    with RunLock(lock_beside(store), f"output store {store}"):
        return _infer_locked(request)


def _infer_locked(request: DenseRequest) -> InferenceResult:
    """:func:`infer_volume` once the store is checked and locked."""
    plan = request.plan
    prepared = _prepare(request)
    todo, skipped = prepared.todo, len(plan.grid) - len(prepared.todo)
    log.info("%s: %d blocks of %s, %d already done (skipped), %d to run", request.store, len(plan.grid),
             plan.outsz, skipped, len(todo))
    scheduler = request.scheduler
    runner = scheduler if isinstance(scheduler, Runner) else make_runner(scheduler, request.num_threads)
    stats: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        _run_blocks(prepared.ctx, todo, runner, _reporter(request, runner, skipped), stats)
        seconds = time.perf_counter() - t0  # the blocks' time: the pyramid is not inference
        pyramid = _pyramid(request, prepared.ctx, runner)
    finally:
        if not isinstance(scheduler, Runner):
            runner.close()
    voxels = sum(int(np.prod([b - a for a, b in zip(lo, hi)])) for _, _, lo, hi in todo)
    return InferenceResult(Path(request.store), prepared.arrays, plan.out_shape, plan.outsz, len(plan.grid),
                           skipped, len(todo), seconds, voxels, request.transform, plan.block.spectra_cache,
                           plan.block.modes, stats, pyramid)


def _run_blocks(ctx: _Context, todo: list[OutputBlock], runner: Runner, reporter: Reporter,
                stats: list[dict[str, Any]]) -> None:
    """Run the blocks ``todo`` on ``runner``, collecting each block's statistics into ``stats`` as it finishes."""

    def report(key: Any, result: dict[str, Any]) -> None:
        stats.append(result)
        reporter.update(1, voxels=result["voxels"])

    try:
        if todo:
            dsk, keys = _block_graph(ctx, todo)
            runner.run(dsk, keys, report, threads_per_task=ctx.block.block_threads)
    finally:
        reporter.close()


def _pyramid(request: DenseRequest, ctx: _Context, runner: Runner) -> dict[str, list[str]]:
    """The downsampled levels of every output (``request.pyramid``), made once every block is written: one task
    per chunk of a level, on ``runner``, each level from the one below."""
    if not request.pyramid:
        return {}
    levels = None if request.pyramid == "auto" else int(request.pyramid)

    def run(dsk: dict[Any, Any], keys: list[Any]) -> None:
        runner.run(dsk, keys, lambda key, value: None)

    made = {node: write_pyramid(ctx.store, node, levels, run=run) for node in ctx.outputs}
    log.info("%s: pyramid of %d level(s) beyond full resolution", request.store, len(next(iter(made.values()))))
    return made


def _block_graph(ctx: _Context, todo: list[OutputBlock]) -> tuple[dict[Any, Any], list[Any]]:
    """One task per block, all sharing one context entry (shipped once per worker on a cluster)."""
    name = "forward-block-" + ctx.token
    ctx_key = "forward-context-" + ctx.token
    dsk: dict[Any, Any] = {ctx_key: ctx}
    keys = []
    for index, origin, lo, hi in todo:
        key = (name, *index)
        dsk[key] = (run_block, ctx_key, index, origin, lo, hi)
        keys.append(key)
    return dsk, keys


def _absolute(sources: Mapping[str, list[Source]]) -> dict[str, list[Source]]:
    """``sources`` with the file of every volume path made absolute (URLs stay as they are)."""
    from znn.io.volume import parse_volume_path

    def absolute(path: str) -> str:
        if "://" in path:
            return path
        vp = parse_volume_path(path)
        return str(replace(vp, file=vp.file.absolute()))

    return {n: [replace(s, path=absolute(s.path)) for s in srcs] for n, srcs in sources.items()}
