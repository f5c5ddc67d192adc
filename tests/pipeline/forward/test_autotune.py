"""Conv mode ``optimize``: layers are measured once, the choice is persisted and reused, fixed modes are kept,
and a broken cache file costs a remeasurement, not a crash."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from znn.errors import ConfigError
from znn.io.netfile import parse_network
from znn.network import Network
from znn.pipeline.forward import autotune
from znn.pipeline.forward.autotune import (
    LayerProblem,
    TimedPass,
    cache_file,
    resolve_modes,
    time_layer,
)
from znn.pipeline.graph.plan import make_plan
from znn.pipeline.run.schedulers import make_runner
from znn.pipeline.train.engine import Engine

NET = """
nodes in
type input
size 2
edges c1
type conv
size 1,3,3
init gaussian
input in
output h1
nodes h1
type transfer
function rectify_linear
size 3
edges c2
type conv
size 1,5,5
init gaussian
input h1
output h2
nodes h2
type transfer
function rectify_linear
size 4
edges c3
type conv
size 1,2,2
init gaussian
input h2
output output
nodes output
type transfer
size 2
"""
OUTSZ = (1, 4, 4)


class FakeTimer:
    """Direct wins for kernels of at most 9 taps, FFT above; records what it was asked to time."""

    def __init__(self) -> None:
        self.calls: list[tuple[LayerProblem, str]] = []

    def __call__(self, problem: LayerProblem, mode: str) -> float:
        self.calls.append((problem, mode))
        taps = int(np.prod(problem.kernel))
        return (1.0 if taps <= 9 else 3.0) if mode == "direct" else 2.0

    @property
    def measured(self) -> set[tuple[int, int, int]]:
        return {p.kernel for p, _ in self.calls}


def _never(problem: LayerProblem, mode: str) -> float:
    raise AssertionError(f"measured {problem} in {mode} although the choice was cached")


@pytest.fixture
def spec():
    return parse_network(NET)


def test_choice_is_persisted_and_reused(spec, tmp_path, caplog):
    path = tmp_path / "autotune.json"
    timer = FakeTimer()
    with caplog.at_level(logging.DEBUG, logger="znn.autotune"):
        modes = resolve_modes(spec, OUTSZ, "optimize", np.float32, cache_path=path, timer=timer)
    assert modes == {"c1": "direct", "c2": "fft", "c3": "direct"}
    assert timer.measured == {(1, 3, 3), (1, 5, 5), (1, 2, 2)}
    assert sum("(timed;" in r.getMessage() for r in caplog.records) == 3
    assert "conv modes chosen in" in caplog.records[-1].getMessage()
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == 3 and {e["mode"] for e in entries.values()} == {"direct", "fft"}
    assert all("float32" in key and autotune.machine_id() in key for key in entries)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="znn.autotune"):
        again = resolve_modes(spec, OUTSZ, "optimize", np.float32, cache_path=path, timer=_never)
    assert again == modes
    assert sum("(cached;" in r.getMessage() for r in caplog.records) == 3
    assert not any("timing" in r.getMessage() for r in caplog.records)
    assert [p.name for p in tmp_path.iterdir()] == ["autotune.json"]  # no temporary files left behind


def test_choices_are_per_dtype_patch_and_pass(spec, tmp_path):
    path = tmp_path / "autotune.json"
    resolve_modes(spec, OUTSZ, "optimize", np.float32, cache_path=path, timer=FakeTimer())
    timer = FakeTimer()
    resolve_modes(spec, OUTSZ, "optimize", np.float64, cache_path=path, timer=timer)
    assert len(timer.calls) > 0 and all(p.dtype == "float64" for p, _ in timer.calls)
    timer = FakeTimer()
    resolve_modes(spec, (1, 6, 6), "optimize", np.float32, cache_path=path, timer=timer)
    assert len(timer.calls) > 0
    timer = FakeTimer()
    resolve_modes(spec, OUTSZ, "optimize", np.float32, cache_path=path, timer=timer, timed=TimedPass(training=False))
    assert len(timer.calls) > 0 and not any(p.training for p, _ in timer.calls)
    assert len(json.loads(path.read_text())["entries"]) == 12


def test_mode_dict_mixing_fixed_and_optimize(spec, tmp_path):
    timer = FakeTimer()
    modes = resolve_modes(spec, OUTSZ, {"c1": "fft", "c2": "optimize"}, np.float32,
                          cache_path=tmp_path / "a.json", timer=timer)
    # c1 fixed, c2 measured, c3 absent: fft as in make_plan
    assert modes == {"c1": "fft", "c2": "fft", "c3": "fft"}
    assert timer.measured == {(1, 5, 5)}
    timer = FakeTimer()
    modes = resolve_modes(spec, OUTSZ, {"c1": "optimize", "c2": "direct", "c3": "optimize"}, np.float32,
                          cache_path=tmp_path / "b.json", timer=timer)
    assert modes == {"c1": "direct", "c2": "direct", "c3": "direct"}
    assert timer.measured == {(1, 3, 3), (1, 2, 2)}


def test_fixed_modes_measure_nothing_and_bad_modes_are_refused(spec, tmp_path):
    path = tmp_path / "autotune.json"
    assert resolve_modes(spec, OUTSZ, "direct", cache_path=path, timer=_never) == dict.fromkeys(spec.edges, "direct")
    assert not path.exists()
    with pytest.raises(ConfigError, match="use fft, direct or optimize"):
        resolve_modes(spec, OUTSZ, {"c1": "fastest"}, cache_path=path, timer=_never)


@pytest.mark.parametrize("content", ["{not json", '{"version": 1}', '{"version": 99, "entries": {}}', "[1, 2]",
                                     '{"version": 1, "entries": []}'])
def test_corrupt_cache_is_remeasured_with_a_warning(spec, tmp_path, content):
    path = tmp_path / "autotune.json"
    path.write_text(content)
    timer = FakeTimer()
    with pytest.warns(RuntimeWarning, match="autotune cache is corrupt"):
        modes = resolve_modes(spec, OUTSZ, "optimize", np.float32, cache_path=path, timer=timer)
    assert modes == {"c1": "direct", "c2": "fft", "c3": "direct"} and len(timer.calls) > 0
    assert len(json.loads(path.read_text())["entries"]) == 3  # rewritten whole
    assert resolve_modes(spec, OUTSZ, "optimize", np.float32, cache_path=path, timer=_never) == modes


def test_bad_entries_are_remeasured(spec, tmp_path):
    path = tmp_path / "autotune.json"
    resolve_modes(spec, OUTSZ, "optimize", np.float32, cache_path=path, timer=FakeTimer())
    data = json.loads(path.read_text())
    for entry in data["entries"].values():
        entry["mode"] = "sideways"
    path.write_text(json.dumps(data))
    timer = FakeTimer()
    assert resolve_modes(spec, OUTSZ, "optimize", np.float32, cache_path=path, timer=timer)["c2"] == "fft"
    assert len(timer.measured) == 3


def test_unwritable_cache_warns_and_still_answers(spec, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.warns(RuntimeWarning) as caught:
        modes = resolve_modes(spec, OUTSZ, "optimize", np.float32, cache_path=blocker / "a.json", timer=FakeTimer())
    assert modes["c2"] == "fft"
    assert any("cannot write the autotune cache" in str(w.message) for w in caught)


def test_cache_location(tmp_path, monkeypatch):
    monkeypatch.setenv("ZNN_CACHE_DIR", str(tmp_path / "env"))
    assert cache_file() == tmp_path / "env" / "autotune.json"
    assert cache_file(tmp_path / "x.json") == tmp_path / "x.json"  # an explicit path beats the environment
    monkeypatch.delenv("ZNN_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)  # platformdirs: ~/.cache unless this is set
    assert cache_file() == tmp_path / "home" / ".cache" / "znn" / "autotune.json"


def test_clear_loser_is_timed_once(spec, tmp_path):
    calls: list[str] = []

    def timer(ratio: float):
        def run(problem: LayerProblem, mode: str) -> float:
            calls.append(mode)
            return ratio if mode == "direct" else 1.0
        return run

    assert resolve_modes(spec, OUTSZ, {"c2": "optimize"}, np.float32, cache_path=tmp_path / "a.json",
                         timer=timer(10.0), repeat=5)["c2"] == "fft"
    assert len(calls) == 4  # a warm-up and one timed run per mode: 10x slower has lost
    calls.clear()
    assert resolve_modes(spec, OUTSZ, {"c2": "optimize"}, np.float32, cache_path=tmp_path / "b.json",
                         timer=timer(0.8), repeat=5)["c2"] == "direct"
    assert len(calls) == 2 + 2 * 5  # a close call: every repetition, median


@pytest.mark.parametrize("blocks", [{}, {"in_blocks": ((0, 1), (1, 2)), "out_blocks": ((0, 1), (1, 3))}])
@pytest.mark.parametrize("training", [True, False])
def test_real_measurement(blocks, training):
    for grad_input in (True, False):
        problem = LayerProblem(2, 3, (1, 9, 10), (1, 3, 3), (1, 2, 1), "float32", grad_input, **blocks,
                               training=training)
        assert problem.out_extent == (1, 5, 8)
        assert len(problem.in_blocks) == len(blocks.get("in_blocks", [0]))
        for mode in ("fft", "direct"):
            assert 0 < time_layer(problem, mode) < 5


def test_the_graph_planned_for_the_engines_workers_is_what_is_timed(spec, tmp_path):
    """An engine planned for 4 workers times its layers as that graph splits them (the 4-worker plan's map blocks
    and direct slabs, timed slab by slab), kept apart from the one-worker choice; a real timing of the slabbed
    direct layer is positive."""
    timer = FakeTimer()
    resolve_modes(spec, (1, 24, 24), "optimize", np.float32, cache_path=tmp_path / "a.json", timer=timer)
    resolve_modes(spec, (1, 24, 24), "optimize", np.float32, cache_path=tmp_path / "a.json", timer=timer, workers=4)
    one, four = ({p.key("m"): p for p, _ in timer.calls if bool(p.out_slabs) == split} for split in (False, True))
    assert one and four and not set(one) & set(four)
    wide, direct = make_plan(spec, (1, 24, 24), "fft", 4), make_plan(spec, (1, 24, 24), "direct", 4)
    for problem in four.values():
        name = next(e for e in spec.conv_edges() if spec.edges[e].size == problem.kernel)
        assert problem.out_blocks == tuple(wide.blocks[spec.edges[name].output])
        assert problem.out_slabs == direct.edges[name].out_slabs
        assert 0 < time_layer(problem, "direct") < 5
    assert max(len(p.out_slabs) for p in four.values()) > 1


def test_engine_optimize_measures_once(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("ZNN_CACHE_DIR", str(tmp_path))
    net = Network.initialise(spec, seed=0)
    first = Engine(net, OUTSZ, "optimize", make_runner("synchronous"))
    assert set(first.plan.edges[e].mode for e in spec.conv_edges()) <= {"fft", "direct"}
    monkeypatch.setattr(autotune, "time_layer", _never)
    second = Engine(net, OUTSZ, {"c1": "direct", "c2": "optimize", "c3": "optimize"}, make_runner("synchronous"))
    assert second.plan.edges["c1"].mode == "direct"
    for e in ("c2", "c3"):
        assert second.plan.edges[e].mode == first.plan.edges[e].mode
    x = np.random.default_rng(0).normal(size=(2, *second.input_patch["in"])).astype(np.float32)
    assert np.allclose(first.forward({"in": x})["output"], second.forward({"in": x})["output"], atol=1e-5)


def test_dense_inference_times_the_phase_evaluator_and_remembers_it(spec, tmp_path, monkeypatch):
    from znn.pipeline.forward.autotune import inference_modes

    monkeypatch.setenv("ZNN_CACHE_DIR", str(tmp_path))
    path = tmp_path / "autotune.json"
    assert inference_modes(spec, OUTSZ, "direct") == "direct"  # a fixed mode measures nothing
    assert not path.exists()
    modes = inference_modes(spec, OUTSZ, "optimize", np.float32, spectra_cache=True)
    entries = json.loads(path.read_text())["entries"]
    assert sorted(modes) == ["c1", "c2", "c3"] and set(modes.values()) <= {"fft", "direct"}
    assert len(entries) == 3 and all("pass=phases@" in k for k in entries)
    assert sorted(e["mode"] for e in entries.values()) == sorted(modes.values())
    assert all(e["fft_s"] > 0 and e["direct_s"] > 0 for e in entries.values())
    # kernel spectra made per block are a different problem; a second call reads the file
    inference_modes(spec, OUTSZ, {"c1": "optimize", "c2": "fft", "c3": "direct"}, np.float32, spectra_cache=False)
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == 4 and sum("pass=phases-uncached@" in k for k in entries) == 1
    monkeypatch.setattr(autotune, "time_layer", _never)
    assert inference_modes(spec, OUTSZ, "optimize", np.float32, spectra_cache=True) == modes


def test_phase_timings_are_kept_per_threads_per_block(spec, tmp_path, monkeypatch):
    from znn.pipeline.forward.autotune import inference_modes

    monkeypatch.setenv("ZNN_CACHE_DIR", str(tmp_path))
    one = inference_modes(spec, OUTSZ, {"c1": "optimize", "c2": "fft", "c3": "fft"}, np.float32)
    two = inference_modes(spec, OUTSZ, {"c1": "optimize", "c2": "fft", "c3": "fft"}, np.float32, threads=2)
    keys = sorted(json.loads((tmp_path / "autotune.json").read_text())["entries"])
    assert one["c1"] in ("fft", "direct") and two["c1"] in ("fft", "direct")
    assert len(keys) == 2 and sum("|threads=2|" in k for k in keys) == 1 and sum("threads=" in k for k in keys) == 1
    problem = LayerProblem(3, 4, (9, 9, 9), (3, 3, 3), (2, 2, 2), "float32", True, training=False,
                           evaluator="phases", threads=2)
    assert time_layer(problem, "fft") > 0 and time_layer(problem, "direct") > 0


def test_phase_timing_runs_dilated_layers():
    problem = LayerProblem(3, 4, (9, 9, 9), (3, 3, 3), (2, 2, 2), "float32", True, training=False,
                           evaluator="phases")
    assert problem.pass_name.startswith("phases@") and problem.out_extent == (5, 5, 5)
    assert time_layer(problem, "fft") > 0 and time_layer(problem, "direct") > 0


N337_LIKE = """
nodes input
type input
size 1

