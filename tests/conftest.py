"""Shared fixtures. FFT plans are built with FFTW_ESTIMATE in tests: instant planning keeps the suite fast
(FFTW_MEASURE times every new shape), and the numbers are checked against references, not timed. The per-user
caches (autotuned conv modes, FFTW wisdom) live in a temporary folder of the session, never the user's, and
subprocesses inherit it."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("ZNN_FFTW_PLANNER", "FFTW_ESTIMATE")
os.environ["ZNN_CACHE_DIR"] = tempfile.mkdtemp(prefix="znn-test-cache-")
atexit.register(shutil.rmtree, os.environ["ZNN_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402


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
