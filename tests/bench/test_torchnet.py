"""The PyTorch build of a network: same outputs as the sequential reference, same gradients as the engine."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.shared import REFERENCE, need  # noqa: E402
from znn.bench.torchnet import build_torch_net, to_tensors, torch_kernel, znn_kernel  # noqa: E402
from znn.errors import ShapeError  # noqa: E402
from znn.io.netfile import load_network, parse_network  # noqa: E402
from znn.network import Network  # noqa: E402
from znn.pipeline.forward.sequential import sequential_forward  # noqa: E402
from znn.pipeline.run.schedulers import make_runner  # noqa: E402
from znn.pipeline.train.engine import Engine  # noqa: E402

# every edge type: dilated conv and max_filter (strides), max_pool, crop, dropout, maxout, two inputs
ALL_EDGES = """
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
function_args 1.5,0.5
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
edges m1
type conv
init gaussian
init_args 0,0.5
size 1,2,2
input p
output q
edges cr
type crop
offset 0,1,1
input p
output r
nodes q
type transfer
function soft_sign
size 3
init uniform
nodes r
type sum
size 3
edges mq
type maxout
input q
output mx
edges mr
type maxout
input r
output mx
nodes mx
type sum
size 3
edges drop
type dropout
ratio 0.5
input mx
output d
nodes d
type sum
size 3
edges mp
type max_pool
size 1,2,1
input d
output e
nodes e
type transfer
function linear
function_args 2,0.5
size 3
edges out
type conv
init gaussian
init_args 0,0.5
size 1,1,2
input e
output output
nodes output
type transfer
function logistics
size 2
init uniform
"""

NETWORKS = [("networks/N4_relu.znn", (1, 3, 3)), ("networks/srini2d.znn", (1, 4, 4)),
            ("networks/VD2D3D.znn", (1, 2, 2)), ("networks/hd3d_strided.znn", (1, 1, 1)),
            ("networks/VD2D.znn", (1, 2, 2))]


def _inputs(spec, outsz, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=(spec.nodes[k].size, *v)).astype(dtype)
            for k, v in spec.layout(outsz).input_patch.items()}


def _torch_forward(net, outsz, inputs):
    module = build_torch_net(net, outsz, training=False)
    with torch.no_grad():
        out = module(to_tensors(inputs))
    return {k: v[0].numpy() for k, v in out.items()}


def _check(got, want, rtol):
    for name, w in want.items():
        assert got[name].shape == w.shape
        np.testing.assert_allclose(got[name], w, rtol=rtol, atol=rtol * np.abs(w).max())


@pytest.mark.parametrize("name, outsz", NETWORKS)
def test_forward_equals_sequential(name, outsz):
    spec = load_network(need(REFERENCE / name))
    net = Network.initialise(spec, seed=1, dtype=np.float64)
    inputs = _inputs(spec, outsz)
    _check(_torch_forward(net, outsz, inputs), sequential_forward(net, inputs, outsz), 1e-10)


def test_every_edge_type_and_float32():
    spec = parse_network(ALL_EDGES)
    outsz = (1, 4, 6)
    net = Network.initialise(spec, seed=2, dtype=np.float64)
    inputs = _inputs(spec, outsz, 3)
    _check(_torch_forward(net, outsz, inputs), sequential_forward(net, inputs, outsz), 1e-10)
    net32 = net.astype(np.float32)
    inputs32 = {k: v.astype(np.float32) for k, v in inputs.items()}
    got = _torch_forward(net32, outsz, inputs32)
    assert got["output"].dtype == np.float32
    _check(got, sequential_forward(net, inputs, outsz), 1e-4)


def test_gradients_equal_the_engine():
    spec = load_network(need(REFERENCE / "networks/N4_relu.znn"))
    outsz = (1, 3, 3)
    net = Network.initialise(spec, seed=4, dtype=np.float64)
    for b in net.biases.values():
        b[:] = np.random.default_rng(5).normal(0, 0.1, size=b.shape)  # every relu path partly active
    inputs = _inputs(spec, outsz, 6)
    weights = {n: np.random.default_rng(7).normal(size=(spec.nodes[n].size, *outsz)) for n in spec.outputs}

    def loss(outputs):
        return sum(float(np.sum(outputs[n] * weights[n])) for n in outputs), dict(weights)

    engine = Engine(net, outsz, "direct", make_runner("synchronous"))
    _, grads = engine.gradients(inputs, loss)
    module = build_torch_net(net, outsz, training=True)
    out = module(to_tensors(inputs))
    total = sum((out[n][0] * torch.from_numpy(weights[n])).sum() for n in out)
    total.backward()
    for edge, w in module.weight.items():
        np.testing.assert_allclose(znn_kernel(w.grad.numpy()), grads[edge], rtol=1e-9, atol=1e-12)
    for node, b in module.bias.items():
        np.testing.assert_allclose(b.grad.numpy(), grads[node], rtol=1e-9, atol=1e-12)


def test_weights_are_copies_and_round_trip():
    spec = parse_network(ALL_EDGES)
    net = Network.initialise(spec, seed=0)
    module = build_torch_net(net, (1, 4, 6))
    kernels, biases = module.znn_parameters()
    for edge, k in net.kernels.items():
        assert np.array_equal(kernels[edge], k)
        assert np.array_equal(znn_kernel(torch_kernel(k)), k)
        assert kernels[edge].dtype == k.dtype
    with torch.no_grad():
        next(iter(module.weight.values())).add_(1.0)
    assert np.array_equal(module.znn_parameters()[1]["h"], net.biases["h"])
    assert not np.array_equal(module.znn_parameters()[0]["ca"], net.kernels["ca"])  # net untouched


def test_wrong_input_shape_names_the_needed_patch():
    spec = load_network(need(REFERENCE / "networks/srini2d.znn"))
    net = Network.initialise(spec, seed=0)
    module = build_torch_net(net, (1, 4, 4))
    patch = module.input_patch["input"]
    with pytest.raises(ShapeError, match="the network needs"):
        module(torch.zeros((1, 1, patch[0], patch[1] + 1, patch[2])))
    assert module(torch.zeros((1, 1, *patch)))["output"].shape[2:] == (1, 4, 4)
