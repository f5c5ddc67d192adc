"""What the property over mutated jobs (test_job_mutations.py) found, each pinned by itself: an h5 export onto an
existing file that is not HDF5 crashed after the whole run (h5py's traceback); a --json path ending in a slash was
written over the file of that name."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from tests.pipeline.jobs.test_job_mutations import (
    FORWARD_KEYS,
    FORWARD_SPEC,
    TINY3D,
    run_cli,
)
from znn.io.checkpoint import save_checkpoint
from znn.io.netfile import load_network
from znn.io.volume import write_volume
from znn.network import Network


def _forward_job(folder: Path) -> Path:
    write_volume(folder / "vol.h5", np.random.default_rng(0).integers(0, 255, (4, 8, 8), dtype=np.uint8))
    save_checkpoint(folder / "net.h5", Network.initialise(load_network(TINY3D), seed=1))
    (folder / "data.spec").write_text(FORWARD_SPEC.format(image="vol.h5"))
    keys = {**FORWARD_KEYS, "output_prefix": "pred", "output_format": "h5"}
    (folder / "job.cfg").write_text("[parameters]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))
    return folder / "job.cfg"


def test_an_h5_export_onto_a_file_that_is_not_hdf5_is_refused_before_any_work(tmp_path):
    job = _forward_job(tmp_path)
    target = tmp_path / "pred_sample1_output.h5"
    target.write_bytes(b"my notes, not a volume")
    status, stderr = run_cli(["forward", str(job), "--quiet"])
    assert status == 2 and stderr.count("\n") == 1, stderr
    assert f"sample 1 h5 export {target}: exists and is not an HDF5 file" in stderr and "output_prefix" in stderr
    assert target.read_bytes() == b"my notes, not a volume"
    assert not (tmp_path / "pred_sample1_output.zarr").exists()  # refused before the run


def test_an_h5_export_adds_its_dataset_to_an_existing_hdf5_file(tmp_path):
    job = _forward_job(tmp_path)
    with h5py.File(tmp_path / "pred_sample1_output.h5", "w") as f:
        f["kept"] = np.arange(3)
    assert run_cli(["forward", str(job), "--quiet"])[0] == 0
    with h5py.File(tmp_path / "pred_sample1_output.h5", "r") as f:
        assert sorted(f) == ["kept", "output"] and list(f["kept"][:]) == [0, 1, 2]


def test_a_json_path_ending_in_a_slash_is_refused(tmp_path):
    write_volume(tmp_path / "pred.tif", np.random.default_rng(3).random((2, 12, 12), dtype=np.float32))
    write_volume(tmp_path / "labels.tif", np.ones((2, 12, 12), np.uint32))
    (tmp_path / "notes.txt").write_text("keep me")
    for target in ("notes.txt/", "scores/"):
        status, stderr = run_cli(["evaluate", str(tmp_path / "pred.tif"), str(tmp_path / "labels.tif"),
                                  "--json", f"{tmp_path}/{target}"])
        assert status == 2 and stderr.count("\n") == 1, stderr
        assert f"--json {tmp_path}/{target}: ends in a slash, so it names a folder" in stderr
    assert (tmp_path / "notes.txt").read_text() == "keep me" and not (tmp_path / "scores").exists()
