"""How a training step is split for W workers: enough tasks to fill W cores, and the same step (to rounding)
whatever W it was planned for and whatever runs it."""

from __future__ import annotations

import numpy as np
import pytest

from tests.pipeline.train.test_engine import TWO_INPUTS, _inputs, _square_loss
from tests.shared import REFERENCE, need
from znn.io.netfile import load_network, parse_network
from znn.network import Network
from znn.pipeline.graph.build import Hyper, step_graph, task_priorities
from znn.pipeline.graph.core import Op, Phase
from znn.pipeline.graph.plan import make_plan
from znn.pipeline.run.schedulers import make_runner
from znn.pipeline.train.engine import Engine
from znn.spec import ONE_TO_ONE

# every network shape the graph accepts: 2D with max filters, 2D-3D, strided 3D, pooling, two inputs of different
# FOVs with dropout; in both conv modes
CASES = [
    ("networks/N4_relu.znn", (1, 6, 6), "direct"),
    ("networks/N4_relu.znn", (1, 2, 2), "fft"),
    ("networks/VD2D3D.znn", (1, 3, 3), "direct"),
    ("networks/hd3d_strided.znn", (1, 2, 2), "direct"),
    ("benchmark/3d_3.znn", (2, 2, 2), "direct"),
    ("two-inputs", (1, 4, 5), "direct"),
    ("two-inputs", (1, 4, 5), "fft"),
]


def _spec(name: str):
    return parse_network(TWO_INPUTS) if name == "two-inputs" else load_network(need(REFERENCE / name))


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("name, outsz, mode", CASES)
def test_steps_planned_for_1_2_4_workers_agree_to_rounding(name, outsz, mode):
    """Gradients and two SGD steps of graphs planned for 1, 2 and 4 workers, run on the synchronous and threaded
    schedulers: in float64 every gradient and kernel agrees to 1e-10 of its largest value (so they differ by
    rounding only), in float32 the costs to 1e-5. (float32 arrays of deep networks differ by more: VD2D3D's
    first-layer gradients by up to 5e-4 of their largest value, where sums cancel.)"""
    spec = _spec(name)
    for dtype, tolerance in ((np.float64, 1e-10), (np.float32, 1e-5)):
        net = Network.initialise(spec, seed=4, dtype=dtype)
        results = {}
        for workers, scheduler, threads in ((1, "synchronous", 1), (2, "threads", 2), (4, "threads", 2)):
            engine = Engine(net.copy(), outsz, mode, make_runner(scheduler, threads), seed=3, plan_workers=workers)
            assert engine.plan.workers == workers
            cost, grads = engine.gradients(_inputs(engine, 0), _square_loss)
            hyper = Hyper(1e-3, 0.9, 0.001, patch_size=float(np.prod(outsz)))
            costs = [engine.train_step(_inputs(engine, s), _square_loss, hyper)[0] for s in (1, 2)]
            results[workers] = (cost, grads, costs, engine.net)
        base_cost, base_grads, base_costs, base_net = results[1]
        for workers, (cost, grads, costs, trained) in results.items():
            np.testing.assert_allclose([cost, *costs], [base_cost, *base_costs], rtol=tolerance)
            if dtype == np.float32:
                continue
            for param, grad in grads.items():
                assert _relative(grad, base_grads[param]) <= tolerance, (workers, param)
            for edge in trained.kernels:
                assert _relative(trained.kernels[edge], base_net.kernels[edge]) <= tolerance, (workers, edge)


