"""VD2D3D (inputs `input` and `input-r`) with a ZNN sample file, ``input = 1`` and ``input-r = 2``: `znn train` and
`znn forward` read it, each input node fed by its own volume."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.shared import REFERENCE, need
from znn.errors import SpecFileError
from znn.io.checkpoint import save_checkpoint
from znn.io.config import load_job
from znn.io.netfile import load_network
from znn.io.volume import read_volume, write_volume
from znn.network import Network
from znn.pipeline.jobs.forward import forward_job, sample_inputs
from znn.pipeline.jobs.train import load_samples, train_job

SPEC = """[image1]
fnames = raw.h5
pp_types = standard2D

[image2]
fnames = raw-r.h5
pp_types = standard2D

[label1]
fnames = labels.h5
pp_types = binary_class

[sample1]
input-r = 2
input = 1
output = 1
"""


def _job(folder: Path, spec: str = SPEC, **keys: str) -> Path:
    rng = np.random.default_rng(3)
    shutil.copy(need(REFERENCE / "networks" / "VD2D3D.znn"), folder / "net.znn")
    write_volume(folder / "raw.h5", rng.integers(0, 255, (2, 12, 13), dtype=np.uint8))
    write_volume(folder / "raw-r.h5", rng.integers(0, 100, (2, 12, 13), dtype=np.uint8))
    write_volume(folder / "labels.h5", rng.integers(0, 4, (2, 12, 13), dtype=np.uint8))
    (folder / "data.spec").write_text(spec)
    values = {"fnet_spec": "net.znn", "fdata_spec": "data.spec", "train_range": "1", "train_outsz": "1,2,2",
              "Max_iter": "1", "Num_iter_per_save": "1", "train_net_prefix": "out/net", "num_threads": "2",
              "forward_net": "net.h5", "forward_range": "1", "forward_outsz": "2,6,6", "output_prefix": "fwd/run",
              "is_bd_mirror": "yes", **keys}
    path = folder / "job.cfg"
    path.write_text("[parameters]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
    return path


def test_training_reads_node_named_inputs(tmp_path):
    job = load_job(_job(tmp_path))
    sample = load_samples(job, "train_range", np.float32)[0]
    for k, name in enumerate(("raw.h5", "raw-r.h5")):  # the network's input order: input, input-r
        raw = read_volume(tmp_path / name).astype(np.float64)
        assert np.corrcoef(sample.inputs[k][0].ravel(), raw.ravel())[0, 1] > 0.99
    trainer = train_job(job, progress=False, log=lambda _: None)
    assert trainer.iteration == 1 and (tmp_path / "out" / "net_current.h5").is_file()


def test_forward_reads_node_named_inputs(tmp_path):
    job = load_job(_job(tmp_path))
    net = Network.initialise(load_network(tmp_path / "net.znn"), seed=1)
    save_checkpoint(tmp_path / "net.h5", net)
    files = sample_inputs(job, net, 1)
    assert {n: [Path(f.path).name for f in fs] for n, fs in files.items()} == {"input": ["raw.h5"],
                                                                               "input-r": ["raw-r.h5"]}
    result = forward_job(job, progress=False)[0]
    assert read_volume(result.arrays["output"]).shape == (2, 2, 12, 13)


def test_a_missing_node_lists_the_network_nodes(tmp_path):
    job = load_job(_job(tmp_path, SPEC.replace("input-r = 2\n", "")))
    with pytest.raises(SpecFileError, match=r"data.spec:\d+: \[sample1\]: no key for network input node 'input-r';"
                                            r" the network's input nodes are input, input-r"):
        load_samples(job, "train_range", np.float32)
    net = Network.initialise(load_network(tmp_path / "net.znn"), seed=1)
    with pytest.raises(SpecFileError, match="'input-r'"):
        sample_inputs(job, net, 1)
