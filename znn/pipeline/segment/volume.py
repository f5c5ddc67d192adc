"""Blockwise segmentation of a boundary or affinity map into a uint64 zarr label volume: out of core, resumable.

Three passes, each a dask graph run on a :class:`~znn.pipeline.run.schedulers.Runner` (synchronous, threads or a
dask.distributed cluster, as dense inference):

1. *blocks* (:func:`segment_block`): each block reads its extent (core and halo) of the prediction, segments it
   with :func:`znn.ops.segment.segment` (segments touching a face cut from the volume are never dropped as small),
   offsets its ids by the block's position so that they are unique over the volume, writes its core (one chunk of
   the label volume), keeps its ids in the slab of each matched face beside the store, and marks itself done;
2. *faces* (:func:`match_face`): for each face, the two blocks' ids in its slab are paired where each holds the
   majority of the other's voxels (:func:`znn.ops.segment.face_pairs`); the pairs of every face are joined into
   objects on the driver (:func:`znn.ops.segment.join_pairs`: each id's object is named by its smallest id);
3. *relabel* (:func:`relabel_block`): each chunk's ids are replaced by their object's, and the block marked done.

The store: the label image at ``labels/segmentation`` of the output group (the store itself, or ``store/name``),
the group an OME-Zarr image whose levels are the label image's (:func:`znn.io.stores.create_label_array`), as NGFF
readers look for labels; on request its pyramid (``pyramid``: most frequent id of each window), made last. Nothing
but zarr nodes is left in the store: the resume state lives beside it, in ``<store>.resume/`` (a zarr reader walking
the store meets no folder it does not know).

Resume: the resume manifest of dense inference (:class:`~znn.pipeline.dense.manifest.Manifest`, in the resume
folder) records finished blocks of pass 1 as ``0_<z>_<y>_<x>`` and of pass 3 as ``1_<z>_<y>_<x>``, under a digest
of the prediction (its path, shape and modification stamps, and the run record of the forward run that wrote it), of
the method and of the segmentation code; a marker is written after the chunk and slab it records. A rerun redoes
the unfinished blocks of pass 1, recomputes pass 2 from the kept slabs (cheap, and the same), and relabels the
unfinished chunks of pass 3 (and those of blocks it segmented again); relabelling a chunk twice changes nothing, so
a run killed between writing a chunk and its marker is safe. One run per store (:class:`~znn.io.locks.RunLock`). A
store of the older layout (``labels`` the label image itself, the manifest inside the store) is rewritten in the
new one.

When the result equals the segmentation of the whole volume in one piece (up to a renaming of ids): when for every
block, each segment that reaches its core or the slabs of its faces is decided inside its extent as it is in the
whole volume: its seeds, its basin and its competitors' basins, the small segments given to it and, when
fragments are agglomerated, every region it merges with, lie within the core plus the halo less the slab (at most 4
voxels) and the smoothing reach (4 sigma), and no two voxels that compete in the flood have equal heights (ties are
broken by the order of the flood, which differs between a block and the whole). Objects larger than the halo are
still joined across faces where the two blocks agree on them (a mutual majority in the slab); where one block saw an
object merged with a neighbour, the two stay apart there, and boundaries between objects may differ near a face from
a whole-volume run.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from znn.errors import NonFiniteError, ShapeError, VolumeError
from znn.io.locks import RunLock, lock_beside
from znn.io.ngff import ImageMeta, provenance
from znn.io.stores import (
    ArrayLayout,
    arrays_match,
    check_output_store,
    clear_partial,
    create_label_array,
    drop_label_pyramid,
    label_image_path,
    read_region,
    read_side_arrays,
    write_label_pyramid,
    write_region,
    write_side_arrays,
)
from znn.io.volume import open_volume, parse_volume_path, volume_origin, volume_resolution, volume_shape_dtype
from znn.ops.segment import Method, face_pairs, join_pairs, offset_ids, relabel, segment
from znn.pipeline.dense.manifest import MANIFEST_DIR, Manifest, digest_of
from znn.pipeline.run.schedulers import Runner, make_runner
from znn.pipeline.segment.geometry import BlockBox, Box, Face, SegmentGrid
from znn.types import Index, Triple

__all__ = ["SegmentRequest", "SegmentResult", "segment_volume", "prediction_shape", "resume_folder"]

log = logging.getLogger("znn.segment")

SLABS = f"{MANIFEST_DIR}/slabs"
SEGMENTED, RELABELLED = 0, 1  # the pass a manifest marker records (its first number)


@dataclass
class SegmentRequest:
    """A blockwise segmentation: ``pred`` (any volume path) segmented by ``method`` into the group ``name`` of the
    zarr ``store`` (``""``: the store itself; module notes) in blocks of ``block`` with ``halo`` (both ``z, y, x``),
    on ``scheduler`` (a name, an address or a :class:`Runner`, which stays open; ``num_threads`` for one made here);
    ``fresh`` redoes finished blocks; ``pyramid``: downsampled levels to make (0 none, a count, or ``auto``: until a
    level is small, :func:`~znn.io.ngff.pyramid_factors`); ``progress``: lines (or a bar) on ``notes``."""

    pred: str
    store: str | Path
    method: Method
    block: Triple
    halo: Triple
    name: str = ""
    scheduler: str | Runner = "threads"
    num_threads: int = 0
    fresh: bool = False
    progress: bool = True
    pyramid: int | str = 0
    notes: TextIO | None = None


@dataclass
class SegmentResult:
    """What :func:`segment_volume` did."""

    store: Path
    array: str  # the label image's volume path
    shape: Triple
    blocks_total: int
    blocks_skipped: int
    blocks_run: int
    faces: int
    joined: int  # ids renamed to another block's id by the face matching
    seconds: float
    stats: list[dict[str, Any]] = field(default_factory=list)
    pyramid: list[str] = field(default_factory=list)  # volume paths of levels 1, 2, ...


@dataclass(frozen=True)
class _Context:
    """What every task needs (picklable; shipped once per worker)."""

    pred: str
    channels: int
    method: Method
    grid: SegmentGrid
    store: str
    name: str  # the label image's path inside the store
    resume: str  # the folder of the manifest and slabs (resume_folder)
    digest: str
    layout: str


def prediction_shape(pred: str, method: Method) -> tuple[int, Triple]:
    """``(channels, (z, y, x))`` of the prediction volume at ``pred``; errors name the file and what is expected."""
    shape, dtype = volume_shape_dtype(pred)
    if dtype.kind != "f":
        raise VolumeError(f"{pred}: holds {dtype} values; a prediction is a float probability map (boundary or "
                          "affinity). To score a segmentation use `znn evaluate SEG LABELS --type segmentation`")
    channels, spatial = _channels_spatial(shape)
    wanted = (1, 2) if method.out_type == "boundary" else (3,)
    if channels not in wanted:
        hint = ("use --type affinity for 3 channels" if channels == 3 else "a boundary map has 1 channel (boundary "
                "probability) or 2 (ZNN binary_class: channel 1 = boundary)") if method.out_type == "boundary" \
            else "an affinity map has 3 channels (z, y, x); use --type boundary for a boundary map"
        raise ShapeError(f"{pred}: shape {shape} has {channels} channel(s), which a {method.out_type} map (--type "
                         f"{method.out_type}) has not; {hint}")
    return channels, spatial


def _channels_spatial(shape: tuple[int, ...]) -> tuple[int, Triple]:
    if len(shape) == 2:
        return 1, (1, shape[0], shape[1])
    if len(shape) == 3:
        return 1, (shape[0], shape[1], shape[2])
    return shape[0], (shape[1], shape[2], shape[3])


# ------------------------------------------------------------------------------------------------ the tasks
_OPENED: dict[str, Any] = {}
_OPENED_LOCK = threading.Lock()


def _read(ctx: _Context, box: Box) -> np.ndarray:
    """The prediction over ``box`` as ``(channels, z, y, x)``; NonFiniteError naming a NaN or infinite voxel."""
    with _OPENED_LOCK:
        if ctx.pred not in _OPENED:
            _OPENED.clear()  # one prediction at a time per process
            _OPENED[ctx.pred] = open_volume(ctx.pred)
        lazy = _OPENED[ctx.pred]
    region = tuple(slice(a, b) for a, b in zip(*box))
    if lazy.ndim == 2:
        region = region[1:]
    values = np.asarray(lazy[(..., *region)].compute(scheduler="sync"))
    values = values.reshape((ctx.channels, *(b - a for a, b in zip(*box))))
    bad = ~np.isfinite(values)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        at = (where[0], *(a + i for a, i in zip(box[0], where[1:])))
        raise NonFiniteError(f"{ctx.pred}: the prediction holds {int(bad.sum())} NaN or infinite value(s) in "
                             f"block {box}, the first at (c, z, y, x) = {at}; check the run that wrote it")
    return values


def _slab_name(index: Index) -> str:
    return f"{SLABS}/{'_'.join(map(str, index))}.npz"


def segment_block(ctx: _Context, block: BlockBox) -> dict[str, Any]:
    """Pass 1 for one block (module notes); returns small statistics."""
    t0 = time.perf_counter()
    pred = _read(ctx, block.extent)
    ids = offset_ids(segment(pred, ctx.method, block.open_faces), ctx.grid.offset(block.index))
    core = tuple(slice(a, b) for a, b in zip(*block.core))
    write_region(ctx.store, ctx.name, core, ids[block.core_in_extent()])
    elo = block.extent[0]
    slabs = {}
    for face in ctx.grid.faces():
        if block.index in (face.low, face.high):
            local = tuple(slice(a - e, b - e) for a, b, e in zip(*face.slab, elo))
            slabs[f"{face.axis}{'+' if block.index == face.low else '-'}"] = ids[local]
    write_side_arrays(ctx.resume, _slab_name(block.index), slabs)
    Manifest(ctx.resume, ctx.digest, ctx.layout).mark_done((SEGMENTED, *block.index))
    return {"index": block.index, "voxels": int(np.prod([b - a for a, b in zip(*block.core)])),
            "segments": int(np.unique(ids[block.core_in_extent()]).size), "seconds": time.perf_counter() - t0,
            "pid": os.getpid()}


def match_face(ctx: _Context, face: Face) -> np.ndarray:
    """Pass 2 for one face: the pairs of ids of its two blocks that are one object."""
    low = read_side_arrays(ctx.resume, _slab_name(face.low))[f"{face.axis}+"]
    high = read_side_arrays(ctx.resume, _slab_name(face.high))[f"{face.axis}-"]
    return face_pairs(low, high)


@dataclass(frozen=True)
class _Table:
    """Every id joined to another block's (sorted) and the id of its object."""

    ids: np.ndarray
    roots: np.ndarray


