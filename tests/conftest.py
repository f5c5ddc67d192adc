"""Shared fixtures. FFT plans are built with FFTW_ESTIMATE in tests: instant planning keeps the suite fast
(FFTW_MEASURE times every new shape), and the numbers are checked against references, not timed. The per-user
caches (autotuned conv modes, FFTW wisdom) live in a temporary folder of the session, never the user's, and
subprocesses inherit it."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Any

os.environ.setdefault("ZNN_FFTW_PLANNER", "FFTW_ESTIMATE")
os.environ["ZNN_CACHE_DIR"] = tempfile.mkdtemp(prefix="znn-test-cache-")
atexit.register(shutil.rmtree, os.environ["ZNN_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402

if "PYTEST_XDIST_WORKER" in os.environ:
    # One test process per core (pytest-xdist): OpenBLAS's own threads would spin-wait on the core the other process
    # is using (the forward contract tests ran 2x slower so). Code that asks for threads (threadpoolctl, FFTW, task
    # threads) still gets them; the environment, which some tests read, is left as the user had it.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


def _xdist_group(item: pytest.Item) -> str | None:
    if "slurm" in getattr(item, "fixturenames", ()):
        return "slurm"
    if item.path.name == "test_contract.py":  # its slow per-voxel references are made once per process
        return "forward-contract"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With pytest-xdist (the suite's default, `--dist loadgroup` in pyproject.toml), every test that uses the
    one-node SLURM cluster runs in the same test process, so the machine starts one cluster, not one per process;
    and the forward contract's tests share one, which computes each network's reference once. The longest start
    first."""
    # the longest first (the end-to-end runs marked slow, then the forward contract's one group), so no process is
    # left with one of them at the end while the other idles; the rest keep their order
    items.sort(key=lambda item: 0 if item.get_closest_marker("slow") else
               1 if _xdist_group(item) == "forward-contract" else 2)
    for item in items:
        group = _xdist_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def local_client():
    """A real dask.distributed cluster on 127.0.0.1 with two single-threaded worker processes."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0",
                           processes=True)
    client = Client(cluster)
    yield client
    client.close()
    cluster.close()


# ------------------------------------------------------------------------------------------------ SLURM (issue #21)
@pytest.fixture(scope="session")
def slurm():
    """A real one-node SLURM cluster (munged, slurmctld, slurmd on 127.0.0.1; see tests/slurm.py), stopped with
    every job after the session. Skips, with the reason, when SLURM is not installed and cannot be installed."""
    import contextlib

    from tests.slurm import SlurmUnavailable, start_slurm

    with contextlib.ExitStack() as stack:
        try:
            running = stack.enter_context(start_slurm())
        except SlurmUnavailable as why:
            pytest.skip(f"no SLURM to test with: {why}")
        yield running


@pytest.fixture
def slurm_dask_cluster(slurm, tmp_path, monkeypatch):
    """A factory: ``slurm_dask_cluster(jobs=2)`` submits ``jobs`` dask-jobqueue batch jobs (one single-threaded
    worker each) to the `slurm` fixture's cluster, waits until they run and their workers joined, and returns a
    tests.slurm.SlurmDask (``.address`` for ``--scheduler``, ``.jobs``: the squeue lines, ``.sinfo``); keywords
    such as ``walltime="01:00:00"`` go to SLURMCluster. Everything is cancelled when the test ends, and the node is
    idle again for the next one. For a command: ``tests.slurm.run_znn(["train", JOB, "--replicas", "2"],
    slurm_dask_cluster(jobs=2).address, cwd=tmp_path)``."""
    from tests.slurm import SlurmDask, start_slurm_dask

    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))  # the sbatch and scancel of dask-jobqueue
    started: list[SlurmDask] = []

    def start(jobs: int = 2, timeout: float = 60, **overrides: Any) -> SlurmDask:
        started.append(start_slurm_dask(slurm, tmp_path / f"slurm-dask-{len(started)}", jobs, timeout, **overrides))
        return started[-1]

    yield start
    for one in reversed(started):
        one.close()
    slurm.cancel_all()
    slurm.wait_idle()
