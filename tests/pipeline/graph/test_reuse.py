"""A training step's graph built once and run again on each step's values (znn.pipeline.graph.reuse) computes what
a graph built for every step computes, bit for bit: on two inputs of different FOVs with a max filter and dropout,
an edge that does not learn (its kernel spectra from the cache), input blocks split for 4 workers, both conv modes;
and it is built once, again only when what it was built for changes."""

from __future__ import annotations

import numpy as np
import pytest

from znn.io.netfile import parse_network
from znn.network import Network
from znn.pipeline.graph.build import Hyper, step_data, step_graph
from znn.pipeline.graph.reuse import Reusable
from znn.pipeline.run.schedulers import make_runner
from znn.pipeline.train.engine import Engine

# two inputs of different FOVs, a max filter, dropout that drops (ratio 0.5: each step draws its own mask), and
# conv "cd", which does not learn (eta 0): from the second step on its kernel spectra come from the cache
NET = """
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
size 1,2,2
input b
output h
nodes h
type transfer
function tanh
size 3
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
ratio 0.5
input p
output d
nodes d
type sum
size 3
edges cd
type conv
init gaussian
init_args 0,0.5
size 1,2,2
eta 0
input d
output output
nodes output
type transfer
function logistics
size 2
"""


def _loss(step: int):
    """A different target each step (as each patch has its own labels): the loss is a value of the step."""
    def loss(outputs):
        cost, grads = 0.0, {}
        for name, y in outputs.items():
            target = np.linspace(-1, 1, y.size).reshape(y.shape).astype(y.dtype) * (step + 1)
            cost += float(np.sum((y - target) ** 2))
            grads[name] = 2 * (y - target)
        return cost, grads
    return loss


def _steps(mode: str, reuse: bool, scheduler: str, steps: int = 4):
    net = Network.initialise(parse_network(NET), seed=2)
    engine = Engine(net, (1, 4, 5), mode, make_runner(scheduler, 2), seed=5, plan_workers=4, reuse_graphs=reuse)
    rng = np.random.default_rng(0)
    costs, outputs, built = [], [], []
    for step in range(steps):
        inputs = {k: rng.normal(size=(net.spec.nodes[k].size, *p)) for k, p in engine.input_patch.items()}
        cost, out = engine.train_step(inputs, _loss(step), Hyper(0.05, 0.9, 0.001, patch_size=20.0))
        costs.append(cost)
        outputs.append(out["output"])
        built.append(engine._reusable.get("update"))
    return costs, outputs, net, built


@pytest.mark.parametrize("mode", ["fft", "direct"])
@pytest.mark.parametrize("scheduler", ["synchronous", "threads"])
def test_a_reused_step_graph_computes_what_one_built_per_step_does(mode, scheduler):
    want_costs, want_outputs, want_net, _ = _steps(mode, False, scheduler)
    costs, outputs, net, built = _steps(mode, True, scheduler)
    assert costs == want_costs
    for got, want in zip(outputs, want_outputs):
        assert np.array_equal(got, want)
    for edge in net.kernels:
        assert np.array_equal(net.kernels[edge], want_net.kernels[edge]), edge
        assert np.array_equal(net.kernel_momentum[edge], want_net.kernel_momentum[edge]), edge
    for node in net.biases:
        assert np.array_equal(net.biases[node], want_net.biases[node]), node
        assert np.array_equal(net.bias_momentum[node], want_net.bias_momentum[node]), node
    assert not np.array_equal(net.kernels["ca"], Network.initialise(parse_network(NET), seed=2).kernels["ca"])
    # built for the first step; again for the second, when cd's spectra came from the cache (fft); then kept
    assert built[2] is built[3] and (built[1] is built[2])
    assert (built[0] is not built[1]) == (mode == "fft")


def test_the_step_number_reaches_a_reused_graph_dropout_draws_a_new_mask():
    net = Network.initialise(parse_network(NET), seed=2)
    engine = Engine(net, (1, 4, 5), "direct", make_runner("synchronous"), seed=5)
    inputs = {k: np.ones((net.spec.nodes[k].size, *p)) for k, p in engine.input_patch.items()}
    frozen = Hyper(0.0, 0.0, 0.0)  # nothing learns: only the dropout mask can change the output
    first = engine.train_step(inputs, _loss(0), frozen)[1]["output"]
    second = engine.train_step(inputs, _loss(0), frozen)[1]["output"]
    assert not np.array_equal(first, second)


def test_a_hyperparameter_change_builds_the_graph_again():
    net = Network.initialise(parse_network(NET), seed=2)
    engine = Engine(net, (1, 4, 5), "direct", make_runner("synchronous"), seed=5)
    inputs = {k: np.ones((net.spec.nodes[k].size, *p)) for k, p in engine.input_patch.items()}
    engine.train_step(inputs, _loss(0), Hyper(0.05, 0.9, 0.0))
    first = engine._reusable["update"][1]
    engine.train_step(inputs, _loss(1), Hyper(0.05, 0.9, 0.0))
    assert engine._reusable["update"][1] is first
    engine.train_step(inputs, _loss(2), Hyper(0.025, 0.9, 0.0))  # annealed
    assert engine._reusable["update"][1] is not first


def test_a_run_without_one_of_the_graphs_values_stops():
    net = Network.initialise(parse_network(NET), seed=2)
    engine = Engine(net, (1, 4, 5), "direct", make_runner("synchronous"))
    inputs = {k: np.ones((net.spec.nodes[k].size, *p)) for k, p in engine.input_patch.items()}
    g, res = step_graph(engine.plan, net, inputs, _loss(0), Hyper(0.1, 0.9, 0.0), token="t")
    reusable = Reusable.of(g, [res["cost"]])
    values = step_data(engine.plan, net, inputs, _loss(0), token="t")
    assert set(values) >= reusable.data_keys
    del values[next(iter(reusable.data_keys))]
    with pytest.raises(KeyError, match="no value for"):
        reusable.graph(values)