def relabel_block(ctx: _Context, block: BlockBox, table: _Table) -> dict[str, Any]:
    """Pass 3 for one block: its chunk's ids replaced by their object's (read and written only when some change)."""
    ids, roots = table.ids, table.roots
    first = ctx.grid.offset(block.index)
    lo, hi = np.searchsorted(ids, [first + 1, first + ctx.grid.stride + 1])
    changes = bool(np.any(ids[lo:hi] != roots[lo:hi]))
    if changes:
        core = tuple(slice(a, b) for a, b in zip(*block.core))
        write_region(ctx.store, ctx.name, core, relabel(read_region(ctx.store, ctx.name, core), ids[lo:hi],
                                                        roots[lo:hi]))
    Manifest(ctx.resume, ctx.digest, ctx.layout).mark_done((RELABELLED, *block.index))
    return {"index": block.index, "changed": changes}


# ------------------------------------------------------------------------------------------------- the run
def _stamp(pred: str) -> dict[str, Any]:
    """What identifies the prediction's content cheaply: its file's size and modification times, and for a zarr
    store the array's metadata and the run record and finished-block folder of the `znn forward` that wrote it (a
    resumed or new forward run changes them)."""
    vp = parse_volume_path(pred)
    paths = [vp.file]
    if vp.format == "zarr":
        manifest = vp.file / MANIFEST_DIR
        paths += [vp.file / (vp.key or "") / "zarr.json", manifest / "run.json", manifest / "done"]
    found: dict[str, Any] = {}
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            continue
        found[str(path)] = [stat.st_size if path.is_file() else 0, stat.st_mtime_ns]
    return found


