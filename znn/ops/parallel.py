"""Threads for kernels: split work over a shared pool and hold BLAS to one thread meanwhile.

NumPy's matmul and ufunc loops and FFTW's execute release the GIL, so Python threads give real parallelism for
work that BLAS does not thread by itself (many small matrix products, batched plans, passes over many maps). With
``threads=1`` the helpers run inline and change nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

from threadpoolctl import ThreadpoolController

__all__ = ["blas_single_threaded", "parallel_chunks", "parallel_map"]

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
_CONTROLLER: ThreadpoolController | None = None
T = TypeVar("T")
R = TypeVar("R")


def _pool(threads: int) -> ThreadPoolExecutor:
    with _POOLS_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="znn-ops")
            _POOLS[threads] = pool
        return pool


def _blas_controller() -> ThreadpoolController:
    global _CONTROLLER
    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER


@contextmanager
def blas_single_threaded() -> Iterator[None]:
    """BLAS on one thread while our own threads split the work (no oversubscription, no BLAS spin-waits).

    The limit is process-wide: it is meant for a call that owns the cores (``threads > 1``); tasks running
    side by side use ``threads=1`` and never enter here.
    """
    with _blas_controller().limit(limits=1, user_api="blas"):
        yield


def parallel_chunks(n: int, threads: int, work: Callable[[int, int], None], min_chunk: int = 1,
                    pieces_per_thread: int = 1) -> None:
    """Run ``work(start, stop)`` over contiguous pieces of ``range(n)`` on ``threads`` threads.

    NumPy's matmul and ufunc loops and FFTW's execute release the GIL, so Python threads give real
    parallelism for work that BLAS does not thread by itself (many small matrix products, batched plans).
    More pieces than threads balance the load when another process takes part of a core.
    """
    pieces = max(1, min(threads * pieces_per_thread, n // max(1, min_chunk)))
    if threads <= 1 or pieces == 1:
        work(0, n)
        return
    bounds = [round(i * n / pieces) for i in range(pieces + 1)]
    with blas_single_threaded():
        futures = [_pool(threads).submit(work, bounds[i], bounds[i + 1]) for i in range(pieces)]
        for future in futures:
            future.result()


def parallel_map(fn: Callable[[T], R], items: Sequence[T], threads: int) -> list[R]:
    """``[fn(item) for item in items]`` on ``threads`` threads (BLAS single-threaded meanwhile), in order."""
    if threads <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with blas_single_threaded():
        return list(_pool(threads).map(fn, items))
