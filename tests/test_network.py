"""Network parameters: ZNN initialisers (seeded), checkpoints in ZNN's h5 layout, `znn describe`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.shared import REFERENCE, need
from znn.errors import CheckpointError
from znn.io.checkpoint import load_checkpoint, load_statistics, save_checkpoint
from znn.io.netfile import load_network, parse_network
from znn.network import Network
from znn.ops.init import initialise

ZNN_CHECKPOINT = REFERENCE / "testsuit/boundary/gtruth/net_1_single.h5"


@pytest.mark.parametrize("name, args, check", [
    ("zero", (), lambda a: np.all(a == 0)),
    ("constant", (0.25,), lambda a: np.all(a == 0.25)),
    ("uniform", (), lambda a: a.min() >= -0.1 and a.max() <= 0.1 and a.min() < -0.09),
    ("uniform", (0.5,), lambda a: a.min() >= -0.5 and a.max() <= 0.5 and a.max() > 0.45),
    ("uniform", (1, 2), lambda a: a.min() >= 1 and a.max() <= 2),
    ("gaussian", (), lambda a: abs(a.mean()) < 1e-3 and abs(a.std() - 0.01) < 1e-3),
    ("gaussian", (3, 2), lambda a: abs(a.mean() - 3) < 0.1 and abs(a.std() - 2) < 0.1),
    ("bernoulli", (0.3,), lambda a: set(np.unique(a)) == {0, 1} and abs(a.mean() - 0.3) < 0.03),
    # xavier: uniform +-sqrt(6/(fan_in+fan_out)) = +-sqrt(6/(40+60))
    ("xavier", (), lambda a: a.max() <= np.sqrt(0.06) and a.max() > 0.95 * np.sqrt(0.06)),
    # msra: gaussian std sqrt(2/fan_in) = sqrt(2/40)
    ("msra", (), lambda a: abs(a.std() - np.sqrt(0.05)) < 0.01),
])
def test_initialisers(name, args, check):
    values = initialise(name, (4000,), np.random.default_rng(1), args, fan_in=40, fan_out=60)
    assert values.dtype == np.float32 and check(values)


def test_initialisation_is_seeded_per_group():
    spec = load_network(need(REFERENCE / "networks/N4_relu.znn"))
    a, b, c = Network.initialise(spec, 5), Network.initialise(spec, 5), Network.initialise(spec, 6)
    for name in spec.conv_edges():
        assert np.array_equal(a.kernels[name], b.kernels[name])
        assert not np.array_equal(a.kernels[name], c.kernels[name])
    assert a.kernels["conv2"].shape == (48, 48, 1, 5, 5)
    assert a.biases["nconv5"].shape == (200,)


def test_znn_checkpoint_loads_as_srini2d_with_its_kernels():
    path = need(ZNN_CHECKPOINT)
    spec = load_network(need(REFERENCE / "networks/srini2d.znn"))
    net = load_checkpoint(path, spec)
    with h5py.File(path) as f:
        saved = f["processing/znn/train/network/conv3/filters"][()]
        bias = f["processing/znn/train/network/nl2/biases"][()]
    assert np.array_equal(net.kernels["conv3"], saved) and np.array_equal(net.biases["nl2"], bias)
    assert net.kernels["conv1"].shape == (1, 10, 1, 7, 7) and net.kernels["conv6"].shape == (10, 2, 1, 7, 7)
    assert net.hyper["momentum"] == pytest.approx(0.9)
    # without a .znn, the spec saved in the file is used, and it is srini2d
    alone = load_checkpoint(path)
    assert alone.spec.layout().fov == (1, 37, 37) and alone.spec.conv_edges() == spec.conv_edges()


def test_save_then_load_is_identical(tmp_path: Path):
    spec = load_network(need(REFERENCE / "networks/VD2D3D.znn"))
    net = Network.initialise(spec, seed=3)
    for m in net.kernel_momentum.values():
        m[...] = np.random.default_rng(0).normal(size=m.shape)
    curve = {"train/it": np.arange(3), "train/err": np.array([0.3, 0.2, 0.1])}
    path = save_checkpoint(tmp_path / "net_current.h5", net, curve)
    back = load_checkpoint(path, spec)
    for group in ("kernels", "biases", "kernel_momentum", "bias_momentum"):
        mine, theirs = getattr(net, group), getattr(back, group)
        assert mine.keys() == theirs.keys()
        assert all(np.array_equal(mine[k], theirs[k]) for k in mine)
    assert np.array_equal(load_statistics(path)["train/err"], curve["train/err"])
    assert load_checkpoint(path).spec.inputs == ["input", "input-r"]
    assert [p.name for p in tmp_path.iterdir()] == ["net_current.h5"]  # no temporary left behind


def test_checkpoint_for_another_network_is_refused(tmp_path: Path):
    small = parse_network("nodes in\ntype input\nsize 1\nedges c\ntype conv\nsize 1,3,3\ninput in\noutput out\n"
                          "nodes out\ntype transfer\nsize 2\n")
    path = save_checkpoint(tmp_path / "n.h5", Network.initialise(small))
    bigger = parse_network("nodes in\ntype input\nsize 1\nedges c\ntype conv\nsize 1,5,5\ninput in\noutput out\n"
                           "nodes out\ntype transfer\nsize 2\n")
    with pytest.raises(CheckpointError, match=r"kernels of 'c' have shape \(1, 2, 1, 3, 3\).*\(1, 2, 1, 5, 5\)"):
        load_checkpoint(path, bigger)


@pytest.mark.parametrize("content, message", [(b"not an hdf5 file", "cannot be read as HDF5"), (None, "no /processing")])
def test_bad_checkpoint_files(tmp_path: Path, content, message):
    path = tmp_path / "bad.h5"
    if content is None:
        with h5py.File(path, "w") as f:
            f["x"] = 1
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


@pytest.mark.parametrize("name, fov", [("srini2d", "1,37,37"), ("N4_relu", "1,95,95")])
def test_describe_reports_the_fov(name, fov):
    path = need(REFERENCE / f"networks/{name}.znn")
    out = subprocess.run([sys.executable, "-m", "znn.cli", "describe", str(path), "--outsz", "1,10,10"],
                         capture_output=True, text=True, check=True).stdout
    assert f"FOV {fov}" in out
    patch = ",".join(str(int(v) + 9) if i else v for i, v in enumerate(fov.split(",")))
    assert f"input patch {patch}" in out
    assert "conv1" in out and "params" in out and "memory estimate" in out