def _code_digest() -> str:
    """A digest of the segmentation code (kernels and this engine): a rerun after an upgrade that changed it redoes
    every block (chunks relabelled by an older face matching cannot be matched again)."""
    import hashlib

    import znn.ops.segment as kernels

    h = hashlib.sha256()
    for path in [Path(kernels.__file__), *sorted(Path(__file__).parent.glob("*.py"))]:
        h.update(path.read_bytes())
    return h.hexdigest()[:20]


def resume_folder(store: str | Path, name: str = "") -> Path:
    """Where a segmentation into group ``name`` of ``store`` keeps its manifest and slabs: ``<store>.resume/<name>``
    beside the store, so that the store holds zarr nodes only."""
    store = Path(store)
    return store.parent / f"{store.name}.resume" / name


def _prepare(request: SegmentRequest, store: Path) -> tuple[_Context, Manifest]:
    """The run's context, its manifest (reset when asked or when the layout changed) and the label array."""
    channels, spatial = prediction_shape(request.pred, request.method)
    grid = SegmentGrid(spatial, request.block, request.halo, request.method.flat)
    pred = _absolute(request.pred)
    settings = {"pred": pred, "stamp": _stamp(pred), "method": asdict(request.method), "halo": grid.halo_used,
                "code": _code_digest()}
    layout = digest_of({"shape": spatial, "block": request.block, "name": request.name, "dtype": "uint64"})
    resume = resume_folder(store, request.name)
    manifest = Manifest(resume, digest_of(settings), layout)
    if request.fresh:
        manifest.reset()
    clear_partial(store)  # temporary files of writers killed mid-write in an earlier run
    clear_partial(resume)
    chunks = tuple(min(b, s) for b, s in zip(request.block, spatial))
    label = label_image_path(request.name)
    if manifest.layout_matches() and arrays_match(store, {label: ArrayLayout(spatial, chunks)}):
        drop_label_pyramid(store, request.name)  # level 0 may change under the levels of an earlier run
    else:
        manifest.reset()
        _forget_older_layout(store)
        create_label_array(store, request.name, spatial, (chunks[0], chunks[1], chunks[2]), _label_meta(request, pred))
    manifest.begin({"pred": request.pred, "method": asdict(request.method), "block": request.block,
                    "halo": grid.halo_used})
    ctx = _Context(pred, channels, request.method, grid, str(store.absolute()), label, str(resume.absolute()),
                   manifest.digest, layout)
    return ctx, manifest


