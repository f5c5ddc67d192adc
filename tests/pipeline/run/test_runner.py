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
