"""`znn forward` in a fresh process: its notes (the memory cap, the sample's plan, progress) go to stdout and a
failure's message is the only line on stderr, with or without --quiet, so a script or scheduler that keeps stderr
sees the error and nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.shared import ROOT
from znn.io.checkpoint import save_checkpoint
from znn.io.netfile import load_network
from znn.io.volume import write_volume
from znn.network import Network

TINY3D = ROOT / "workflows" / "inference" / "tiny3d.znn"


def _job(folder: Path) -> Path:
    """A forward job over a volume with one NaN voxel: refused by the run after the plan is made and shown."""
    vol = np.random.default_rng(2).random((6, 12, 12)).astype(np.float32)
    vol[3, 5, 7] = np.nan
    write_volume(folder / "vol.h5", vol)
    save_checkpoint(folder / "net.h5", Network.initialise(load_network(TINY3D), seed=1))
    (folder / "data.spec").write_text("[image1]\nfnames = vol.h5\npp_types = standard3D\n\n[sample1]\ninput = 1\n")
    job = folder / "job.cfg"
    job.write_text("[parameters]\nfdata_spec = data.spec\nforward_net = net.h5\nforward_range = 1\n"
                   "forward_outsz = auto\noutput_prefix = out/run\nnum_threads = 1\nscheduler = threads\n")
    return job


@pytest.mark.parametrize("quiet", [False, True])
def test_a_failed_forward_writes_only_its_error_to_stderr(tmp_path, quiet):
    job = _job(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "ZNN_CACHE_DIR": str(tmp_path / "cache")}
    # a budget far above any machine's memory: the plan says in one line that it plans for what there is
    command = [sys.executable, "-m", "znn.cli", "forward", str(job), "--memory", "100TB"] + (["--quiet"] * quiet)
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("znn forward: error: "), done.stderr
    assert "vol.h5" in lines[0] and "NaN" in lines[0]
    assert "more than this machine can give" in done.stdout  # a warning: shown under --quiet too
    assert ("sample 1: output block" in done.stdout) is not quiet, done.stdout
    assert not list(tmp_path.glob("out/*.zarr")), "a store was written for a refused input"
