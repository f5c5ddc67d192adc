"""Runner.run, the one place a graph's keys run (in-process here; on a cluster in test_cluster.py): each wanted key
reported once with its value, values given in the graph too, and get built on it."""

from __future__ import annotations

from operator import add, mul

import pytest

from znn.pipeline.run.schedulers import make_runner

GRAPH = {"a": 2, "b": (add, "a", 3), "c": (mul, "b", "b"), "d": (add, "c", "a")}


@pytest.mark.parametrize("scheduler", ["synchronous", "threads"])
def test_run_reports_every_wanted_key_once(scheduler):
    runner = make_runner(scheduler, 2)
    seen: list[tuple[str, int]] = []
    runner.run(GRAPH, ["d", "a", "b"], lambda key, value: seen.append((key, value)))
    assert sorted(seen) == [("a", 2), ("b", 5), ("d", 27)]  # "a" is a value of the graph: no task reports it
    assert runner.get(GRAPH, ["d", "a", "c"]) == [27, 2, 25]
    assert runner.get(GRAPH, ["c", "d"], priority={"a": 0, "b": 1, "c": 2, "d": 3}) == [25, 27]


def test_run_keeps_blas_single_threaded_inside_tasks():
    from threadpoolctl import threadpool_info

    def blas_threads() -> list[int]:
        return [lib["num_threads"] for lib in threadpool_info() if lib.get("user_api") == "blas"]

    got = make_runner("threads", 2).get({"x": (blas_threads,)}, ["x"])[0]
    assert all(n == 1 for n in got)

def test_threaded_graphs_run_with_a_short_gil_switch_interval_and_restore_it():
    """Workers hand the GIL over quickly while a graph runs on threads (see GIL_SWITCH_S); before and after, the
    interpreter's own interval stands, also when the graph fails."""
    import sys

    from znn.pipeline.run.schedulers import GIL_SWITCH_S, Runner

    before = sys.getswitchinterval()
    seen = Runner("threads", 2).get({"a": (sys.getswitchinterval,)}, ["a"])
    assert seen == [pytest.approx(min(before, GIL_SWITCH_S))] and sys.getswitchinterval() == before

    def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        Runner("threads", 2).get({"a": (fail,)}, ["a"])
    assert sys.getswitchinterval() == before
    assert Runner("threads", 1).get({"a": (sys.getswitchinterval,)}, ["a"]) == [before]  # one worker: no convoy
