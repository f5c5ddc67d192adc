"""Network spec: every shared network parses, FOV and input patches worked out by hand, validation."""

from __future__ import annotations

import pytest

from tests.shared import REFERENCE, need
from znn.errors import NetworkSpecError, ShapeError
from znn.io.netfile import load_network, parse_network

# FOV (z, y, x) of every shared network, worked out by hand from the files:
# a window w at sparsity s adds (w-1)*s; a max_filter with stride 2 doubles the sparsity downstream;
# a max_pool of w multiplies the extent by w and leaves the sparsity unchanged.
HAND_FOV = {
    # six 7x7 convs at sparsity 1: 1 + 6*6
    "networks/srini2d.znn": (1, 37, 37),
    # from the output: conv6 1; conv5 1+2*16=33; pool4 +1*8=41; conv4 +3*8=65; pool3 +4=69; conv3 +3*4=81;
    # pool2 +2=83; conv2 +4*2=91; pool1 +1=92; conv1 +3=95
    "networks/N4_relu.znn": (1, 95, 95),
    # conv5 33; pool4 41; conv4b 57; conv4a 73; pool3 77; conv3b 85; conv3a 93; pool2 95; conv2b 99; conv2a 103;
    # pool1 104; conv1c (2x2, even) 105; conv1b 107; conv1a 109
    "networks/VD2D.znn": (1, 109, 109),
    # y,x: conv4c 17, conv4b 33, conv4a 49 (at sparsity 8), pool3 53, conv3b 61, conv3a 69, pool2 71, conv2b 75,
    # conv2a 79, pool1 80, conv1c 81, conv1b 83, conv1a 85; z: three 2-deep convs 4, pool3 2-deep 5
    "networks/VD2D3D.znn": (5, 85, 85),
    # max_pool network: conv5 (2,4,4); pool4 x2 (4,8,8); conv4 (5,11,11); pool3 x2 (10,22,22); conv3 (13,25,25);
    # pool2 x(1,2,2) (13,50,50); conv2 (13,53,53); pool1 (13,106,106); conv1 (13,111,111)
    "networks/hd3d_strided.znn": (13, 111, 111),
    # 3D benchmarks, k = kernel: 4 convs -> 1+4(k-1); pool x2; conv; pool x2; conv
    "benchmark/3d_3.znn": (42, 42, 42),  # 9 -> 18 -> 20 -> 40 -> 42
    "benchmark/3d_5.znn": (80, 80, 80),  # 17 -> 34 -> 38 -> 76 -> 80
    "benchmark/3d_7.znn": (118, 118, 118),  # 25 -> 50 -> 56 -> 112 -> 118
    # 2D benchmarks: y,x as above with k; z: kernels are 1 deep but the 2,2,2 pools double z twice -> 4
    "benchmark/2d_10.znn": (4, 175, 175),  # 37 -> 74 -> 83 -> 166 -> 175
    "benchmark/2d_20.znn": (4, 365, 365),  # 77 -> 154 -> 173 -> 346 -> 365
    "benchmark/2d_30.znn": (4, 555, 555),  # 117 -> 234 -> 263 -> 526 -> 555
    "benchmark/2d_40.znn": (4, 745, 745),  # 157 -> 314 -> 353 -> 706 -> 745
}

