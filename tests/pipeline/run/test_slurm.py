"""Dense inference on a real SLURM cluster (issue #21): the `slurm` fixture starts munged, slurmctld and slurmd on
127.0.0.1 (tests/slurm.py); dask-jobqueue's SLURMCluster submits the dask workers as SLURM batch jobs; `znn forward`
through them must write what a local cluster writes, bit for bit. Skips, with the reason, without SLURM."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import dask
import numpy as np
import pytest
import yaml

from tests.pipeline.run.test_cluster import TINY3D, _forward_job
from tests.shared import ROOT
from tests.slurm import Slurm, jobqueue_settings, run_znn, wait_for_jobs
from znn.io.netfile import load_network
from znn.io.volume import read_volume
from znn.network import Network

CLUSTER = ROOT / "workflows" / "cluster"
OUTPUT = Path("out") / "run_sample1_output.zarr" / "output"  # of _forward_job's output_prefix, in its folder


def _tiny_job(folder: Path) -> Path:
    folder.mkdir()
    net = Network.initialise(load_network(TINY3D), seed=21)
    vol = np.random.default_rng(21).integers(0, 255, (8, 32, 32), dtype=np.uint8)
    return _forward_job(folder, net, vol)  # blocks of 4x8x8: 32 of them


@pytest.fixture(scope="module")
def local_output(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """The tiny job's output on a local cluster (`--scheduler local`, 2 worker processes), what SLURM must give."""
    folder = tmp_path_factory.mktemp("local") / "job"
    job = _tiny_job(folder)
    run_znn(["forward", str(job), "--quiet"], "local", cwd=folder)
    return read_volume(folder / OUTPUT)


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("jobqueue_forward", CLUSTER / "jobqueue_forward.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_jobqueue_forward_on_slurm_equals_a_local_cluster(slurm: Slurm, local_output, tmp_path, monkeypatch):
    """workflows/cluster/jobqueue_forward.py, unchanged, with workflows/cluster/dask-config/jobqueue.yaml and only
    its site lines (cores, memory, the environment, 127.0.0.1) replaced: 2 SLURM jobs, one worker each."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    site = yaml.safe_load((CLUSTER / "dask-config" / "jobqueue.yaml").read_text())["jobqueue"]["slurm"]
    ours = jobqueue_settings(slurm, tmp_path / "logs", jobs=2)
    assert set(ours) - set(site) <= {"python"}, "jobqueue.yaml lacks a key the test sets"
    settings = {**site, **ours}
    (tmp_path / "logs").mkdir()
    job = _tiny_job(tmp_path / "slurm")
    seen: dict[str, Any] = {}

    def call(command: list[str], **kwargs: Any) -> int:  # the script's `znn forward ... --scheduler ADDRESS`
        seen["sinfo"], seen["jobs"] = slurm.sinfo(), wait_for_jobs(slurm, 2, timeout=30)
        assert command[:3] == ["znn", "forward", str(job)] and command[3] == "--scheduler"
        seen["address"] = command[4]
        # this checkout's znn in a fresh interpreter, whatever `znn` on PATH is
        done = run_znn([*command[1:3], *command[5:]], command[4], cwd=job.parent)
        print(done.stdout, done.stderr, file=sys.stderr)
        return done.returncode

    monkeypatch.setattr(subprocess, "call", call)
    import dask_jobqueue  # noqa: F401  first: its defaults, added on import inside dask.config.set, would go with it
    with dask.config.set({f"jobqueue.slurm.{key}": value for key, value in settings.items()}):
        script = _load_script()
        assert script.main(["slurm", str(job), "--jobs", "2", "--min-workers", "2", "--wait", "90"]) == 0
    print(f"\nsinfo: {seen['sinfo']}\nsqueue (dask-jobqueue's jobs):\n  " + "\n  ".join(seen["jobs"]))  # pytest -s
    print(f"znn forward --scheduler {seen['address']}")
    assert seen["address"].startswith("tcp://127.0.0.1:")
    assert " idle" not in seen["sinfo"] and seen["sinfo"].startswith(slurm.node)  # mixed or allocated
    running = [line for line in seen["jobs"] if " znn-worker RUNNING cpus=1 " in line]
    assert len(running) == 2, seen["jobs"]
    got = read_volume(job.parent / OUTPUT)
    np.testing.assert_array_equal(got, local_output)
    slurm.wait_idle(30)  # the script's cluster cancelled its jobs on the way out


def test_slurm_dask_cluster_fixture_runs_znn_commands_on_its_jobs(slurm_dask_cluster, local_output, tmp_path):
    """The fixture (and run_znn) a test of `znn train JOB --scheduler ADDRESS --replicas 2` would use: both SLURM
    jobs' workers run blocks, and the output equals a local cluster's."""
    from distributed import get_task_stream

    cluster = slurm_dask_cluster(jobs=2)
    print(f"\nsinfo: {cluster.sinfo}\nsqueue:\n  " + "\n  ".join(cluster.jobs))  # pytest -s shows them
    assert len(cluster.jobs) == 2 and all(" RUNNING " in line for line in cluster.jobs)
    job_ids = {line.split()[0] for line in cluster.jobs}
    seen = cluster.client.run(lambda: __import__("os").environ.get("SLURM_JOB_ID"))
    assert set(seen.values()) == job_ids  # each worker runs inside its own batch job
    job = _tiny_job(tmp_path / "slurm")
    with get_task_stream(cluster.client) as stream:
        run_znn(["forward", str(job), "--quiet"], cluster.address, cwd=job.parent)
    assert {task["worker"] for task in stream.data} == set(seen), "a worker ran no block"
    np.testing.assert_array_equal(read_volume(job.parent / OUTPUT), local_output)


def test_data_parallel_training_on_slurm_equals_a_local_cluster(slurm_dask_cluster, local_client, tmp_path):
    """`znn train JOB --replicas 2 --scheduler ADDRESS` with the two replicas in SLURM jobs' workers: the same
    checkpoint as the same run on a local cluster of two single-threaded workers (to float32 rounding)."""
    from distributed import get_task_stream

    from tests.pipeline.train.test_train import make_job
    from znn.io.checkpoint import load_checkpoint

    runs = {}
    cluster = slurm_dask_cluster(jobs=2)
    for name, address, client in (("slurm", cluster.address, cluster.client),
                                  ("local", local_client.scheduler.address, local_client)):
        job = make_job(tmp_path / name, Max_iter="4", Num_iter_per_test="2", Num_iter_per_save="2")
        with get_task_stream(client) as stream:
            done = run_znn(["train", str(job), "--replicas", "2"], address, cwd=job.parent)
        print(f"\n{name}:\n{done.stdout}{done.stderr}")  # pytest -s shows the run's notes
        replica_workers = {t["worker"] for t in stream.data if "replica_gradients" in str(t["key"])}
        assert len(replica_workers) == 2, stream.data  # each worker (each SLURM job) held a replica
        runs[name] = load_checkpoint(job.parent / "out" / "net_current.h5")
    print(f"sinfo: {cluster.sinfo}\nsqueue:\n  " + "\n  ".join(cluster.jobs))
    slurm_net, local_net = runs["slurm"], runs["local"]
    for edge, kernel in local_net.kernels.items():
        np.testing.assert_allclose(slurm_net.kernels[edge], kernel, rtol=1e-6, atol=1e-7, err_msg=edge)
    for node, bias in local_net.biases.items():
        np.testing.assert_allclose(slurm_net.biases[node], bias, rtol=1e-6, atol=1e-7, err_msg=node)