def _forget_older_layout(store: Path) -> None:
    """Remove the manifest an older segmentation kept inside the store (its slabs tell it from dense inference's,
    which a store may hold too): zarr readers walking the store warned about it."""
    if (store / SLABS).is_dir():
        shutil.rmtree(store / MANIFEST_DIR, ignore_errors=True)


def _label_meta(request: SegmentRequest, pred: str) -> ImageMeta:
    """The label image's metadata: the prediction's voxel size and origin (so that viewers overlay the two), and
    what made it (the prediction, the method)."""
    return ImageMeta(volume_resolution(pred), volume_origin(pred), provenance(
        prediction=pred, method=asdict(request.method), block=list(request.block), halo=list(request.halo)))


def _absolute(pred: str) -> str:
    """``pred`` with its file made absolute (a worker may run in another directory)."""
    from dataclasses import replace

    vp = parse_volume_path(pred)
    return str(replace(vp, file=Path(os.path.abspath(vp.file))))


def segment_volume(request: SegmentRequest) -> SegmentResult:
    """Segment ``request.pred`` blockwise into ``request.store`` (module notes); one run per store."""
    store = check_output_store(request.store, "segmentation store")
    with RunLock(lock_beside(store), f"segmentation store {store}"):
        scheduler = request.scheduler
        runner = scheduler if isinstance(scheduler, Runner) else make_runner(scheduler, request.num_threads,
                                                                             _note(request))
        try:
            return _segment_locked(request, store, runner)
        finally:
            if not isinstance(scheduler, Runner):
                runner.close()