edges c1
type conv
init msra
size 3,3,3
stride 1,1,1
input input
output a

nodes a
type transfer
function rectify_linear
size 80

edges c2
type conv
init msra
size 3,3,3
stride 1,1,1
input a
output b

nodes b
type transfer
function rectify_linear
size 80
"""


def test_dense_inference_layers_the_model_settles_are_not_timed(tmp_path):
    """An 80 -> 80 map layer over a large dense patch: the speed model puts direct convolution far behind the
    tiled phase FFT, so it is chosen without timing direct (minutes at this size); the 1 -> 80 map first layer is
    close and is timed. The choice is remembered as modelled."""
    spec = parse_network(N337_LIKE)
    path = tmp_path / "autotune.json"
    timer = FakeTimer()
    modes = resolve_modes(spec, (96, 96, 96), "optimize", np.float32, cache_path=path, timer=timer,
                          timed=TimedPass(training=False, evaluator="phases"))
    assert modes["c2"] == "fft"
    assert {p.maps_in for p, _ in timer.calls} == {1}
    assert path.read_text().count('"modelled": true') == 1


def _dense(maps_in: int, maps_out: int, extent, dilation, kernel=(3, 3, 3), threads: int = 2) -> LayerProblem:
    return LayerProblem(maps_in, maps_out, extent, kernel, dilation, "float32", True, training=False,
                        evaluator="phases", threads=threads)


@pytest.mark.parametrize("maps, extent, dilation, kernel", [((1, 8), (60, 44, 44), (1, 1, 1), (3, 3, 3)),
                                                            ((4, 2), (51, 51, 51), (4, 4, 4), (3, 3, 3)),
                                                            ((2, 3), (1, 90, 70), (1, 2, 2), (1, 3, 3))])
def test_a_dense_layer_is_timed_on_a_slab_of_its_own_tiles(monkeypatch, maps, extent, dilation, kernel):
    """time_layer of dense inference runs the FFT on one phase and a few tiles along the longest axis, at the
    layer's own tile shape (so FFTW plans what the run will use), and the direct convolution on the first of the
    layer's own output tiles (its dilation and halo), on the block's threads; the scales make the whole layer."""
    from znn.ops import conv as convops
    from znn.ops import phase as phaseops
    from znn.ops.phase import TileGeometry, choose_tile

    monkeypatch.setattr(autotune, "_SLAB_SECONDS", 1e-5)  # the smallest slab: a slab of a small layer
    problem = _dense(*maps, extent, dilation, kernel)
    w_shape = (*maps, *kernel)
    whole = TileGeometry.of(extent, w_shape, dilation, choose_tile(extent, w_shape, dilation))
    slab = autotune.Slab.of(problem)
    assert slab.tile == whole.shape and slab.tiles == 1
    assert slab.extent[slab.axis] < extent[slab.axis] and slab.axis == int(np.argmax(whole.out))
    assert slab.dilation[slab.axis] == 1 and all(slab.dilation[a] == dilation[a] for a in range(3) if a != slab.axis)
    sliced = TileGeometry.of(slab.extent, w_shape, slab.dilation, slab.tile)
    assert slab.fft_scale * sliced.count() == pytest.approx(whole.count()) and slab.fft_scale > 1
    every = convops.direct_tiles(whole.out, w_shape, dilation, 4)
    assert list(slab.direct_tiles) == every[:len(slab.direct_tiles)] and 2 <= len(slab.direct_tiles) < len(every)
    voxels = sum((z1 - z0) * (y1 - y0) * whole.out[2] for z0, z1, y0, y1 in slab.direct_tiles)
    assert slab.direct_scale * voxels == pytest.approx(np.prod(whole.out))

    seen = []

    def fft(x, w, d, wf=None, group_bytes=0, threads=1, tile=None, out=None, spectra=None):
        seen.append(("fft", x.shape[1:], tuple(d), tuple(tile), threads))
        return out

    def direct(x, w, d=(1, 1, 1), threads=1, out=None, tiles=None):
        seen.append(("direct", x.shape[1:], tuple(d), tiles, threads))
        return out

    monkeypatch.setattr(phaseops, "phase_conv_fft", fft)
    monkeypatch.setattr(convops, "conv_forward_direct", direct)
    assert time_layer(problem, "fft") > 0 and time_layer(problem, "direct") > 0
    assert seen == [("fft", slab.extent, slab.dilation, whole.shape, 2),
                    ("direct", tuple(extent), tuple(dilation), slab.direct_tiles, 2)]


def test_a_small_dense_layer_is_its_own_slab():
    problem = _dense(1, 2, (8, 8, 8), (1, 1, 1))
    slab = autotune.Slab.of(problem)
    assert slab.extent == (8, 8, 8) and slab.fft_scale == 1 and slab.direct_scale == 1


def test_choosing_conv_modes_says_what_it_times_and_how_long_it_took(tmp_path, caplog):
    """The one slow step of planning says what it does before it starts, and what it chose and how afterwards."""
    spec = parse_network(N337_LIKE)
    with caplog.at_level(logging.INFO, logger="znn.autotune"):
        resolve_modes(spec, (96, 96, 96), "optimize", np.float32, cache_path=tmp_path / "a.json", timer=FakeTimer(),
                      timed=TimedPass(training=False, evaluator="phases"))
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert said[0] == "choosing conv modes: timing c1 in fft and direct mode on slabs of the block"
    assert said[1].startswith("conv modes chosen in ") and said[1].endswith(": c1 fft (timed), c2 fft (modelled)")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="znn.autotune"):
        resolve_modes(spec, (96, 96, 96), "optimize", np.float32, cache_path=tmp_path / "a.json", timer=_never,
                      timed=TimedPass(training=False, evaluator="phases"))
    assert [r.getMessage() for r in caplog.records] == ["conv modes: c1 fft (cached), c2 fft (cached)"]
