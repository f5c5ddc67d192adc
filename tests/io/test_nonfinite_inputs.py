"""NaN and infinity are refused where they enter through `znn.io`: sample volumes (images, labels, masks, test
samples), checkpoints, and the numbers of a job file, each error naming the file or key, the position and the
range."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from znn.errors import CheckpointError, ConfigError, VolumeError
from znn.io.checkpoint import NETWORK, load_checkpoint, save_checkpoint
from znn.io.config import parse_job
from znn.io.netfile import parse_network
from znn.io.samples import load_sample
from znn.io.specfile import load_spec
from znn.io.volume import write_volume
from znn.network import Network

SPEC = """
[image1]
fnames = raw.h5
pp_types = standard2D
[label1]
fnames = seg.h5
pp_types = binary_class
[mask1]
fnames = mask.h5
[image2]
fnames = raw2.h5[1:3]
pp_types = none
[sample1]
input = 1
output = 1
mask = 1
[sample2]
input = 2
"""


@pytest.fixture
def sample_files(tmp_path):
    rng = np.random.default_rng(0)
    write_volume(tmp_path / "raw.h5", rng.random((3, 6, 7)).astype(np.float32))
    write_volume(tmp_path / "seg.h5", rng.integers(0, 3, (3, 6, 7)).astype(np.float32))
    write_volume(tmp_path / "mask.h5", np.ones((3, 6, 7), np.float64))
    write_volume(tmp_path / "raw2.h5", rng.random((4, 6, 7)))
    (tmp_path / "data.spec").write_text(SPEC)
    return tmp_path


@pytest.mark.parametrize("name, sample, section", [("raw.h5", 1, "image1"), ("seg.h5", 1, "label1"),
                                                    ("mask.h5", 1, "mask1"), ("raw2.h5", 2, "image2")])
def test_a_nan_voxel_in_any_sample_volume_is_refused(sample_files, name, sample, section):
    spec = load_spec(sample_files / "data.spec")
    load_sample(spec, sample)  # all finite: loads
    from znn.io.volume import read_volume

    vol = read_volume(sample_files / name)
    vol[2, 4, 5] = np.nan
    vol[2, 5, 0] = np.inf
    write_volume(sample_files / name, vol, overwrite=True)
    with pytest.raises(VolumeError) as info:
        load_sample(load_spec(sample_files / "data.spec"), sample)
    message = str(info.value)
    assert f"[{section}]" in message and name in message, message
    # z counted in the file: for raw2.h5[1:3] the range's slice 1
    assert "z 2, y 4, x 5" in message and "2 NaN or infinite values" in message, message


def _tiny_network() -> Network:
    spec = parse_network("nodes input\ntype input\nsize 1\n\nedges conv1\ntype conv\nsize 1,2,2\ninput input\n"
                         "output output\n\nnodes output\ntype transfer\nfunction linear\nsize 2\n")
    return Network.initialise(spec, seed=0)


@pytest.mark.parametrize("group, key, index", [("conv1", "filters", (0, 1, 0, 1, 0)), ("output", "biases", (1,)),
                                               ("conv1", "momentum_vol", (0, 0, 0, 0, 1))])
def test_a_nan_parameter_in_a_checkpoint_is_refused(tmp_path, group, key, index):
    path = save_checkpoint(tmp_path / "net.h5", _tiny_network())
    with h5py.File(path, "r+") as f:
        data = f[f"{NETWORK}/{group}/{key}"]
        values = data[()]
        values[index] = np.nan
        data[...] = values
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "net.h5" in message and f"{group!r}" in message and f"{group}/{key}" in message, message
    assert f"index {index}" in message and "1 NaN or infinite value" in message, message


def test_a_nan_learning_rate_in_a_checkpoint_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "net.h5", _tiny_network())
    with h5py.File(path, "r+") as f:
        del f[f"{NETWORK}/conv1/eta"]
        f[f"{NETWORK}/conv1/eta"] = "nan"
    with pytest.raises(CheckpointError, match=r"net\.h5: .*conv1/eta is nan"):
        load_checkpoint(path)


@pytest.mark.parametrize("key, value, says", [
    ("eta", "nan", r"eta: 'nan' is not valid; expected a finite learning rate >= 0 .*\(not a finite number\)"),
    ("eta", "inf", r"eta: 'inf' is not valid.*not a finite number"),
    ("eta", "-0.1", r"eta: '-0.1' is not valid.*-0.1 is not >= 0\)"),
    ("momentum", "1", r"momentum: '1' is not valid; expected a number in \[0, 1\).*1 is outside \[0, 1\)"),
    ("momentum", "nan", r"momentum: 'nan' is not valid.*not a finite number"),
    ("anneal_factor", "0", r"anneal_factor: '0' is not valid; expected a factor in \(0, 1\]"),
    ("anneal_factor", "-inf", r"anneal_factor: '-inf' is not valid.*not a finite number"),
    ("weight_decay", "inf", r"weight_decay: 'inf' is not valid; expected a finite number >= 0"),
    ("weight_decay", "nan", r"weight_decay: 'nan' is not valid"),
    ("weight_decay", "20", r"weight_decay: eta \* weight_decay = 1; .*below 1 / eta = 20"),
])
def test_job_numbers_are_finite_and_in_range(key, value, says):
    text = "[parameters]\neta = 0.05\n" + ("" if key == "eta" else f"{key} = {value}\n")
    text = text.replace("eta = 0.05", f"eta = {value}") if key == "eta" else text
    with pytest.raises(ConfigError, match=r"job\.cfg:\d+: \[parameters\] " + says):
        parse_job(text, "job.cfg")


def test_job_numbers_in_range_load():
    assert parse_job("[parameters]\neta = 0\nweight_decay = 5\n", "job.cfg").eta == 0  # eta 0: weights kept
    job = parse_job("[parameters]\neta = 1e-4\nmomentum = 0\nanneal_factor = 1\nweight_decay = 0.5\n", "job.cfg")
    assert (job.eta, job.momentum, job.anneal_factor, job.weight_decay) == (1e-4, 0.0, 1.0, 0.5)
