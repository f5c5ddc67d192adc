"""Task-graph engine: graphs equal a sequential evaluation, schedulers agree bit for bit, gradients are right,
and spectra are computed once and reused."""

from __future__ import annotations

import numpy as np
import pytest

from tests.shared import REFERENCE, need
from znn.io.netfile import load_network, parse_network
from znn.network import Network
from znn.ops import fft as fftops
from znn.pipeline.forward.sequential import sequential_forward
from znn.pipeline.graph.build import Hyper, forward_graph, task_priorities
from znn.pipeline.graph.plan import make_plan
from znn.pipeline.run.schedulers import make_runner
from znn.pipeline.train.engine import Engine

# (network, output patch, modes tested) — small patches keep the suite fast; benchmark networks (40 maps, up to
# 118^3 input) run in direct mode only, where their kernel spectra would not fit a test's memory.
NETWORKS = [
    ("networks/srini2d.znn", (1, 6, 6), ("fft", "direct")),
    ("networks/N4_relu.znn", (1, 3, 3), ("fft", "direct")),
    ("networks/VD2D.znn", (1, 2, 2), ("fft", "direct")),
    ("networks/VD2D3D.znn", (1, 2, 2), ("fft", "direct")),
    ("networks/hd3d_strided.znn", (1, 1, 1), ("fft", "direct")),
    ("benchmark/2d_10.znn", (1, 1, 1), ("direct",)),
    ("benchmark/3d_3.znn", (1, 1, 1), ("fft", "direct")),
    pytest.param("benchmark/3d_5.znn", (1, 1, 1), ("direct",), marks=pytest.mark.slow),
    pytest.param("benchmark/2d_20.znn", (1, 1, 1), ("direct",), marks=pytest.mark.slow),
]


