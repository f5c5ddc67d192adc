"""Outputs, end to end through the `znn` command: an output never writes over an input of the same job, one run
per output store, and every mistake in an output's place is one line on stderr with exit status 2, found before
anything is written (the bytes of every input unchanged)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.pipeline.train.test_train import make_job
from tests.shared import ROOT
from znn.cli import main
from znn.io.checkpoint import save_checkpoint
from znn.io.netfile import load_network
from znn.io.volume import read_volume, write_volume
from znn.network import Network


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` made read-only (mode 555) for the block; skips the test where this user still writes there
    (root with CAP_DAC_OVERRIDE: nothing would be refused)."""
    folder.chmod(0o555)
    try:
        try:
            fd, probe = tempfile.mkstemp(dir=folder)
        except OSError:
            yield
            return
        os.close(fd)
        os.unlink(probe)
        pytest.skip("this user writes into read-only folders (root): nothing to refuse")
    finally:
        folder.chmod(0o755)

FORWARD_SPEC = """
[image1]
fnames = {raw}
pp_types = standard2D

[sample1]
input = 1
"""


def forward_job(folder: Path, raw: str = "train-raw.tif", **keys: str) -> Path:
    """A forward job over the tiny training volume with a saved random network; ``keys`` override job keys."""
    make_job(folder)
    save_checkpoint(folder / "net" / "net_current.h5", Network.initialise(load_network(folder / "net.znn"), seed=1))
    (folder / "forward.spec").write_text(FORWARD_SPEC.format(raw=raw))
    values = {"fnet_spec": "net.znn", "fdata_spec": "forward.spec", "forward_net": "net/net_current.h5",
              "output_prefix": "out/pred", "forward_outsz": "1,8,8", "forward_range": "1", "num_threads": "1",
              "is_bd_mirror": "yes", "scheduler": "synchronous", **keys}
    path = folder / "forward.cfg"
    path.write_text("[parameters]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
    return path


def hashes(folder: Path) -> dict[str, str]:
    """The bytes of every file under ``folder`` (hashed), by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> str:
    """Run ``znn argv``: exit status 2, one line on stderr holding each of ``words``, no traceback."""
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------- outputs never alias inputs
def _zarr_input(folder: Path) -> str:
    """The training volume as the zarr array the job's output store would be."""
    write_volume(folder / "out" / "pred_sample1_output.zarr" / "output", read_volume(folder / "train-raw.tif"))
    return "out/pred_sample1_output.zarr/output"


def _tif_input(folder: Path) -> str:
    write_volume(folder / "out" / "pred_sample1_output.tif", read_volume(folder / "train-raw.tif"))
    return "out/pred_sample1_output.tif"


def _h5_input(folder: Path) -> str:
    write_volume(folder / "out" / "pred_sample1_output.h5:/raw", read_volume(folder / "train-raw.tif"))
    return "out/pred_sample1_output.h5:/raw"


def _store_holding_input(folder: Path) -> str:
    write_volume(folder / "in.zarr" / "raw", read_volume(folder / "train-raw.tif"))
    return "in.zarr/raw"


def _symlinked_tif(folder: Path) -> str:
    _tif_input(folder)
    (folder / "link.tif").symlink_to(folder / "out" / "pred_sample1_output.tif")
    return "link.tif"


ALIASES = {  # case -> (make the input, job keys)
    "output store is the input zarr array": (_zarr_input, {}),
    "tif export onto the input": (_tif_input, {"output_format": "tif"}),
    "h5 export into the input file": (_h5_input, {"output_format": "h5"}),
    "output store inside the input's store": (_store_holding_input, {"output_prefix": "in.zarr/pred"}),
    "tif export onto a symlink of the input": (_symlinked_tif, {"output_format": "tif"}),
}


@pytest.mark.parametrize("case", sorted(ALIASES))
def test_forward_refuses_an_output_that_is_its_input(tmp_path, capsys, case):
    make_input, keys = ALIASES[case]
    make_job(tmp_path)
    raw = make_input(tmp_path)
    job = forward_job(tmp_path, raw=raw, **keys)
    before = hashes(tmp_path)
    refused(["forward", str(job), "--quiet"], capsys, "would write over", "forward.cfg", "output_prefix")
    assert hashes(tmp_path) == before


def test_forward_refuses_an_output_over_another_sample_of_the_range_before_computing_any(tmp_path, capsys):
    make_job(tmp_path)
    _tif_input(tmp_path)  # sample 2's input is where sample 1's tif export goes
    job = forward_job(tmp_path, output_format="tif", forward_range="1,2")
    spec = tmp_path / "forward.spec"
    spec.write_text(spec.read_text() + "\n[image2]\nfnames = out/pred_sample1_output.tif\npp_types = standard2D\n"
                    "\n[sample2]\ninput = 2\n")
    before = hashes(tmp_path)
    refused(["forward", str(job), "--quiet"], capsys, "sample 1 tif export", "sample 2's input volume")
    assert hashes(tmp_path) == before


def test_evaluate_json_onto_its_labels_is_refused(tmp_path, capsys):
    make_job(tmp_path)
    write_volume(tmp_path / "pred.tif", np.zeros((2, 24, 24), np.float32))
    for target in ("train-labels.tif", "pred.tif"):
        before = hashes(tmp_path)
        refused(["evaluate", str(tmp_path / "pred.tif"), str(tmp_path / "train-labels.tif"), "--json",
                 str(tmp_path / target)], capsys, "--json", "would write over", target)
        assert hashes(tmp_path) == before


def test_a_workflow_step_writing_its_scores_over_its_labels_is_refused_on_loading(tmp_path, capsys):
    make_job(tmp_path)
    write_volume(tmp_path / "pred.tif", np.zeros((2, 24, 24), np.float32))
    path = tmp_path / "wf.yaml"
    path.write_text("steps:\n  score: {run: evaluate, pred: pred.tif, labels: train-labels.tif, "
                    "out: ./train-labels.tif}\n")
    before = hashes(tmp_path)
    refused(["run", str(path), "--quiet"], capsys, "wf.yaml:2", "step 'score'", "would write over labels")
    assert hashes(tmp_path) == before


# --------------------------------------------------------------------------------------- output-path mistakes
def _plain_array_store(folder: Path) -> None:
    zarr.create_array(str(folder / "out" / "pred_sample1_output.zarr"), shape=(4, 4), dtype="f4")


def _store_is_a_file(folder: Path) -> None:
    (folder / "out").mkdir()
    (folder / "out" / "pred_sample1_output.zarr").write_text("not a store")


def _h5_target_is_a_folder(folder: Path) -> None:
    (folder / "out" / "pred_sample1_output.h5").mkdir(parents=True)


def _tif_target_is_a_folder(folder: Path) -> None:
    (folder / "out" / "pred_sample1_output.tif").mkdir(parents=True)


def _parent_is_a_file(folder: Path) -> None:
    (folder / "afile").write_text("a file, not a folder")


PLACES = {  # case -> (make the place, job keys, words of the message)
    "output store is a plain zarr array": (_plain_array_store, {}, ("is a zarr array",)),
    "output store is a file": (_store_is_a_file, {}, ("is a file, but a folder goes there",)),
    "h5 export target is a folder": (_h5_target_is_a_folder, {"output_format": "h5"}, ("is a folder",)),
    "tif export target is a folder": (_tif_target_is_a_folder, {"output_format": "tif"}, ("is a folder",)),
    "output prefix's parent is a file": (_parent_is_a_file, {"output_prefix": "afile/pred"},
                                         ("afile is a file, not a folder",)),
}


@pytest.mark.parametrize("case", sorted(PLACES))
def test_forward_output_place_mistakes_are_one_line(tmp_path, capsys, case):
    make_place, keys, words = PLACES[case]
    job = forward_job(tmp_path, **keys)
    make_place(tmp_path)
    before = hashes(tmp_path)
    refused(["forward", str(job), "--quiet"], capsys, "output_prefix", *words)
    assert hashes(tmp_path) == before


@pytest.mark.parametrize("fresh", [False, True])
def test_forward_into_a_read_only_folder_is_one_line(tmp_path, capsys, fresh):
    job = forward_job(tmp_path)
    if fresh:  # a finished store, made read-only, rerun with --fresh
        assert main(["forward", str(job), "--quiet"]) == 0
        capsys.readouterr()
        target = tmp_path / "out" / "pred_sample1_output.zarr"
    else:
        target = tmp_path / "out"
        target.mkdir()
    with read_only(target):
        before = hashes(tmp_path)
        refused(["forward", str(job), "--quiet", *(["--fresh"] if fresh else [])], capsys, "cannot write in")
        assert hashes(tmp_path) == before


def test_training_prefix_whose_parent_is_a_file_is_refused_before_training(tmp_path, capsys):
    job = make_job(tmp_path, train_net_prefix="afile/net")
    (tmp_path / "afile").write_text("a file")
    refused(["train", str(job), "--quiet"], capsys, "train_net_prefix", "afile: is a file")


def test_training_prefix_in_a_read_only_folder_is_refused_before_training(tmp_path, capsys):
    job = make_job(tmp_path)
    (tmp_path / "out").mkdir()
    with read_only(tmp_path / "out"):
        refused(["train", str(job), "--quiet"], capsys, "train_net_prefix", "cannot write in")


def test_workflow_state_file_that_is_a_folder_is_one_line(tmp_path, capsys):
    make_job(tmp_path)
    write_volume(tmp_path / "pred.tif", np.zeros((2, 24, 24), np.float32))
    path = tmp_path / "wf.yaml"
    path.write_text("steps:\n  score: {run: evaluate, pred: pred.tif, labels: train-labels.tif, out: s.json}\n")
    (tmp_path / "wf.state.json").mkdir()
    refused(["run", str(path), "--quiet"], capsys, "workflow state file", "is a folder")


def test_workflow_in_a_read_only_folder_is_one_line(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "wf.yaml"
    path.write_text("steps:\n  score: {run: evaluate, pred: p.tif, labels: l.tif, out: s.json}\n")
    with read_only(folder):
        refused(["run", str(path), "--quiet"], capsys, "workflow state file", "cannot write in")


def test_quickstart_out_naming_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    refused(["quickstart", "--out", str(tmp_path / "notes.txt"), "--max-iter", "1"], capsys, "--out",
            "is a file")
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------ one run per store
FIRST_RUN = """
import sys, time
from pathlib import Path
from znn.io.config import load_job
from znn.pipeline.jobs.forward import forward_job

def hold(setup):  # the run has planned its block: tell the test, then take a while
    Path(sys.argv[2]).write_text("planned")
    time.sleep(float(sys.argv[3]))

forward_job(load_job(sys.argv[1]), progress=False, on_setup=hold)
"""


def test_a_second_forward_on_the_same_store_is_refused_and_the_first_finishes_whole(tmp_path):
    job = forward_job(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    signal = tmp_path / "planned"
    first = subprocess.Popen([sys.executable, "-c", textwrap.dedent(FIRST_RUN), str(job), str(signal), "6"],
                             cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if signal.exists() or first.poll() is not None:
                break
            threading.Event().wait(0.1)
        assert signal.exists(), first.stderr.read() if first.stderr else ""
        second = subprocess.run([sys.executable, "-m", "znn.cli", "forward", str(job), "--fresh", "--quiet"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by another run" in lines[0] and f"pid {first.pid}" in lines[0], lines
    store = tmp_path / "out" / "pred_sample1_output.zarr"
    assert (store / "output" / "zarr.json").is_file() and (store / "znn-manifest" / "run.json").is_file()
    assert read_volume(f"{store}/output").shape[-3:] == (2, 24, 24)


KILLED_HOLDER = """
import os, signal, sys
from znn.io.locks import RunLock
RunLock(sys.argv[1], "test").__enter__()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, capsys):
    job = forward_job(tmp_path)
    lock = tmp_path / "out" / "pred_sample1_output.zarr.lock"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    dead = subprocess.run([sys.executable, "-c", KILLED_HOLDER, str(lock)], env=env, timeout=120)
    assert dead.returncode == -9 and lock.with_name(lock.name + ".json").is_file()  # died holding it
    assert main(["forward", str(job), "--quiet"]) == 0, capsys.readouterr().err
    assert not lock.with_name(lock.name + ".json").exists()  # released by the run that took it over
