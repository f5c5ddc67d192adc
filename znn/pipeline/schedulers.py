"""Where graphs run: synchronous (debugging), local threads (default) or a dask.distributed cluster.

This is the one place that sets thread counts. When dask runs tasks in parallel, BLAS and FFTW inside each task
run single-threaded, so cores are never oversubscribed (threadpoolctl for BLAS; the ops' FFTs default to one
thread). Workers of a cluster started here get the same limits through their environment.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import dask
from distributed.diagnostics.plugin import WorkerPlugin
from threadpoolctl import threadpool_limits

from znn.errors import ConfigError

SCHEDULERS = ("synchronous", "threads", "local")
# Single-threaded BLAS/OpenMP in worker processes started by us (distributed sets these too by default).
_WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def cores(num_threads: int = 0) -> int:
    """``num_threads`` with ZNN's meaning: 0 or less means every core."""
    return num_threads if num_threads > 0 else (os.cpu_count() or 1)


@dataclass
class Runner:
    """Runs a raw dask graph (dict) for some keys on one scheduler."""

    kind: str
    workers: int
    client: Any = None
    _cluster: Any = field(default=None, repr=False)

    def get(self, dsk: dict[Any, Any], keys: Any) -> Any:
        # BLAS stays single-threaded inside tasks on every scheduler: parallelism comes from dask, and the same
        # kernels then give the same bits everywhere (a multi-threaded GEMM may sum in another order).
        if self.kind == "synchronous":
            with threadpool_limits(limits=1):
                return dask.get(dsk, keys)
        if self.kind == "threads":
            with threadpool_limits(limits=1):
                return dask.threaded.get(dsk, keys, num_workers=self.workers)
        return self.client.get(dsk, keys)

    @property
    def distributed(self) -> bool:
        return self.kind == "distributed"

    def share_fft_wisdom(self) -> None:
        """Give every worker (and any that joins later) the driver's FFTW wisdom.

        FFTW_MEASURE picks algorithms by timing them, so two processes planning on their own may pick different
        ones and round differently; with the driver's wisdom every worker builds the same plans and the numbers
        are identical to an in-process run.
        """
        if self.client is None:
            return
        import pyfftw

        self.client.register_plugin(_WisdomPlugin(pyfftw.export_wisdom()), name="znn-fftw-wisdom")

    @property
    def dashboard(self) -> str | None:
        return getattr(self.client, "dashboard_link", None) if self.client is not None else None

    def close(self) -> None:
        if self.client is not None and self._cluster is not None:
            self.client.close()
            self._cluster.close()
        self.client = self._cluster = None

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _WisdomPlugin(WorkerPlugin):  # type: ignore[misc]
    """A dask worker plugin importing FFTW wisdom at worker start (and at registration)."""

    def __init__(self, wisdom: tuple[bytes, ...]):
        self.wisdom = wisdom

    def setup(self, worker: Any) -> None:
        import pyfftw

        pyfftw.import_wisdom(self.wisdom)


def make_runner(scheduler: str | Any = "threads", num_threads: int = 0) -> Runner:
    """A runner for ``scheduler``: ``synchronous``, ``threads``, ``local`` (a multi-process cluster on
    127.0.0.1 with ``num_threads`` single-threaded workers), a scheduler address (``tcp://host:8786``) or a
    ``distributed.Client``."""
    n = cores(num_threads)
    if scheduler in ("synchronous", "sync", "single-threaded"):
        return Runner("synchronous", 1)
    if scheduler in ("threads", "threading", None, ""):
        return Runner("threads", n)
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        return Runner("distributed", len(scheduler.scheduler_info().get("workers", {})), scheduler)
    if scheduler == "local":
        with dask.config.set({"distributed.nanny.pre-spawn-environ": _WORKER_ENV}):
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0",
                                   processes=True)
        client = Client(cluster)
        return Runner("distributed", n, client, cluster)
    if isinstance(scheduler, str) and "://" in scheduler:
        try:
            client = Client(scheduler, timeout="10s")
        except OSError as exc:
            raise ConfigError(f"cannot reach the dask scheduler at {scheduler} ({exc}); start one with "
                              "`dask scheduler` or use scheduler = local") from None
        return Runner("distributed", len(client.scheduler_info().get("workers", {})), client)
    raise ConfigError(f"scheduler {scheduler!r} is not known; use synchronous, threads, local or an address "
                      "like tcp://127.0.0.1:8786")


@contextmanager
def single_threaded_kernels() -> Iterator[None]:
    with threadpool_limits(limits=1):
        yield
