"""Blockwise segmentation: a volume of many blocks segmented blockwise equals (up to a renaming of ids) the volume
segmented in one piece, on threads and on a dask.distributed cluster; a killed run resumes with only its unfinished
blocks; reruns skip, changes redo; a user's mistake is one line and exit status 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.ops.test_segment import affinity_map, boundary_map, cells
from tests.shared import ROOT
from znn.cli import main
from znn.io.volume import read_volume, write_volume
from znn.ops.segment import NO_MERGE, Method, same_partition, segment
from znn.pipeline.dense.manifest import MANIFEST_DIR
from znn.pipeline.jobs.segment import SegmentJob, segment_job
from znn.pipeline.segment.volume import SegmentRequest, resume_folder, segment_volume

# (name, map type, dims, volume, block, halo, cell spacing): each volume is 4 or 8 blocks, every cell within about
# one spacing of its point, the halo at least twice that (so that every segment a core or a slab touches, with its
# neighbours, lies inside the block's extent: the condition for the blockwise result to equal the whole one)
CASES = {
    "boundary-2d": ("boundary", "2d", (4, 96, 96), (2, 48, 48), (0, 16, 16), 10),
    "boundary-3d": ("boundary", "3d", (24, 64, 64), (12, 32, 32), (12, 16, 16), 8),
    "boundary-2d-merged": ("boundary", "2d", (4, 128, 128), (2, 64, 64), (0, 24, 24), 10),
    "affinity-3d": ("affinity", "3d", (24, 64, 64), (24, 32, 32), (12, 16, 16), 8),
}


def prediction(tmp_path: Path, case: str, seed: int = 0) -> tuple[str, np.ndarray, Method]:
    """A prediction of synthetic cells written as zarr, the array and the method for it."""
    kind, dims, shape, _, _, spacing = CASES[case]
    labels = cells(shape, spacing, seed, flat=dims == "2d")
    pred = boundary_map(labels, seed, dims == "2d") if kind == "boundary" else affinity_map(labels, seed)
    if case.endswith("merged"):  # objects of two neighbouring cells: a faint membrane inside, a strong one around
        pred = np.maximum(0.3 * pred, boundary_map((labels + 1) // 2, seed, dims == "2d"))
    path = str(tmp_path / "pred.zarr")
    write_volume(path, pred)
    # thresholds that cut these synthetic volumes into many objects (not the defaults, which are chosen on EM)
    settings = {"seed_threshold": 0.3} if kind == "boundary" else {"seed_threshold": 0.1, "merge_threshold": 0.5}
    if case.endswith("merged"):  # the cells' fragments agglomerated by their boundary-derived edge affinities
        settings = {"seed_threshold": 0.2, "merge_threshold": 0.5}
    return path, pred, Method.of(kind, dims, **settings)


def run(tmp_path: Path, case: str, scheduler: object = "threads", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The blockwise result and the whole-volume one."""
    path, pred, method = prediction(tmp_path, case, seed)
    _, _, shape, block, halo, _ = CASES[case]
    result = segment_volume(SegmentRequest(path, tmp_path / "seg.zarr", method, block, halo, scheduler=scheduler,
                                           num_threads=2, progress=False))
    blocks = int(np.prod([-(-s // b) for s, b in zip(shape, block)]))
    assert result.blocks_run == result.blocks_total == blocks >= 4 and result.joined > 0
    got = read_volume(result.array)
    assert got.dtype == np.uint64 and got.shape == shape
    return got, segment(pred, method)


@pytest.mark.parametrize("case", sorted(CASES))
def test_blockwise_equals_whole_on_threads(tmp_path, case):
    got, whole = run(tmp_path, case)
    assert len(np.unique(whole)) > 50  # many objects, most of them cut by some face
    assert same_partition(got, whole)
    if case.endswith("merged"):
        (tmp_path / "again").mkdir()
        _, pred, method = prediction(tmp_path / "again", case)
        fragments = segment(pred, replace(method, merge_threshold=NO_MERGE))
        assert len(np.unique(whole)) < 0.8 * len(np.unique(fragments))  # many fragments merged


def test_blockwise_equals_whole_on_a_local_cluster(tmp_path, local_client):
    from znn.pipeline.run.schedulers import make_runner

    got, whole = run(tmp_path, "boundary-3d", make_runner(local_client), seed=1)
    assert same_partition(got, whole)


def test_objects_larger_than_the_halo_are_joined_across_faces(tmp_path):
    """Two long cells crossing every block: each block sees a part, the face matching joins them."""
    prob = 0.01 * np.random.default_rng(0).random((1, 16, 128)).astype(np.float32)  # no two voxels equal
    prob[0, 8, :] += 0.9  # one boundary row along x: two cells of 8 x 128 voxels
    write_volume(tmp_path / "pred.tif", prob)
    result = segment_job(SegmentJob(str(tmp_path / "pred.tif"), str(tmp_path / "seg.zarr"), block=(1, 16, 16),
                                    halo=(0, 4, 4), scheduler="synchronous", progress=False))
    got = read_volume(result.array)
    assert result.blocks_total == 8 and len(np.unique(got)) == 2
    assert same_partition(got, segment(prob, Method.of("boundary")))


# ------------------------------------------------------------------------------------------------ resume
def _done(store: Path) -> int:
    done = resume_folder(store) / MANIFEST_DIR / "done"
    return len([p for p in done.iterdir() if p.name.startswith("0_")]) if done.is_dir() else 0


def test_kill_and_resume_runs_only_unfinished_blocks(tmp_path):
    labels = cells((1, 128, 128), 8, 0, flat=True)
    write_volume(tmp_path / "pred.zarr", boundary_map(labels, 0, True))
    args = ["segment", str(tmp_path / "pred.zarr"), str(tmp_path / "seg.zarr"), "--block", "1,16,16", "--halo",
            "0,16,16", "--seed-threshold", "0.3", "--scheduler", "synchronous", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "znn.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    store, deadline = tmp_path / "seg.zarr", time.time() + 60
    while time.time() < deadline and proc.poll() is None and _done(store) < 8:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = _done(store)
    assert 8 <= finished < 64, "the run finished before it could be killed; make the volume larger"
    job = SegmentJob(str(tmp_path / "pred.zarr"), str(store), Method.of("boundary", seed_threshold=0.3),
                     (1, 16, 16), (0, 16, 16), "synchronous", progress=False)
    resumed = segment_job(job)
    assert (resumed.blocks_skipped, resumed.blocks_run) == (finished, 64 - finished)
    again = segment_job(SegmentJob(job.pred, str(tmp_path / "again.zarr"), job.method, job.block, job.halo,
                                   job.scheduler, progress=False))
    assert again.blocks_run == 64
    np.testing.assert_array_equal(read_volume(resumed.array), read_volume(again.array))


def test_reruns_skip_changes_redo_and_an_interrupted_relabelling_is_safe(tmp_path):
    path, _, method = prediction(tmp_path, "boundary-2d")
    job = SegmentJob(path, str(tmp_path / "seg.zarr"), method, (2, 48, 48), (0, 16, 16), "threads", progress=False)
    first = segment_job(job)
    want = read_volume(first.array)
    # a relabelling killed after writing chunks and before recording them: the chunks are relabelled again
    for marker in (resume_folder(tmp_path / "seg.zarr") / MANIFEST_DIR / "done").glob("1_*"):
        marker.unlink()
    rerun = segment_job(job)
    assert rerun.blocks_run == 0 and rerun.blocks_skipped == 8
    np.testing.assert_array_equal(read_volume(rerun.array), want)
    changed = segment_job(SegmentJob(path, job.out, Method.of("boundary", "2d", seed_threshold=0.2), job.block,
                                     job.halo, "threads", progress=False))
    assert changed.blocks_run == 8
    fresh = segment_job(SegmentJob(path, job.out, method, job.block, job.halo, "threads", fresh=True,
                                   progress=False))
    assert fresh.blocks_run == 8
    np.testing.assert_array_equal(read_volume(fresh.array), want)


def test_a_new_prediction_redoes_every_block(tmp_path):
    path, pred, method = prediction(tmp_path, "boundary-2d")
    job = SegmentJob(path, str(tmp_path / "seg.zarr"), method, (2, 48, 48), (0, 16, 16), "threads", progress=False)
    segment_job(job)
    write_volume(path, pred[:, ::-1].copy(), overwrite=True)  # the same path, other values
    assert segment_job(job).blocks_run == 8


# ------------------------------------------------------------------------------------------------ mistakes
def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> None:
    assert main(["segment", "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("znn segment: error: "), err
    for word in words:
        assert word in err, err


def test_mistakes_are_one_line_and_status_2(tmp_path, capsys):
    path, pred, _ = prediction(tmp_path, "boundary-2d")
    out = str(tmp_path / "seg.zarr")
    write_volume(tmp_path / "ids.tif", (pred > 0.5).astype(np.uint16))
    _refused([str(tmp_path / "ids.tif"), out], capsys, "holds uint16 values", "--type segmentation")
    _refused([path, out, "--type", "affinity"], capsys, "has 1 channel(s)", "--type affinity")
    _refused([path, str(tmp_path / "seg.h5")], capsys, "zarr label volume", "seg.zarr")
    _refused([path, path + "/labels"], capsys, "would write over PRED")
    _refused([path, out, "--halo", "0,0,0", "--block", "2,48,48"], capsys, "halo 0,0,0",
             "at least 1 voxel")
    (tmp_path / "file.zarr").write_text("not a store")
    _refused([path, str(tmp_path / "file.zarr")], capsys, "is a file")
    nan = pred.copy()
    nan[1, 50, 60] = np.nan
    write_volume(tmp_path / "nan.zarr", nan)
    _refused([str(tmp_path / "nan.zarr"), out], capsys, "NaN or infinite", "(c, z, y, x) = (0, 1, 50, 60)")
    _refused([str(tmp_path / "missing.tif"), out], capsys, "missing.tif")
