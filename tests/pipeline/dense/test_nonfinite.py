"""Dense inference refuses an input volume with NaN or infinite voxels before it writes anything (they would
spread over whole slices of the output), found in the statistics pass, per chunk, for every preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.shared import ROOT
from znn.cli import main
from znn.errors import VolumeError
from znn.io.checkpoint import save_checkpoint
from znn.io.netfile import load_network
from znn.io.volume import write_volume
from znn.network import Network
from znn.pipeline.dense.inputs import InputFile
from znn.pipeline.dense.plan import DenseOptions, plan_dense
from znn.pipeline.dense.volume import DenseRequest, infer_volume

TINY3D = ROOT / "workflows" / "inference" / "tiny3d.znn"


def _volume() -> np.ndarray:
    vol = np.random.default_rng(1).random((6, 12, 12)).astype(np.float32)
    vol[2, 0, 0] = np.nan  # in the first chunk, but after the next one in C order
    vol[1, 9, 3] = np.inf  # the first in C order, in a later chunk (y 8..11)
    return vol


def test_forward_job_with_a_nan_voxel_exits_2_naming_the_file_and_writes_nothing(tmp_path, capsys):
    write_volume(tmp_path / "vol.h5", _volume())
    save_checkpoint(tmp_path / "net.h5", Network.initialise(load_network(TINY3D), seed=1))
    (tmp_path / "data.spec").write_text("[image1]\nfnames = vol.h5\npp_types = standard2D\n\n[sample1]\ninput = 1\n")
    (tmp_path / "job.cfg").write_text("[parameters]\nfdata_spec = data.spec\nforward_net = net.h5\nforward_range = 1\n"
                                      "forward_outsz = 2,4,4\noutput_prefix = out/run\nnum_threads = 1\n")
    assert main(["forward", str(tmp_path / "job.cfg"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("znn forward: error: "), err  # notes go to stdout
    assert "vol.h5" in err and "z 1, y 9, x 3" in err and "2 NaN or infinite values" in err, err
    assert not list(tmp_path.glob("out/*.zarr")), "a store was written for a refused input"


@pytest.mark.parametrize("pp", ["none", "standard2D", "standard3D", "symetric_rescale"])
@pytest.mark.parametrize("zrange, z", [("", 1), ("[1:5]", 1)])
def test_every_preprocessing_checks_the_volume_per_chunk(tmp_path, pp, zrange, z):
    path = str(tmp_path / "vol.zarr")
    write_volume(path, _volume(), chunks=(2, 8, 8))
    net = Network.initialise(load_network(TINY3D), seed=1)
    plan = plan_dense(net, {"input": [InputFile(path + zrange, pp)]}, DenseOptions((2, 4, 4)))
    with pytest.raises(VolumeError) as info:
        infer_volume(DenseRequest(plan, tmp_path / "out.zarr", progress=False))
    message = str(info.value)
    assert message.startswith(f"{path}{zrange}: input volume holds 2 NaN or infinite values, the first (inf) at "
                              f"channel 0, z {z}, y 9, x 3"), message
    assert not Path(tmp_path / "out.zarr").exists()


def test_integer_and_finite_volumes_run(tmp_path):
    net = Network.initialise(load_network(TINY3D), seed=1)
    for name, vol in (("int.zarr", np.arange(6 * 12 * 12, dtype=np.uint16).reshape(6, 12, 12)),
                      ("float.zarr", np.nan_to_num(_volume(), posinf=0.0))):
        write_volume(tmp_path / name, vol, chunks=(2, 8, 8))
        plan = plan_dense(net, {"input": [InputFile(str(tmp_path / name), "none")]}, DenseOptions((2, 4, 4)))
        result = infer_volume(DenseRequest(plan, tmp_path / f"out-{name}", progress=False))
        assert result.blocks_run > 0
