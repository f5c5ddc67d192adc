"""Shared fixtures. FFT plans are built with FFTW_ESTIMATE in tests: instant planning keeps the suite fast
(FFTW_MEASURE times every new shape), and the numbers are checked against references, not timed."""

from __future__ import annotations

import os

os.environ.setdefault("ZNN_FFTW_PLANNER", "FFTW_ESTIMATE")

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