def _note(request: SegmentRequest) -> Callable[[str], None]:
    """Where a runner made here says what it started (a local cluster's address): ``notes`` (default stderr), or
    nowhere when no progress is shown (``--quiet``)."""
    def note(text: str) -> None:
        if request.progress:
            print(text, file=request.notes or sys.stderr, flush=True)

    return note


def _segment_locked(request: SegmentRequest, store: Path, runner: Runner) -> SegmentResult:
    t0 = time.perf_counter()
    ctx, manifest = _prepare(request, store)
    blocks, faces = ctx.grid.blocks(), ctx.grid.faces()
    done = manifest.done_blocks()
    todo = [b for b in blocks if (SEGMENTED, *b.index) not in done]
    log.info("%s: %d blocks, %d already segmented, %d faces", store, len(blocks), len(blocks) - len(todo),
             len(faces))
    stats = _run_tasks(runner, ctx, "segment-block", [(segment_block, b) for b in todo], request.progress,
                       len(blocks), request.notes)
    pairs = _run_tasks(runner, ctx, "segment-face", [(match_face, f) for f in faces], False, len(faces))
    ids, roots = join_pairs(np.concatenate([np.zeros((0, 2), np.uint64), *pairs]))
    # a block segmented again holds fragment ids, whatever its relabelling marker says
    redone = {b.index for b in todo}
    left = [b for b in blocks if (RELABELLED, *b.index) not in done or b.index in redone]
    table = _Table(ids, roots)
    _run_tasks(runner, ctx, "segment-relabel", [(relabel_block, b, table) for b in left], False, len(blocks))
    seconds = time.perf_counter() - t0
    levels = _pyramid(request, store, runner)
    clear_partial(store)  # the (empty) folder of temporary chunks: the store keeps zarr nodes only
    return SegmentResult(store, f"{store}/{ctx.name}", ctx.grid.shape, len(blocks), len(blocks) - len(todo),
                         len(todo), len(faces), int(np.count_nonzero(ids != roots)), seconds, stats, levels)


def _pyramid(request: SegmentRequest, store: Path, runner: Runner) -> list[str]:
    """The label image's downsampled levels (``request.pyramid``), one task per chunk of a level on ``runner``."""
    if not request.pyramid:
        return []

    def run(dsk: dict[Any, Any], keys: list[Any]) -> None:
        runner.run(dsk, keys, lambda key, value: None)

    levels = None if request.pyramid == "auto" else int(request.pyramid)
    return write_label_pyramid(store, request.name, levels, run=run)


def _run_tasks(runner: Runner, ctx: _Context, name: str, calls: list[tuple[Any, ...]], progress: bool,
               total: int, notes: TextIO | None = None) -> list[Any]:
    """Run one task per call ``(function, argument, ...)`` (each called as ``function(ctx, argument, ...)``) and
    return their values in order; the context (and a shared third argument) is one graph entry, shipped once."""
    from znn.pipeline.run.progress import Progress

    if not calls:
        return []
    token = digest_of({"ctx": ctx.digest, "layout": ctx.layout, "name": name, "n": len(calls)})
    ctx_key, shared_key = f"{name}-context-{token}", f"{name}-shared-{token}"
    dsk: dict[Any, Any] = {ctx_key: ctx}
    keys = []
    for i, (function, argument, *rest) in enumerate(calls):
        key = (f"{name}-{token}", i)
        if rest:
            dsk.setdefault(shared_key, rest[0])
        dsk[key] = (function, ctx_key, argument, *([shared_key] if rest else []))
        keys.append(key)
    values: dict[Any, Any] = {}
    reporter = Progress(total, "blocks", name, notes, initial=total - len(calls), enabled=progress)

    def report(key: Any, value: Any) -> None:
        values[key] = value
        reporter.update(1, voxels=value.get("voxels", 0) if isinstance(value, dict) else 0)

    try:
        runner.run(dsk, keys, report)
    finally:
        reporter.close()
    return [values[key] for key in keys]
