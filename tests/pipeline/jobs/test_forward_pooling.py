"""`znn forward` of networks with max_pool edges gives the dense sliding-window output: every output voxel is the
network applied to its own window (the network's sliding-window twin runs, not the strided pooled network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from znn.cli import main
from znn.io.checkpoint import save_checkpoint
from znn.io.netfile import parse_network
from znn.io.volume import read_volume, write_volume
from znn.network import Network
from znn.pipeline.forward.sequential import sequential_forward

POOLED_2D = """
nodes input
type input
size 1

edges conv1
type conv
init msra
size 1,3,3
input input
output hidden

nodes hidden
type transfer
function rectify_linear
size 2

edges pool
type max_pool
size 1,2,2
input hidden
output pooled

nodes pooled
type sum
size 2

edges conv2
type conv
init msra
size 1,2,2
input pooled
output output

nodes output
type transfer
function linear
size 1
"""

POOLED_3D = POOLED_2D.replace("size 1,3,3", "size 2,2,2").replace("size 1,2,2", "size 2,2,2")


def _forward(tmp_path: Path, net: Network, volume: np.ndarray, outsz: str, mirror: bool) -> np.ndarray:
    write_volume(tmp_path / "vol.h5", volume)
    save_checkpoint(tmp_path / "net.h5", net)
    (tmp_path / "data.spec").write_text("[image1]\nfnames = vol.h5\npp_types = none\n\n[sample1]\ninput = 1\n")
    keys = {"fdata_spec": "data.spec", "forward_net": "net.h5", "forward_range": "1", "forward_outsz": outsz,
            "output_prefix": "out/run", "is_bd_mirror": "yes" if mirror else "no", "scheduler": "synchronous"}
    job = tmp_path / "job.cfg"
    job.write_text("[parameters]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))
    assert main(["forward", str(job), "--transform", "none", "--quiet"]) == 0
    return read_volume(tmp_path / "out" / "run_sample1_output.zarr" / "output")


CASES = [(POOLED_2D, (1, 13, 14), "1,3,4"), (POOLED_3D, (7, 9, 8), "2,3,2")]


@pytest.mark.parametrize("text, shape, outsz", CASES, ids=["2d", "3d"])
@pytest.mark.parametrize("mirror", [False, True], ids=["valid", "mirrored"])
def test_every_voxel_of_a_pooling_network_is_the_network_on_its_own_window(tmp_path, text, shape, outsz, mirror):
    net = Network.initialise(parse_network(text), seed=3)
    rng = np.random.default_rng(4)
    net.biases = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in net.biases.items()}
    volume = rng.standard_normal(shape).astype(np.float32)
    dense = _forward(tmp_path, net, volume, outsz, mirror)
    fov = net.spec.layout((1, 1, 1)).fov
    # mirrored: the output has the volume's size and voxel p's window starts at p - (fov - 1) // 2; only voxels
    # whose window lies inside the volume are compared (the others see mirrored data)
    start = [(f - 1) // 2 if mirror else 0 for f in fov]
    valid = [s - f + 1 for s, f in zip(shape, fov)]
    assert dense.shape[1:] == (tuple(shape) if mirror else tuple(valid))
    assert np.prod(valid) > 8  # several blocks, several voxels per block
    for z, y, x in np.ndindex(*valid):
        window = volume[None, z:z + fov[0], y:y + fov[1], x:x + fov[2]]
        want = sequential_forward(net, {"input": window}, (1, 1, 1))["output"][:, 0, 0, 0]
        got = dense[:, z + start[0], y + start[1], x + start[2]]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"window at {(z, y, x)}")
