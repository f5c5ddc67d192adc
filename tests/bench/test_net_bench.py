"""``znn bench net``'s report: our step's figures, and PyTorch's beside them, interleaved or from a child process."""

from __future__ import annotations

import pytest

from znn.bench.net import NetRequest, _build, _timed_runs, _warm_up, format_report, run_net_bench

TINY = """
nodes input
type input
size 1
edges c1
type conv
init uniform
size 1,3,3
input input
output n1
nodes n1
type transfer
function rectify_linear
size 3
edges c2
type conv
init uniform
size 1,2,2
input n1
output output
nodes output
type transfer
function linear
size 2
"""


def _request(tmp_path, **kw) -> NetRequest:
    path = tmp_path / "tiny.znn"
    path.write_text(TINY)
    return NetRequest(path, (1, 6, 5), **{"threads": 2, "repeat": 2, "mode": "direct", "sync_repeat": 1, **kw})


def test_our_figures_without_a_peer(tmp_path):
    r = run_net_bench(_request(tmp_path, torch=False))
    assert r["step_s"] > 0 and r["step_busy_s"] > 0 and r["step_critical_path_s"] > 0
    assert r["train_vox_s"] == pytest.approx(30 / r["step_s"])
    assert r["input_patch"] == {"input": [1, 9, 8]} and r["plan_workers"] == 2
    assert "step_vs_torch" not in r and "pytorch" not in format_report(r)
    assert len(r["step_sys_all_s"]) == 2 and r["step_sys_s"] >= 0 and "system CPU time a step" in format_report(r)


def test_pytorch_apart_gives_the_figures_interleaving_gives(tmp_path):
    pytest.importorskip("torch")
    together = run_net_bench(_request(tmp_path))
    apart = run_net_bench(_request(tmp_path, torch_apart=True))
    for r in (together, apart):
        assert len(r["torch_step_all_s"]) == 2 and len(r["torch_forward_all_s"]) == 2
        assert r["step_vs_torch"] == pytest.approx(r["step_s"] / r["torch_step_s"])
        assert r["torch_train_vox_s"] == pytest.approx(30 / r["torch_step_s"])
        assert r["torch_max_rel_diff"] < 1e-5  # the same weights and inputs: the child rebuilt them from the seed
    assert apart["torch_apart"] and "torch_apart" not in together
    assert "not interleaved" in format_report(apart) and "not interleaved" not in format_report(together)


def test_every_timed_step_transforms_its_kernels(tmp_path):
    """The forwards timed before the steps leave their kernel spectra cached; a step of real training never has
    them (the step before changed the kernels), so no timed step may use them."""
    bench, report = _build(_request(tmp_path, torch=False, mode="fft"))
    _warm_up(bench, report)
    _, step_runs = _timed_runs(bench, lambda s: None)
    assert len(step_runs) == 2
    for run in step_runs:
        assert run.by_op().get("kfft", 0) > 0, run.by_op()


def test_the_warm_up_builds_the_graph_every_timed_step_runs(tmp_path):
    """The warm-up takes a step as the timed ones are taken (no spectra cached) after a forward, so the first timed
    step neither builds its graph nor grows the process's memory for the forwards' cache beside it."""
    bench, report = _build(_request(tmp_path, torch=False, mode="fft"))
    _warm_up(bench, report)
    built = bench.engine._reusable["update"]
    _timed_runs(bench, lambda s: None)
    assert bench.engine._reusable["update"] is built