def _inputs(engine: Engine, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    spec = engine.net.spec
    return {k: rng.normal(size=(spec.nodes[k].size, *v)) for k, v in engine.input_patch.items()}


def _square_loss(outputs):
    """A loss with a gradient that touches every output voxel differently."""
    cost, grads = 0.0, {}
    for name, y in outputs.items():
        target = np.linspace(-1, 1, y.size).reshape(y.shape).astype(y.dtype)
        cost += float(np.sum((y - target) ** 2))
        grads[name] = 2 * (y - target)
    return cost, grads


@pytest.mark.parametrize("name, outsz, modes", NETWORKS)
def test_graph_forward_equals_sequential(name, outsz, modes):
    spec = load_network(need(REFERENCE / name))
    net = Network.initialise(spec, seed=1, dtype=np.float64)
    for mode in modes:
        engine = Engine(net, outsz, mode, make_runner("threads", 2))
        inputs = _inputs(engine)
        got, want = engine.forward(inputs), sequential_forward(net, inputs, outsz)
        for node in spec.outputs:
            assert got[node].shape == (spec.nodes[node].size, *outsz)
            np.testing.assert_allclose(got[node], want[node], rtol=1e-10, atol=1e-10 * np.abs(want[node]).max())


@pytest.mark.parametrize("name, outsz", [("networks/srini2d.znn", (1, 6, 6)), ("networks/N4_relu.znn", (1, 3, 3)),
                                         ("networks/VD2D.znn", (1, 2, 2)), ("networks/VD2D3D.znn", (1, 2, 2)),
                                         ("networks/hd3d_strided.znn", (1, 1, 1))])
def test_fft_and_direct_gradients_agree(name, outsz):
    """The gradients of one training pass in FFT mode (dilated layers and the one-plane kernels of 2D-3D networks
    split into phases) equal direct mode's, in float64, to 1e-9 of each one's largest value."""
    spec = load_network(need(REFERENCE / name))
    net = Network.initialise(spec, seed=1, dtype=np.float64)
    results = {}
    for mode in ("fft", "direct"):
        engine = Engine(net.copy(), outsz, mode, make_runner("threads", 2), seed=3)
        results[mode] = engine.gradients(_inputs(engine, 0), _square_loss)
        if mode == "fft" and name != "networks/srini2d.znn":
            assert any(ep.phase_count > 1 for ep in engine.plan.edges.values()), "no edge is split into phases"
    (cost_f, grads_f), (cost_d, grads_d) = results["fft"], results["direct"]
    assert cost_f == pytest.approx(cost_d, rel=1e-10)
    for param, grad in grads_d.items():
        scale = max(np.abs(grad).max(), 1e-30)
        assert np.abs(grads_f[param] - grad).max() <= 1e-9 * scale, param


def _two_steps(net: Network, outsz, scheduler, mode="fft"):
    """Two steps (the second one's graph reused from the first, its momenta non-zero) and a forward pass."""
    net = net.copy()
    # one plan for every scheduler: a graph planned for two workers gives the same bits whatever runs it
    engine = Engine(net, outsz, mode, make_runner(scheduler, 2), seed=7, plan_workers=2)
    costs = []
    for step in range(2):
        cost, _ = engine.train_step(_inputs(engine, step), _square_loss, Hyper(1e-4, 0.9, 0.001, patch_size=float(np.prod(outsz))))
        costs.append(cost)
    out = engine.forward(_inputs(engine, 9))
    return costs, out, net


@pytest.mark.parametrize("name, outsz, mode", [
    ("networks/srini2d.znn", (1, 4, 4), "fft"), ("networks/N4_relu.znn", (1, 2, 2), "fft"),
    ("networks/VD2D3D.znn", (1, 2, 2), "fft"), ("networks/hd3d_strided.znn", (1, 1, 1), "fft"),
    ("networks/VD2D.znn", (1, 1, 1), "fft"), ("networks/N4_relu.znn", (1, 2, 2), "direct"),
    ("benchmark/3d_3.znn", (1, 1, 1), "direct")])
def test_schedulers_agree_bit_for_bit(name, outsz, mode, local_client):
    spec = load_network(need(REFERENCE / name))
    net = Network.initialise(spec, seed=3)
    results = {s: _two_steps(net, outsz, s, mode) for s in ("synchronous", "threads")}
    results["distributed"] = _two_steps(net, outsz, local_client, mode)
    base_costs, base_out, base_net = results["synchronous"]
    assert np.isfinite(base_costs).all() and base_costs[0] != base_costs[1]  # the network learned something
    for scheduler, (costs, out, trained) in results.items():
        assert costs == base_costs, scheduler
        for node in out:
            assert np.array_equal(out[node], base_out[node]), scheduler
        for edge in trained.kernels:
            assert np.array_equal(trained.kernels[edge], base_net.kernels[edge]), (scheduler, edge)
            assert np.array_equal(trained.kernel_momentum[edge], base_net.kernel_momentum[edge]), (scheduler, edge)
        for node in trained.biases:
            assert np.array_equal(trained.biases[node], base_net.biases[node]), (scheduler, node)


TWO_INPUTS = """
nodes a
type input
size 2
nodes b
type input
size 1
edges ca
type conv
init gaussian
init_args 0,0.5
size 1,3,3
input a
output h
edges cb
type conv
init gaussian
init_args 0,0.5
size 2,2,2
input b
output h
nodes h
type transfer
function tanh
size 3
init uniform
edges pool
type max_filter
size 1,2,2
stride 1,2,2
input h
output p
nodes p
type sum
size 3
edges drop
type dropout
ratio 1
input p
output d
nodes d
type sum
size 3
edges out
type conv
init gaussian
init_args 0,0.5
size 1,2,2
input d
output output
nodes output
type transfer
function logistics
size 2
init uniform
"""


@pytest.mark.parametrize("mode", ["fft", "direct"])
def test_whole_network_gradient_matches_finite_differences(mode):
    spec = parse_network(TWO_INPUTS)
    net = Network.initialise(spec, seed=2, dtype=np.float64)
    engine = Engine(net, (1, 2, 3), mode, make_runner("synchronous"))
    inputs = _inputs(engine, 4)
    weights = {n: np.random.default_rng(5).normal(size=(spec.nodes[n].size, 1, 2, 3)) for n in spec.outputs}

    def loss(outputs):
        return sum(float(np.sum(outputs[n] * weights[n])) for n in outputs), dict(weights)

    def cost():
        return loss(engine.forward(inputs))[0]

    _, grads = engine.gradients(inputs, loss)
    rng = np.random.default_rng(6)
    eps = 1e-6
    for group, params in (("kernels", net.kernels), ("biases", net.biases)):
        for name, array in params.items():
            for flat in rng.choice(array.size, size=min(6, array.size), replace=False):
                index = np.unravel_index(flat, array.shape)
                saved = array[index]
                array[index] = saved + eps
                engine.cache.clear()
                up = cost()
                array[index] = saved - eps
                engine.cache.clear()
                down = cost()
                array[index] = saved
                engine.cache.clear()
                numeric = (up - down) / (2 * eps)
                assert grads[name][index] == pytest.approx(numeric, rel=1e-6, abs=1e-8), (group, name, index)


FROZEN = """
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
size 1,3,3
init gaussian
eta 0
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


def test_spectra_are_computed_once_and_reused_until_updated():
    spec = parse_network(FROZEN)
    net = Network.initialise(spec, seed=0)
    engine = Engine(net, (1, 5, 5), "fft", make_runner("threads", 2))
    sizes = {e: (spec.nodes[spec.edges[e].input].size, spec.nodes[spec.edges[e].output].size) for e in spec.edges}
    fftops.reset_transform_counts()
    engine.train_step(_inputs(engine), _square_loss, Hyper(0.01, 0.9, 0))
    first = fftops.transform_counts()["forward"]
    # each input spectrum, each kernel spectrum and each output-gradient spectrum exactly once
    assert first == sum(i + i * o + o for i, o in sizes.values())
    kernel_c2 = net.kernels["c2"].copy()
    fftops.reset_transform_counts()
    engine.train_step(_inputs(engine, 1), _square_loss, Hyper(0.01, 0.9, 0))
    second = fftops.transform_counts()["forward"]
    # c2 does not learn (eta 0): its kernel spectra come from the cache; c1 and c3 were updated: recomputed
    assert second == sum(i + o for i, o in sizes.values()) + sum(i * o for e, (i, o) in sizes.items() if e != "c2")
    assert np.array_equal(net.kernels["c2"], kernel_c2)
    assert engine.cache.nbytes > 0 and ("c2", engine.plan.edges["c2"].fft_shape) in engine.cache


def test_inference_reuses_kernel_spectra_and_cache_can_be_off():
    spec = parse_network(FROZEN)
    net = Network.initialise(spec, seed=0)
    for enabled in (True, False):
        engine = Engine(net, (1, 5, 5), "fft", make_runner("synchronous"), spectra_cache=enabled)
        engine.forward(_inputs(engine))
        fftops.reset_transform_counts()
        engine.forward(_inputs(engine, 1))
        inputs_only = sum(spec.nodes[spec.edges[e].input].size for e in spec.edges)
        kernels = sum(np.prod(net.kernels[e].shape[:2]) for e in spec.edges)
        assert fftops.transform_counts()["forward"] == inputs_only + (0 if enabled else kernels)


def test_keys_are_deterministic():
    spec = parse_network(FROZEN)
    net = Network.initialise(spec, seed=0)
    plan = make_plan(spec, (1, 5, 5))
    shape = (2, *plan.layout.input_patch["in"])
    a = forward_graph(plan, net, {"in": np.ones(shape, np.float32)})
    b = forward_graph(plan, net, {"in": np.ones(shape, np.float32)})
    c = forward_graph(plan, net, {"in": np.zeros(shape, np.float32)})
    assert set(a.dsk) == set(b.dsk) and set(a.dsk) != set(c.dsk)
    assert all(k[0].split("-")[0] in ("kernel", "bias", "input", "xfft", "kfft", "conv", "node") for k in a.dsk)


def _step_graph_and_order(runner, priority: bool):
    """A training step of TWO_INPUTS on ``runner``; the keys in the order their tasks started (local schedulers)."""
    from dask.callbacks import Callback

    from znn.pipeline.graph.build import step_graph
    from znn.pipeline.train.engine import _get

    spec = parse_network(TWO_INPUTS)
    net = Network.initialise(spec, seed=0)
    plan = make_plan(spec, (1, 2, 2))
    engine = Engine(net, (1, 2, 2), "fft", runner)
    g, res = step_graph(plan, net, _inputs(engine), _square_loss, Hyper(0.01, 0.9, 0))
    started: list = []
    with Callback(pretask=lambda key, dsk, state: started.append(key)):
        _get(runner, g.dsk, {"cost": res["cost"], "kernels": res["kernels"], "biases": res["biases"]},
             task_priorities(g) if priority else None)
    return g, started


def test_priorities_by_depth_with_updates_lowest():
    g, _ = _step_graph_and_order(make_runner("synchronous"), True)
    priority = task_priorities(g)
    assert set(priority) == set(g.dsk)
    by_op: dict[str, list[int]] = {}
    for key, (op, _) in g.origin.items():
        by_op.setdefault(op.label, []).append(priority[key])
    forward = [p for op in ("xfft", "kfft", "conv") for p in by_op[op]]
    backward = [p for op in ("gpre", "gfft", "gx") for p in by_op[op]]
    assert max(by_op["update"]) < min(by_op["gw"]) < min(backward) <= max(backward) <= min(by_op["loss"])
    assert max(by_op["loss"]) < min(forward)
    # by depth, the longest chain of work left first: ca (depth 1) before out (depth 4) forward, after it backward;
    # the kernel spectra of out wait for the forward task of ca
    token = g.token
    assert priority[(f"conv-ca-{token}", 0)] > priority[(f"conv-out-{token}", 0)]
    assert priority[(f"kfft-out-{token}", 0, 0)] < priority[(f"conv-ca-{token}", 0)]
    assert priority[(f"gfft-ca-{token}", 0)] < priority[(f"gfft-out-{token}", 0)]


@pytest.mark.parametrize("scheduler", ["synchronous", "threads"])
def test_one_core_runs_the_backward_chain_before_any_update(scheduler):
    """On one core the ready task of highest priority always runs: every update and kernel gradient waits until
    the last task of the chain of input gradients has run. dask's own order (no priorities) interleaves them."""
    runner = make_runner(scheduler, 1)
    for priority in (True, False):
        g, started = _step_graph_and_order(runner, priority)
        ops = [g.origin[k][0].label for k in started if k in g.origin]
        last_chain = max(i for i, op in enumerate(ops) if op in ("gpre", "gfft", "gx"))
        first_update = min(i for i, op in enumerate(ops) if op in ("update", "gw"))
        assert (first_update > last_chain) == priority, (scheduler, priority, ops)


def test_priorities_reach_the_distributed_scheduler(local_client):
    """The scheduler orders a task by (-priority, ...): each task of a step arrives with the graph's priority."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    class Record(SchedulerPlugin):
        def __init__(self):
            self.seen = {}

        def transition(self, key, start, finish, *args, **kwargs):
            if finish == "processing":
                self.seen[key] = scheduler.tasks[key].priority[0]

    scheduler, plugin = local_client.cluster.scheduler, Record()
    scheduler.add_plugin(plugin, name="record-priorities")
    try:
        g, _ = _step_graph_and_order(make_runner(local_client), True)
    finally:
        scheduler.remove_plugin(name="record-priorities")
    assert len(plugin.seen) > 20 and all(key in g.dsk for key in plugin.seen)
    assert all(plugin.seen[key] == -task_priorities(g)[key] for key in plugin.seen)
    assert {g.origin[key][0].label for key in plugin.seen if key in g.origin} >= {"update", "gw", "gpre", "conv", "loss"}