# Input patch for a larger output patch, by hand. Sparse (max_filter) networks: output + FOV - 1.
# max_pool networks: extents multiply through the pools.
HAND_INPUT_PATCH = {
    "networks/srini2d.znn": ((1, 5, 5), (1, 41, 41)),  # the patch saved in ZNN's testsuit checkpoint
    "networks/N4_relu.znn": ((1, 100, 100), (1, 194, 194)),
    "networks/VD2D.znn": ((1, 20, 30), (1, 128, 138)),
    "networks/VD2D3D.znn": ((3, 10, 10), (7, 94, 94)),
    # (2,3,3): conv5 (3,6,6); pool4 (6,12,12); conv4 (7,15,15); pool3 (14,30,30); conv3 (17,33,33);
    # pool2 (17,66,66); conv2 (17,69,69); pool1 (17,138,138); conv1 (17,143,143)
    "networks/hd3d_strided.znn": ((2, 3, 3), (17, 143, 143)),
    # 3d_3 at 2: 4,6,8,10 -> 20 -> 22 -> 44 -> 46
    "benchmark/3d_3.znn": ((2, 2, 2), (46, 46, 46)),
    # 2d_10 at (1,2,2): y 11,20,29,38 -> 76 -> 85 -> 170 -> 179; z 1 -> 2 -> 4
    "benchmark/2d_10.znn": ((1, 2, 2), (4, 179, 179)),
}


def test_every_shared_network_is_covered():
    root = need(REFERENCE)
    found = {str(p.relative_to(root)) for p in root.rglob("*.znn")}
    assert found == set(HAND_FOV)


@pytest.mark.parametrize("name", sorted(HAND_FOV))
def test_fov_matches_hand_computation(name):
    spec = load_network(need(REFERENCE / name))
    layout = spec.layout((1, 1, 1))
    for input_name in spec.inputs:
        assert layout.input_fov[input_name] == HAND_FOV[name]


@pytest.mark.parametrize("name", sorted(HAND_INPUT_PATCH))
def test_input_patch_matches_hand_computation(name):
    spec = load_network(need(REFERENCE / name))
    outsz, expected = HAND_INPUT_PATCH[name]
    layout = spec.layout(outsz)
    assert set(layout.input_patch.values()) == {expected}


def test_sparsity_of_n4():
    spec = load_network(need(REFERENCE / "networks/N4_relu.znn"))
    s = spec.sparsity()
    assert s["input"] == s["nconv1"] == (1, 1, 1)
    assert s["npool1"] == (1, 2, 2) and s["npool2"] == (1, 4, 4) and s["output"] == (1, 16, 16)


def test_vd2d3d_has_two_inputs_in_file_order():
    spec = load_network(need(REFERENCE / "networks/VD2D3D.znn"))
    assert spec.inputs == ["input", "input-r"]
    assert spec.outputs == ["output"]


def test_dense_resets_sparsity():
    spec = parse_network(_chain(pool="edges p\ntype max_filter\nsize 1,2,2\nstride 1,2,2\ninput a\noutput b\n",
                                dense_b=True))
    assert spec.sparsity()["b"] == (1, 1, 1)


def test_branches_take_the_larger_extent():
    text = """
nodes in
type input
size 1
edges big
type conv
size 1,5,5
input in
output out
edges small
type conv
size 1,3,3
input in
output out
nodes out
type transfer
size 2
"""
    spec = parse_network(text)
    assert spec.layout((1, 4, 4)).extent["in"] == (1, 8, 8)


def test_layout_rejects_empty_output_patch():
    spec = load_network(need(REFERENCE / "networks/srini2d.znn"))
    with pytest.raises(ShapeError, match="at least 1"):
        spec.layout((0, 5, 5))


def test_parameter_count_of_srini2d():
    spec = load_network(need(REFERENCE / "networks/srini2d.znn"))
    kernels = 49 * (1 * 10 + 4 * 10 * 10 + 10 * 2)
    assert spec.parameter_count() == kernels + 5 * 10 + 2


def _chain(pool: str, dense_b: bool = False) -> str:
    return f"""nodes in
type input
size 1
edges c
type conv
size 1,3,3
input in
output a
nodes a
type transfer
size 2
{pool}nodes b
type sum
size 2
{'dense 1' if dense_b else ''}
"""


def test_unknown_key_suggests_closest():
    with pytest.raises(NetworkSpecError, match=r"net.znn:3: .*unknown key 'sise'.*did you mean 'size'"):
        parse_network("nodes in\ntype input\nsise 1\n", "net.znn")


def test_network_error_is_also_a_value_error():
    with pytest.raises(ValueError):
        parse_network("size 1\n")