def test_a_plan_for_16_workers_splits_every_stage_16_ways():
    """N4 at 1x100x100 planned for 16 workers: node groups of 48 maps in 12 to 16 blocks (fewer where the maps
    are small), every direct layer's forward, input-gradient and kernel-gradient work in 16 to 32 slabs; for one
    worker, one task each."""
    spec = load_network(need(REFERENCE / "networks/N4_relu.znn"))
    wide, narrow = make_plan(spec, (1, 100, 100), "direct", 16), make_plan(spec, (1, 100, 100), "direct", 1)
    for node, group in spec.nodes.items():
        if group.size == 48:
            assert 12 <= len(wide.blocks[node]) <= 16, node
        assert len(narrow.blocks[node]) <= 2, node
    for name in spec.conv_edges():
        ep = wide.edges[name]
        assert 16 <= len(ep.out_slabs) <= 32 and 16 <= len(ep.in_slabs) <= 32, name
        assert ep.out_slabs[0][0] == 0 and ep.out_slabs[-1][1] == ep.out_extent[ep.slab_axis]
        assert ep.in_slabs[-1][1] == ep.need[ep.slab_axis]
        assert len(narrow.edges[name].out_slabs) == 1


def test_every_task_has_an_operation_and_a_phase():
    """Priorities hang on the operation's phase: backward tasks rank below the loss, kernel gradients and updates
    below every backward task; every one-to-one edge type has its forward operation."""
    spec = parse_network(TWO_INPUTS)
    net = Network.initialise(spec, seed=0)
    for mode in ("direct", "fft"):
        plan = make_plan(spec, (1, 2, 3), mode, 4)
        engine = Engine(net, (1, 2, 3), mode, make_runner("synchronous"), plan_workers=4)
        g, _ = step_graph(plan, net, _inputs(engine), _square_loss, Hyper(0.01, 0.9, 0))
        priority = task_priorities(g)
        tasks_by_phase: dict[Phase, list[int]] = {}
        for key, (op, _) in g.origin.items():
            assert isinstance(op, Op)
            tasks_by_phase.setdefault(op.phase, []).append(priority[key])
        assert max(tasks_by_phase[Phase.UPDATE]) < min(tasks_by_phase[Phase.KERNEL_GRADIENT])
        assert max(tasks_by_phase[Phase.KERNEL_GRADIENT]) < min(tasks_by_phase[Phase.BACKWARD])
        assert max(tasks_by_phase[Phase.BACKWARD]) < min(tasks_by_phase[Phase.LOSS])
        assert max(tasks_by_phase[Phase.LOSS]) < min(tasks_by_phase[Phase.FORWARD])
    for edge_type in ONE_TO_ONE:
        assert Op.of_edge(edge_type).phase is Phase.FORWARD


@pytest.mark.parametrize("name, outsz", [("networks/N4_relu.znn", (1, 4, 4)), ("two-inputs", (1, 4, 5))])
def test_fft_task_counts_are_the_builders(name, outsz):
    """What the autotuner multiplies one timed task of each operation by (fft_edges.task_counts) is how many the
    FFT builder makes, per edge, for a plan split for 1 and for 8 workers: a training step, and a forward pass with
    the kernel spectra cached."""
    from znn.pipeline.graph.build import forward_graph
    from znn.pipeline.graph.cache import SpectraCache
    from znn.pipeline.graph.fft_edges import task_counts

    spec = _spec(name)
    net = Network.initialise(spec, seed=0)
    for workers in (1, 8):
        plan = make_plan(spec, outsz, "fft", workers)
        engine = Engine(net, outsz, "fft", make_runner("synchronous"), plan_workers=workers)
        cache = SpectraCache()
        step, _ = step_graph(plan, net, _inputs(engine), _square_loss, Hyper(0.01, 0.9, 0))
        for edge, kspec in forward_graph(plan, net, _inputs(engine), cache=cache).new_kspec.items():
            # stand-ins: the graph is built, not run
            cache.put(edge, plan.edges[edge].transform_shape, [[np.zeros(1) for _ in row] for row in kspec])
        inference = forward_graph(plan, net, _inputs(engine), cache=cache)
        for g, training in ((step, True), (inference, False)):
            for edge in spec.conv_edges():
                made = [op for op, layer in g.origin.values() if layer == edge]
                want = task_counts(len(plan.blocks[spec.edges[edge].input]), len(plan.blocks[spec.edges[edge].output]),
                                   training=training, grad_input=spec.nodes[spec.edges[edge].input].type != "input",
                                   cached=not training)
                assert {op: made.count(op) for op in want} == want, (workers, edge, training)
                assert max(want.values()) >= 1
