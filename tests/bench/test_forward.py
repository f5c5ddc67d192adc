"""`znn bench forward` without timing anything: the memory plan says which output cubes fit the budget."""

from __future__ import annotations

from znn.bench.forward import ForwardBenchRequest, format_table, run_forward_bench


def test_a_cube_that_does_not_fit_the_memory_is_a_row_without_timings():
    seen = []
    request = ForwardBenchRequest(nets=("n337",), sides=(8,), memory=1, torch=False, scheduler="threads")
    rows = run_forward_bench(request, progress=seen.append)
    assert len(rows) == 1 and not rows[0]["fits"] and rows[0]["outsz"] == [8, 8, 8]
    assert rows[0]["block_threads"] == 2 and rows[0]["spectra_cache"] is False  # the last one tried
    assert "znn_vox_s" not in rows[0] and seen == []  # progress reports measured rows only
    table = format_table(rows)
    assert "does not fit" in table and "per block" in table
