"""`znn segment PRED OUT`: a boundary or affinity map segmented blockwise into a uint64 zarr label volume.

PRED is any volume path (tif, h5[:/dataset], zarr[/array], with an optional z range), as `znn forward` writes it:
a boundary map ``(Z, Y, X)``, ``(1, Z, Y, X)`` or ZNN's two-channel ``(2, Z, Y, X)`` (channel 1 = boundary), or an
affinity map ``(3, Z, Y, X)``. OUT is a zarr store (``seg.zarr``) or a group in one (``seg.zarr/name``): an
OME-Zarr image holding its label image at ``labels/segmentation``, where NGFF readers look for labels (any reader
opens ``seg.zarr``, ``seg.zarr/labels`` or ``seg.zarr/labels/segmentation`` alike). The method is
:mod:`znn.ops.segment`'s; the blockwise run :mod:`znn.pipeline.segment.volume`'s (resumable: a rerun skips finished
blocks); ``pyramid`` adds downsampled levels (most frequent id of each window).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from znn.errors import ConfigError, OutputError, VolumeError
from znn.io.paths import check_apart
from znn.io.stores import check_output_store
from znn.io.volume import parse_volume_path
from znn.ops.segment import Method
from znn.pipeline.run.schedulers import Runner, resolve_scheduler
from znn.pipeline.segment.volume import SegmentRequest, SegmentResult, prediction_shape, segment_volume
from znn.types import Triple

__all__ = ["SegmentJob", "segment_job", "output_place", "DEFAULT_BLOCK", "DEFAULT_HALO"]

DEFAULT_BLOCK: Triple = (32, 256, 256)
DEFAULT_HALO: Triple = (8, 32, 32)  # along z only when z-slices are not segmented one by one


@dataclass(frozen=True)
class SegmentJob:
    """What `znn segment` (and a workflow's ``segment`` step) does: the options of both, defined once."""

    pred: str
    out: str
    method: Method = field(default_factory=Method)
    block: Triple = DEFAULT_BLOCK
    halo: Triple = DEFAULT_HALO
    scheduler: str | Runner | None = None
    num_threads: int = 0
    fresh: bool = False
    progress: bool = True
    pyramid: int | str = 0
    notes: TextIO | None = None  # where progress and notes go (None: stderr)
    choose_on: str | None = None  # labels to choose the thresholds on (see znn.pipeline.jobs.choose)
    choose_pred: str | None = None  # the part of the prediction those labels cover (None: all of pred)


def output_place(out: str) -> tuple[Path, str]:
    """The zarr store and group (``""``: the store itself) of the output path ``out``; OutputError unless it names a
    zarr store."""
    try:
        vp = parse_volume_path(out)
    except VolumeError:
        vp = None
    if vp is None or vp.format != "zarr" or vp.zrange is not None:
        raise OutputError(f"OUT {out}: a segmentation is written as a zarr label volume; name a store such as "
                          "seg.zarr (the labels go to seg.zarr/labels/segmentation) or a group in one, seg.zarr/name")
    return vp.file, vp.key or ""


def segment_job(job: SegmentJob) -> SegmentResult:
    """Check the places and the prediction before any work, then segment blockwise."""
    if job.choose_pred is not None and job.choose_on is None:
        raise ConfigError(f"--choose-pred {job.choose_pred}: the part of the prediction to choose the thresholds on "
                          "needs its labels; add --choose-on LABELS")
    store, name = output_place(job.out)
    fix = "name another OUT"
    check_apart([("OUT", store)], [("PRED", job.pred)], fix)
    check_output_store(store, "OUT", fix)
    prediction_shape(job.pred, job.method)  # the prediction's dtype and channels, before the store is touched
    method = job.method if job.choose_on is None else _chosen(job)
    scheduler = job.scheduler if isinstance(job.scheduler, Runner) else resolve_scheduler(job.scheduler)
    return segment_volume(SegmentRequest(job.pred, store, method, job.block, job.halo, name, scheduler,
                                         job.num_threads, job.fresh, job.progress, job.pyramid, job.notes))


def _chosen(job: SegmentJob) -> Method:
    """The job's method with the seed and merge thresholds that segment
    ``choose_pred`` best against ``choose_on``; the table of every candidate's scores goes to the notes (it is a
    result: also under --quiet)."""
    from znn.pipeline.jobs.choose import choose_seed_threshold

    assert job.choose_on is not None
    choice = choose_seed_threshold(job.method, job.choose_pred or job.pred, job.choose_on)
    print(choice.text(), file=job.notes or sys.stderr, flush=True)
    return choice.method
