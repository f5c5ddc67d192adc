"""`znn bench forward` on the tiny network at tiny patches (--repeat 1): each engine in its own process with its
measured peak memory, the same outputs from znn, PyTorch and ONNX Runtime on the same weights, the largest patch
that fits a budget, the plan's choice beside its alternatives, and the peers skipped with a note when absent."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.shared import ROOT
from znn.bench.common import installed
from znn.bench.forward import ForwardBenchRequest, format_table, run_forward_bench
from znn.bench.growth import Point, extrapolate, largest_fit, skip_reason
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
    rows = run_forward_bench(ForwardBenchRequest(**TINY, alternatives=False))
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
