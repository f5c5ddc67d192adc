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
3. applies the output transform (softmax or sigmoid over channels) and writes its region into the zarr output,
   whose chunks are the output blocks (no two tasks write one chunk), then marks the block done in the manifest
   (:mod:`znn.pipeline.dense.manifest`). Chunks are written atomically (:class:`~znn.io.atomic_store.AtomicLocalStore`:
   a temporary file renamed into place), so a worker killed mid-write never leaves a half-written chunk.

On a dask.distributed cluster, blocks lost with a dead worker (running, or finished but not yet collected) are
recomputed on the remaining workers by the scheduler; rewriting a block gives the same bytes, and its marker is
written after its chunk, so the output and the manifest stay right whatever dies when.

Blocks are a dask graph whose tasks return only small statistics, so at most one block per worker thread is in
memory: memory is bounded by the block size times the blocks in flight, never by the volume.

Output layout (``<prefix>`` is the job's ``output_prefix``)::

    <prefix>_sample<id>_output.zarr/<node>     float32 (maps, z, y, x), one array per network output node group
    <prefix>_sample<id>_output.zarr/znn-manifest/{run.json, done/<i>_<j>_<k>}
    <prefix>_sample<id>_output.h5:/<node>      with output_format = h5 (copied from the zarr at the end)
    <prefix>_sample<id>_output.tif             with output_format = tif (``..._output_<node>.tif`` for several)
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
from dask.callbacks import Callback

from znn.errors import ConfigError, ShapeError, ZnnFileNotFoundError
from znn.network import Network
from znn.ops.transform import OUTPUT_TRANSFORMS, apply_transform
from znn.pipeline.dense.grid import block_grid, input_offsets, output_shape
from znn.pipeline.dense.inputs import InputFile, Source, open_sources, read_region
from znn.pipeline.dense.manifest import Manifest, digest_of, weights_digest
from znn.pipeline.forward.evaluators import EVALUATORS
from znn.pipeline.run.schedulers import single_threaded_kernels
from znn.types import Index, Triple

log = logging.getLogger("znn.forward")


@dataclass
class _Context:
    """Everything a block task needs (picklable; shipped once per worker on a cluster)."""

    token: str
    net: Network
    outsz: Triple
    modes: Any
    spectra_cache: bool
    cache_bytes: int | None
    sources: dict[str, list[Source]]
    input_lo: dict[str, Triple]  # volume position of input patch start for output origin 0
    mirror: bool
    transform: str
    store: str
    outputs: list[str]
    out_shape: Triple
    digest: str
    layout: str
    dtype: str
    evaluator: str = "phases"
    block_threads: int = 1


_ENGINES: dict[str, Any] = {}
_ENGINES_LOCK = threading.Lock()


def _engine(ctx: _Context) -> Any:
    with _ENGINES_LOCK:
        engine = _ENGINES.get(ctx.token)
        if engine is None:
            _ENGINES.clear()  # one network at a time per process: free the previous one's spectra
            engine = EVALUATORS[ctx.evaluator](ctx.net, ctx.outsz, ctx.modes, ctx.spectra_cache, ctx.cache_bytes,
                                               ctx.block_threads)
            _ENGINES[ctx.token] = engine
    engine.warm()
    return engine


_ARRAYS: dict[tuple[str, str], Any] = {}
_ARRAYS_LOCK = threading.Lock()


def _out_array(store: str, node: str) -> Any:
    import zarr

    from znn.io.atomic_store import AtomicLocalStore

    key = (store, node)
    with _ARRAYS_LOCK:
        if key not in _ARRAYS:
            _ARRAYS[key] = zarr.open_array(AtomicLocalStore(store), path=node, mode="r+")
        return _ARRAYS[key]


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
    for node in ctx.outputs:
        y = apply_transform(outs[node], ctx.transform)
        region = (slice(None), *(slice(a, b) for a, b in zip(lo, hi)))
        _out_array(ctx.store, node)[region] = np.ascontiguousarray(y[(slice(None), *cut)])
    Manifest(ctx.store, ctx.digest, ctx.layout).mark_done(index)
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

    @property
    def voxels_per_second(self) -> float:
        return self.voxels_run / self.seconds if self.seconds > 0 else 0.0





class _Progress(Callback):  # type: ignore[misc]
    def __init__(self, report: Callable[[dict[str, Any]], None]):
        super().__init__()
        self.report = report

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:  # noqa: A002
        if isinstance(result, dict) and "voxels" in result:
            self.report(result)


def _model_settings(net: Network, sources: Mapping[str, list[Source]], mirror: bool, transform: str,
                    dtype: str) -> dict[str, Any]:
    spec = net.spec
    structure = {
        "nodes": {n: [g.type, g.size, g.function, list(g.function_args), g.dense] for n, g in spec.nodes.items()},
        "edges": {e: [g.type, g.input, g.output, list(g.size), list(g.stride), list(g.offset), g.ratio]
                  for e, g in spec.edges.items()},
    }
    inputs = {n: [{"path": str(Path(s.path).resolve()) if "://" not in s.path else s.path, "shape": list(s.shape),
                   "offset": s.offset, "scale": s.scale} for s in srcs] for n, srcs in sources.items()}
    return {"weights": weights_digest(net.kernels, net.biases), "structure": structure, "inputs": inputs,
            "mirror": mirror, "transform": transform, "dtype": dtype}


def _prepare_store(store: Path, outputs: Mapping[str, int], out_shape: Triple, outsz: Triple, dtype: str,
                   manifest: Manifest) -> dict[str, str]:
    """Create the output arrays (chunks = output blocks) unless the store already holds them with this layout."""
    import zarr
    from zarr.storage import LocalStore

    from znn.io.atomic_store import AtomicLocalStore, clear_partial

    clear_partial(store)  # temporary files of writers killed mid-write in an earlier run
    arrays = {n: f"{store}/{n}" for n in outputs}
    fresh = not manifest.layout_matches()
    if not fresh:
        try:
            for n, maps in outputs.items():
                z = zarr.open_array(LocalStore(store), path=n, mode="r")
                if tuple(z.shape) != (maps, *out_shape) or tuple(z.chunks) != (maps, *outsz):
                    fresh = True
        except Exception:  # noqa: BLE001 - any unreadable array means: start over
            fresh = True
    if fresh:
        manifest.reset()
        root = zarr.open_group(AtomicLocalStore(store), mode="a")
        for n, maps in outputs.items():
            root.create_array(n, shape=(maps, *out_shape), chunks=(maps, *outsz), dtype=dtype, fill_value=0,
                              overwrite=True)
    return arrays


def infer_volume(net: Network, inputs: Mapping[str, Sequence[InputFile | str]], store: str | Path,
                 outsz: Sequence[int], *, mirror: bool = True, modes: str | Mapping[str, str] = "fft",
                 transform: str = "none", scheduler: Any = "threads", num_threads: int = 0,
                 spectra_cache: bool = True, cache_bytes: int | None = None,
                 progress: bool | Any = True, fresh: bool = False, evaluator: str = "phases",
                 block_threads: int = 1) -> InferenceResult:
    """Run ``net`` densely over the input volumes and write its outputs into the zarr ``store``.

    ``inputs`` maps each network input node to its files (one per channel group, in order). ``outsz`` is the output
    block (clipped to the output volume). ``transform`` is ``none``/``softmax``/``sigmoid`` (resolve ``auto`` with
    :func:`resolve_transform`). ``scheduler`` is ``threads``, ``synchronous``, ``local``, an address or a
    :class:`~znn.pipeline.run.schedulers.Runner`. Blocks finished earlier with the same model and settings are skipped
    (``fresh=True`` redoes everything). ``progress`` is a bool or a :class:`~znn.pipeline.run.progress.Progress`-like
    factory ``(total, initial) -> reporter``. ``evaluator``: ``phases`` (:class:`PhaseForward`, the fast
    inference path) or ``graph`` (:class:`BlockForward`, the training engine's forward graph). ``block_threads``
    threads work on each block (FFTs, products, BLAS), and ``threads / block_threads`` blocks run at once: more
    threads per block for networks whose blocks are too big to have one per thread in memory.
    """
    from znn.pipeline.run.progress import Progress
    from znn.pipeline.run.schedulers import Runner, make_runner

    net = net.sliding_window()  # every output voxel is the network applied to its own window
    spec = net.spec
    if transform not in OUTPUT_TRANSFORMS:
        raise ConfigError(f"transform {transform!r} must be none, softmax or sigmoid here (resolve auto first)")
    missing = [n for n in spec.inputs if n not in inputs]
    if missing:
        raise ConfigError(f"no input volume for network input(s) {', '.join(missing)}; the network's inputs are "
                          f"{', '.join(spec.inputs)} (give input1, input2, ... in the sample's [sampleN] section)")
    files = {n: [f if isinstance(f, InputFile) else InputFile(str(f)) for f in inputs[n]] for n in spec.inputs}
    for n, fs in files.items():
        for f in fs:
            from znn.io.volume import parse_volume_path

            if not parse_volume_path(f.path).file.exists():
                raise ZnnFileNotFoundError(f"{f.path}: input volume for network input {n!r} not found")
    sources = {n: open_sources(fs) for n, fs in files.items()}
    for n, srcs in sources.items():
        maps = sum(s.shape[0] for s in srcs)
        if maps != spec.nodes[n].size:
            raise ShapeError(f"network input {n!r} takes {spec.nodes[n].size} map(s) but its volume(s) "
                             f"{', '.join(s.path for s in srcs)} have {maps} channel(s)")
    shapes = {s.shape[1:] for srcs in sources.values() for s in srcs}
    if len(shapes) != 1:
        raise ShapeError(f"input volumes differ in size ({sorted(shapes)}); every input of a sample must have the "
                         "same z,y,x size (crop them, or use is_auto_crop)")
    volume = shapes.pop()
    offsets, fov = input_offsets(spec, mirror)
    out_shape = output_shape(volume, fov, mirror)
    if min(out_shape) < 1:
        first = next(iter(sources.values()))[0].path
        raise ShapeError(f"{first}: volume {volume} is smaller than the network's field of view {fov}; with "
                         "is_bd_mirror = no the output would be empty. Set is_bd_mirror = yes, or use a larger volume")
    patch: Triple = tuple(min(int(p), o) for p, o in zip(outsz, out_shape))  # type: ignore[assignment]
    dtype = np.dtype(net.dtype).name
    settings = _model_settings(net, sources, mirror, transform, dtype)
    digest = digest_of(settings)
    outputs = {n: spec.nodes[n].size for n in spec.outputs}
    layout = digest_of({"outputs": outputs, "shape": out_shape, "patch": patch, "dtype": dtype})
    store = Path(store)
    manifest = Manifest(store, digest, layout)
    if fresh:
        manifest.reset()
    arrays = _prepare_store(store, outputs, out_shape, patch, dtype, manifest)
    manifest.begin({"out_shape": out_shape, "outsz": patch, "mirror": mirror, "transform": transform,
                    "weights": settings["weights"], "inputs": {n: [s.path for s in v] for n, v in sources.items()}})
    grid = block_grid(out_shape, patch)
    done = manifest.done_blocks()
    todo = [b for b in grid if b[0] not in done]
    skipped = len(grid) - len(todo)
    log.info("%s: %d blocks of %s, %d already done (skipped), %d to run", store, len(grid), patch, skipped, len(todo))
    if evaluator not in EVALUATORS:
        raise ConfigError(f"evaluator {evaluator!r} is not known; use {' or '.join(EVALUATORS)}")
    token = digest_of({"digest": digest, "outsz": patch, "modes": modes, "cache": spectra_cache, "ev": evaluator})
    # absolute paths: a worker on another machine (with a shared file system) may run in another directory
    ctx = _Context(token, net, patch, modes, spectra_cache, cache_bytes, _absolute(sources), offsets, mirror,
                   transform, str(store.absolute()), list(outputs), out_shape, digest, layout, dtype, evaluator,
                   max(1, block_threads))
    runner = scheduler if isinstance(scheduler, Runner) else make_runner(scheduler, num_threads)
    voxels_todo = sum(int(np.prod([b - a for a, b in zip(lo, hi)])) for _, _, lo, hi in todo)
    if callable(progress) and not isinstance(progress, bool):
        reporter = progress(len(grid), skipped)
    else:
        reporter = Progress(len(grid), "blocks", f"forward {store.name}", initial=skipped, enabled=bool(progress))
    if progress is not False and runner.distributed and runner.dashboard and not runner.started_cluster:
        print(f"dask dashboard: {runner.dashboard}", file=getattr(reporter, "stream", None) or sys.stderr, flush=True)
    stats: list[dict[str, Any]] = []
    lock = threading.Lock()

    def report(result: dict[str, Any]) -> None:
        with lock:
            stats.append(result)
        reporter.update(1, voxels=result["voxels"])

    name = "forward-block-" + token
    ctx_key = "forward-context-" + token
    dsk: dict[Any, Any] = {ctx_key: ctx}
    keys = []
    for index, origin, lo, hi in todo:
        key = (name, *index)
        dsk[key] = (run_block, ctx_key, index, origin, lo, hi)
        keys.append(key)
    t0 = time.perf_counter()
    try:
        if keys:
            _run_blocks(runner, dsk, keys, report, max(1, block_threads))
    finally:
        reporter.close()
        if not isinstance(scheduler, Runner):
            runner.close()
    seconds = time.perf_counter() - t0
    return InferenceResult(store, arrays, out_shape, patch, len(grid), skipped, len(todo), seconds, voxels_todo,
                           transform, spectra_cache, modes, stats)


def _absolute(sources: Mapping[str, list[Source]]) -> dict[str, list[Source]]:
    """``sources`` with the file of every volume path made absolute (URLs stay as they are)."""
    from dataclasses import replace

    from znn.io.volume import parse_volume_path

    def absolute(path: str) -> str:
        if "://" in path:
            return path
        vp = parse_volume_path(path)
        return str(replace(vp, file=vp.file.absolute()))

    return {n: [replace(s, path=absolute(s.path)) for s in srcs] for n, srcs in sources.items()}


def _run_blocks(runner: Any, dsk: dict[Any, Any], keys: list[Any], report: Callable[[dict[str, Any]], None],
                block_threads: int) -> None:
    """Run the block graph: at most one block per ``block_threads`` worker threads at a time (a block task returns
    only statistics, so nothing else accumulates)."""
    if runner.distributed:
        from distributed import as_completed

        # Each result is released once collected: the scheduler then forgets it, so a worker dying later costs
        # only its running block (recomputed on another worker), not blocks already reported.
        pending = as_completed(runner.client.get(dsk, keys, sync=False, workers=runner.only_workers))
        for future in pending:
            result = future.result()
            future.release()
            report(result)
        return
    # BLAS single-threaded for the whole run (threadpoolctl is process-wide): a block's threads are the evaluator's
    # own, splitting its transforms, products and direct-convolution tiles. OpenBLAS's threads, called from the
    # scheduler's threads, spin: n337's 32^3 blocks on two threads took 17.5 s with them against 12 s without.
    with single_threaded_kernels(), _Progress(report):
        if runner.kind == "synchronous":
            dask.get(dsk, keys)
        else:
            dask.threaded.get(dsk, keys, num_workers=max(1, runner.workers // block_threads))
