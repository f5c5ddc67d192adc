"""Job mistakes found before any work: a forward_range sample that is missing is reported before the others are
computed; the message of an empty output says what helps; a prefix ending in a slash is a folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.shared import ROOT
from znn.errors import ShapeError, SpecFileError, ZnnFileNotFoundError
from znn.io.checkpoint import save_checkpoint
from znn.io.config import load_job
from znn.io.netfile import load_network
from znn.io.volume import write_volume
from znn.network import Network
from znn.pipeline.jobs.forward import forward_job

TINY3D = ROOT / "workflows" / "inference" / "tiny3d.znn"
SPEC = """[image1]
fnames = vol.h5
pp_types = standard3D

[image2]
fnames = {second}

[sample1]
input = 1

[sample2]
input = 2
"""


def _job(folder: Path, volume: np.ndarray | None = None, second: str = "vol.h5", **keys: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    vol = np.random.default_rng(0).integers(0, 255, (6, 10, 10), dtype=np.uint8) if volume is None else volume
    write_volume(folder / "vol.h5", vol, overwrite=True)
    save_checkpoint(folder / "net.h5", Network.initialise(load_network(TINY3D), seed=1))
    (folder / "data.spec").write_text(SPEC.format(second=second))
    values = {"fdata_spec": "data.spec", "forward_net": "net.h5", "forward_range": "1", "forward_outsz": "2,5,5",
              "output_prefix": "out/run", "is_bd_mirror": "yes", "num_threads": "2", **keys}
    path = folder / "job.cfg"
    path.write_text("[parameters]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
    return path


@pytest.mark.parametrize("forward_range, second, error, words", [
    ("1,7", "vol.h5", SpecFileError, r"no \[sample7\]"),
    ("1-2", "absent.h5", ZnnFileNotFoundError, "absent.h5 does not exist"),
])
def test_every_sample_of_forward_range_is_checked_before_any_is_computed(tmp_path, forward_range, second, error,
                                                                          words):
    job = load_job(_job(tmp_path, second=second, forward_range=forward_range))
    with pytest.raises(error, match=words):
        forward_job(job, progress=False)
    assert not (tmp_path / "out").exists()  # sample 1 was not computed first


def test_an_empty_output_says_what_helps(tmp_path):
    small = np.zeros((2, 4, 4), np.uint8)
    with pytest.raises(ShapeError, match="Set is_bd_mirror = yes"):
        forward_job(load_job(_job(tmp_path / "valid", small, is_bd_mirror="no")), progress=False)
    empty = np.zeros((0, 10, 10), np.uint8)
    with pytest.raises(ShapeError, match="no voxels") as caught:
        forward_job(load_job(_job(tmp_path / "mirrored", empty)), progress=False)
    assert "Set is_bd_mirror = yes" not in str(caught.value)  # it is on already


def test_an_output_prefix_ending_in_a_slash_is_a_folder(tmp_path):
    forward_job(load_job(_job(tmp_path, output_prefix="outdir/")), progress=False)
    assert (tmp_path / "outdir" / "sample1_output.zarr").is_dir()
    assert not list(tmp_path.glob("outdir_*"))
    forward_job(load_job(_job(tmp_path / "tif", output_prefix="outdir/", output_format="tif")), progress=False)
    assert (tmp_path / "tif" / "outdir" / "sample1_output.tif").is_file()


def test_a_training_prefix_ending_in_a_slash_is_a_folder(tmp_path):
    from tests.pipeline.train.test_train import make_job, run

    run(make_job(tmp_path, train_net_prefix="nets/", Max_iter="1", Num_iter_per_save="1", test_range=None))
    assert (tmp_path / "nets" / "net_current.h5").is_file()
    assert not list(tmp_path.glob("nets_*"))
