"""`znn bench forward` on the tiny network at tiny patches (--repeat 1): each engine in its own process with its
measured peak memory, the same outputs from znn, PyTorch and ONNX Runtime on the same weights, the largest patch
that fits a budget, the plan's choice beside its alternatives, and the peers skipped with a note when absent. How a
peer grows past the listed cubes is shown with fake children (:class:`FakeChildren`): a real engine can be made
neither to fail at a chosen patch nor to grow its peak by a known law."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

from tests.shared import ROOT
from znn.bench import forward
from znn.bench.common import installed, write_rows
from znn.bench.engines import bench_net
from znn.bench.forward import ForwardBenchRequest, format_table, run_forward_bench
from znn.bench.growth import MAX_GROWN, Point, extrapolate, grain, largest_fit, next_side, skip_reason
from znn.text import parse_bytes

TINY = dict(nets=("tiny3d",), sides=(4,), threads=2, repeat=1, modes="fft", memory=parse_bytes("500MB"),
            scheduler="threads")
PEERS = pytest.mark.skipif(not all(installed(m) for m in ("torch", "onnx", "onnxruntime")),
                           reason="needs the bench extra (torch, onnx, onnxruntime)")
TOL = 1e-4  # float32 engines summing in different orders: relative to the output's largest magnitude


def _kind(rows, kind):
    return [r for r in rows if r.get("kind") == kind]


def test_a_cube_that_does_not_fit_the_memory_is_a_row_without_timings():
    seen = []
    request = ForwardBenchRequest(nets=("n337",), sides=(8,), memory=1, torch=False, ort=False, scheduler="threads")
    rows = run_forward_bench(request, progress=seen.append)
    patch = _kind(rows, "patch")
    assert len(patch) == 1 and not patch[0]["fits"] and patch[0]["outsz"] == [8, 8, 8]
    assert patch[0]["block_threads"] == 2 and patch[0]["spectra_cache"] is False  # the last one tried
    assert "znn_vox_s" not in patch[0] and seen == []  # progress reports measured rows only
    assert [r["engine"] for r in _kind(rows, "largest")] == ["znn"] and "vox_s" not in _kind(rows, "largest")[0]
    notes = " ".join(r["text"] for r in _kind(rows, "note"))
    assert "no output patch fits" in notes and "--no-torch" in notes and "--no-ort" in notes
    table = format_table(rows)
    assert "does not fit" in table and "per block" in table


@PEERS
def test_znn_torch_and_onnx_runtime_agree_and_each_reports_its_peak_memory():
    rows = run_forward_bench(ForwardBenchRequest(**TINY, alternatives=False, grow=False))  # growth: further down
    (row,) = _kind(rows, "patch")
    for engine in ("znn", "torch", "ort"):
        assert row[f"{engine}_vox_s"] > 0 and 50 << 20 < row[f"{engine}_rss"] < 4 << 30, engine
    assert row["torch_diff"] < TOL and row["ort_diff"] < TOL
    assert row["ort_ratio"] == pytest.approx(row["znn_vox_s"] / row["ort_vox_s"], abs=0.006)  # 2 decimals
    largest = {r["engine"]: r for r in _kind(rows, "largest")}
    assert set(largest) == {"znn", "torch", "ort"}
    plan = largest["znn"]  # the plan's own choice for 500 MB: larger than the table's 4^3
    assert plan["outsz"][0] > 4 and plan["vox_s"] > 0 and plan["peak_rss"] > 0
    for peer in ("torch", "ort"):  # the 4^3 run, when its measured peak fits the budget
        fits = row[f"{peer}_rss"] <= TINY["memory"]
        assert (largest[peer].get("outsz") == [4, 4, 4]) == fits
        assert (largest[peer].get("ratio") == pytest.approx(plan["vox_s"] / row[f"{peer}_vox_s"], abs=0.006)) == fits
    table = format_table(rows)
    for title in ("ORT vox/s", "znn/ORT", "torch peak", "largest patch it fits into 476.8 MiB", "ONNX Runtime"):
        assert title in table
    assert "opset 17" in table


@PEERS
def test_onnx_runtime_grows_past_the_listed_cube_in_a_process_of_its_own(monkeypatch):
    monkeypatch.setattr(forward, "MAX_GROWN", 1)  # one grown run: each step is a real child
    rows = run_forward_bench(ForwardBenchRequest(**TINY, torch=False, alternatives=False))
    grown = [r for r in _kind(rows, "patch") if r.get("grown")]
    assert [r["outsz"] for r in grown] == [[5, 5, 5]]  # 4 * 4/3, rounded down
    assert grown[0]["ort_vox_s"] > 0 and 50 << 20 < grown[0]["ort_rss"] < TINY["memory"]
    ort = _largest(rows, "ort")
    assert ort["outsz"] == [5, 5, 5] and ort["grown"] and ort["ratio_of"].endswith(" vs ONNX Runtime 5^3")
    assert any("stopped growing after 1 grown" in r["text"] for r in _kind(rows, "note"))


def test_the_plan_is_timed_beside_its_alternatives():
    rows = run_forward_bench(ForwardBenchRequest(**{**TINY, "modes": "optimize"}, torch=False, ort=False))
    config = _kind(rows, "config")
    plan = [r for r in config if r["plan"]]
    assert len(plan) == 1 and plan[0]["vox_s"] > 0
    configs = {r["config"] for r in config}
    assert {"1 block x 2 threads", "2 blocks x 1 thread"} <= configs or len(config) == 3
    assert sum(r["fastest"] for r in config) == 1
    fastest = next(r for r in config if r["fastest"])
    assert plan[0]["plan_over_best"] == pytest.approx(plan[0]["vox_s"] / fastest["vox_s"], abs=0.01)
    assert all(r["outsz"] == plan[0]["outsz"] for r in config)
    assert "plan / best within the memory" in format_table(rows)


def test_onnx_runtime_missing_is_a_note_not_a_failure(tmp_path):
    # onnxruntime blocked as Python does for a module that is not there (None in sys.modules)
    code = ("import sys, json; sys.modules['onnxruntime'] = None\n"
            "from znn.bench.forward import ForwardBenchRequest, run_forward_bench, format_table\n"
            f"rows = run_forward_bench(ForwardBenchRequest(**{TINY!r}, torch=False, alternatives=False))\n"
            "print(json.dumps(rows)); print(format_table(rows), file=sys.stderr)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    (row,) = _kind(rows, "patch")
    assert row["znn_vox_s"] > 0 and "ort_vox_s" not in row and "ort_rss" not in row
    # where torch and onnx are missing too (CI's test venv) the note names them all
    assert any(re.match(r"ONNX Runtime not run: (\w+, )*onnxruntime(, \w+)* not installed", r["text"])
               for r in _kind(rows, "note"))
    assert [r["engine"] for r in _kind(rows, "largest")] == ["znn"]


# ---------------------------------------------------------------------------------------------- growth


def test_extrapolation_is_linear_in_input_voxels_through_the_last_two_runs():
    assert extrapolate([], 10) is None
    assert extrapolate([Point(100, 2.0, 1000)], 300) == (6.0, 3000)  # one run: in proportion
    seconds, peak = extrapolate([Point(100, 1.0, 1000), Point(200, 3.0, 1500), Point(50, 9.0, 9)], 400)
    assert (seconds, peak) == (7.0, 2500)
    assert extrapolate([Point(100, 5.0, 2000), Point(200, 4.0, 1000)], 400) == (4.0, 1000)  # never shrinks


def test_a_patch_is_skipped_over_the_time_cap_the_memory_or_after_a_failure():
    points = [Point(100, 10.0, 2 << 30), Point(200, 20.0, 4 << 30)]
    assert skip_reason(points, 300, time_cap=60, memory=8 << 30) is None
    assert "time cap" in skip_reason(points, 700, time_cap=60, memory=64 << 30)
    assert "memory" in skip_reason(points, 500, time_cap=600, memory=8 << 30)
    assert "did not finish" in skip_reason([*points, Point(300, failed=True)], 400, 600, 64 << 30)
    assert skip_reason([Point(300, failed=True)], 200, 600, 64 << 30) is None  # only larger ones are skipped


def test_the_largest_patch_whose_measured_peak_fits_a_fake_budget():
    rows = [{"outsz": [16] * 3, "vox_s": 400, "peak_rss": 1 << 30},
            {"outsz": [32] * 3, "vox_s": 2000, "peak_rss": 3 << 30},
            {"outsz": [48] * 3, "vox_s": 4000, "peak_rss": 9 << 30},
            {"outsz": [64] * 3, "note": "killed at 20 GiB"}]
    assert largest_fit(rows, 8 << 30)["outsz"] == [32] * 3
    assert largest_fit(rows, 9 << 30)["outsz"] == [48] * 3
    assert largest_fit(rows, 64 << 30)["outsz"] == [48] * 3  # a run without a measurement never counts
    assert largest_fit(rows, 1 << 29) is None


def test_the_command_prints_the_tables_and_writes_the_rows(tmp_path, capsys):
    from znn.cli import main

    path = tmp_path / "rows.json"
    assert main(["bench", "forward", "--nets", "tiny3d", "--outsz", "4", "--repeat", "1", "--modes", "fft",
                 "--memory", "500MB", "--no-torch", "--no-ort", "--no-alternatives", "--time-cap", "60",
                 "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "each engine at each output patch" in out and "each engine at the largest patch" in out
    assert "the plan's choice beside" in out  # the plan's own row, without alternatives
    kinds = [r["kind"] for r in json.loads(path.read_text())["rows"]]
    assert kinds.count("patch") == 1 and kinds.count("largest") == 1 and kinds.count("config") == 1


def test_a_growth_step_lands_on_a_multiple_of_an_eighth_of_the_side_rounded_to_a_power_of_two():
    assert [grain(s) for s in (1, 4, 15, 16, 31, 32, 96, 128, 185)] == [1, 1, 1, 2, 2, 4, 8, 16, 16]


def _cube_runs(*sides, failed=()):
    """Runs at cubes of ``voxels_of = side**3``: one byte and a millisecond per voxel (extrapolation is exact)."""
    return [Point(s**3, failed=True) if s in failed else Point(s**3, s**3 / 1000, s**3) for s in sides]


def test_a_peer_grows_by_up_to_four_thirds_to_the_largest_step_predicted_within_memory_and_time():
    runs, cube = _cube_runs(64, 96), lambda s: s**3
    assert next_side(runs, 96, cube, time_cap=1e9, memory=128**3) == 128  # the whole step
    assert next_side(runs, 96, cube, time_cap=1e9, memory=128**3 - 1) == 120  # 8 (96's grain) below it
    assert next_side(runs, 96, cube, time_cap=113**3 / 1000, memory=1 << 40) == 112  # the time cap
    assert next_side(runs, 96, cube, time_cap=1e9, memory=104**3 - 1) is None  # not even the smallest step fits
    assert next_side(runs[:1], 64, cube, time_cap=1e9, memory=1 << 40) == 80  # one run: in proportion; 64 // 8 = 8
    assert next_side(_cube_runs(2), 2, cube, time_cap=1e9, memory=1 << 40) == 3  # one voxel where 4/3 adds none


def test_a_failed_or_killed_run_stops_growth():
    cube = lambda s: s**3  # noqa: E731
    assert next_side(_cube_runs(64, 96, 128, failed=(128,)), 96, cube, 1e9, 1 << 40) is None
    assert next_side(_cube_runs(32, 64, 96, failed=(32,)), 96, cube, 1e9, 1 << 40) is None
    assert next_side([], 96, cube, 1e9, 1 << 40) is None  # nothing ran: nothing to grow from


# ---------------------------------------------------------------------------------------------- growth in the bench

MIB = 1 << 20
TINY_SPEC = bench_net("tiny3d", 0).spec  # input side = output side + 11
PLAN = 40  # the fake plan's output cube side


class FakeChildren:
    """Stands in for :func:`~znn.bench.engines.run_engine`: znn runs any patch at 10^6 voxels/s (its plan: a
    ``PLAN`` cube); per voxel of its input patch, a peer's pass takes ``seconds_per_voxel`` and its peak grows by
    ``kib_per_voxel`` KiB over 100 MiB; the peer is killed at the sides in ``fail``. ``jobs``: every job asked."""

    def __init__(self, kib_per_voxel=4, seconds_per_voxel=0.001, fail=()):
        self.kib_per_voxel, self.seconds_per_voxel, self.fail, self.jobs = kib_per_voxel, seconds_per_voxel, fail, []

    def peak(self, side):
        return 100 * MIB + self.kib_per_voxel * 1024 * self.voxels(side)

    def voxels(self, side):
        return math.prod(TINY_SPEC.layout((side,) * 3).input_patch[TINY_SPEC.inputs[0]])

    def __call__(self, job, limits, workdir):
        self.jobs.append(job)
        side = PLAN if job.choose == "plan" else job.outsz[0]
        head = {"engine": job.engine, "outsz": [side] * 3}
        if job.engine == "znn":
            return {**head, "seconds": 1.0, "vox_s": 10**6, "peak_rss": 200 * MIB, "block_threads": 1, "blocks": 2,
                    "spectra_cache": True, "modes": "fft", "spectra_s": 0.0, "predicted_bytes": 200 * MIB,
                    "fits": True}
        if side in self.fail:
            return {**head, "note": "killed at 1.0 GiB resident (the machine's memory)"}
        seconds = self.seconds_per_voxel * self.voxels(side)
        return {**head, "seconds": seconds, "vox_s": round(side**3 / seconds), "peak_rss": self.peak(side)}

    def peer_sides(self):
        return [j.outsz[0] for j in self.jobs if j.engine == "torch"]


def _fake_bench(monkeypatch, children, **request):
    """The bench of tiny3d at listed cubes 4 and 16 with PyTorch as the one peer, its children ``children``."""
    monkeypatch.setattr(forward, "installed", lambda module: True)  # the fake PyTorch needs no torch
    defaults = dict(nets=("tiny3d",), sides=(4, 16), threads=2, repeat=1, modes="fft", memory=parse_bytes("500MB"),
                    ort=False, alternatives=False, time_cap=1e6, machine_memory=64 << 30, scheduler="threads")
    return run_forward_bench(ForwardBenchRequest(**{**defaults, **request}), run=children)


def _largest(rows, engine):
    return next(r for r in _kind(rows, "largest") if r["engine"] == engine)


def test_a_peer_grows_past_the_listed_cubes_while_its_predicted_peak_fits_the_memory(monkeypatch):
    children = FakeChildren()
    rows = _fake_bench(monkeypatch, children)
    # 16 -> 20 (16's grain 2, 21 rounded down) -> 26 -> 34; from 34 (grain 4) even 36 would pass 500 MB
    assert children.peer_sides() == [4, 16, 20, 26, 34]
    assert children.peak(34) <= parse_bytes("500MB") < children.peak(36)
    patch = _kind(rows, "patch")
    assert [(r["outsz"][0], r.get("grown", False)) for r in patch] == [(4, False), (16, False), (20, True),
                                                                       (26, True), (34, True)]
    assert all("znn_vox_s" not in r and r["torch_vox_s"] > 0 for r in patch if r.get("grown"))
    torch = _largest(rows, "torch")
    assert torch["outsz"] == [34] * 3 and torch["grown"] and torch["peak_rss"] == children.peak(34)
    assert "34x34x34 (grown)" in format_table(rows)


def test_a_peer_stops_growing_before_a_pass_predicted_over_the_time_cap(monkeypatch):
    children = FakeChildren(kib_per_voxel=0, seconds_per_voxel=0.001)  # memory never stops it: a pass of 27^3 = 19.7 s
    rows = _fake_bench(monkeypatch, children, time_cap=60)
    # from 26 (37^3: 50.7 s) the step to 34 (91 s), 32 and 30 are over 60 s, 28 (39^3: 59.3 s) is not; from 28
    # nothing up to 36 is under it
    assert children.peer_sides() == [4, 16, 20, 26, 28]
    assert _largest(rows, "torch")["outsz"] == [28] * 3


def test_a_killed_run_stops_growth_and_the_largest_is_the_last_that_ran(monkeypatch):
    children = FakeChildren(fail=(26,))
    rows = _fake_bench(monkeypatch, children)
    assert children.peer_sides() == [4, 16, 20, 26]  # nothing after the killed 26, not even a skipped row
    assert [r["outsz"][0] for r in _kind(rows, "patch")] == [4, 16, 20, 26]
    killed = next(r for r in _kind(rows, "patch") if r["outsz"][0] == 26)
    assert killed["grown"] and "torch_vox_s" not in killed and killed["torch_note"].startswith("killed")
    assert _largest(rows, "torch")["outsz"] == [20] * 3
    assert "killed: memory" in format_table(rows)


def test_growth_is_bounded_where_the_peak_does_not_grow(monkeypatch):
    children = FakeChildren(kib_per_voxel=0, seconds_per_voxel=1e-9)
    rows = _fake_bench(monkeypatch, children)
    assert len(children.peer_sides()) == 2 + MAX_GROWN
    assert any(f"stopped growing after {MAX_GROWN}" in r["text"] for r in _kind(rows, "note"))


def test_each_ratio_at_the_largest_patches_names_both_patches(monkeypatch, tmp_path):
    children = FakeChildren()
    rows = _fake_bench(monkeypatch, children)
    torch = _largest(rows, "torch")
    assert torch["znn_outsz"] == [PLAN] * 3 and torch["outsz"] == [34] * 3  # the two patches, in the JSON rows
    assert torch["ratio"] == round(10**6 / torch["vox_s"], 2)
    assert torch["ratio_of"] == f"znn {PLAN}^3 vs PyTorch 34^3"
    assert f"{torch['ratio']:.2f}x (znn {PLAN}^3 vs PyTorch 34^3)" in format_table(rows)
    path = tmp_path / "rows.json"
    write_rows(path, rows)
    assert _largest(json.loads(path.read_text())["rows"], "torch")["ratio_of"] == torch["ratio_of"]


def test_without_growth_the_largest_is_the_largest_listed_cube(monkeypatch):
    children = FakeChildren()
    rows = _fake_bench(monkeypatch, children, grow=False)
    assert children.peer_sides() == [4, 16]
    assert not any(r.get("grown") for r in _kind(rows, "patch"))
    torch = _largest(rows, "torch")
    assert torch["outsz"] == [16] * 3 and torch["ratio_of"] == f"znn {PLAN}^3 vs PyTorch 16^3"
    assert "largest listed (--no-grow) patch" in format_table(rows)


def test_the_command_passes_no_grow_on(monkeypatch):
    from znn.cli import main

    asked = []
    monkeypatch.setattr(forward, "run_forward_bench", lambda request, progress: asked.append(request) or [])
    assert main(["bench", "forward", "--nets", "tiny3d", "--no-grow"]) == 0
    assert main(["bench", "forward", "--nets", "tiny3d"]) == 0
    assert [r.grow for r in asked] == [False, True]
