"""Where graphs run: synchronous (debugging), local threads (default) or a dask.distributed cluster.

Which one a command uses is decided here, by :func:`resolve_scheduler`, for every command alike: ``--scheduler``
on the command line, else the job file's ``scheduler`` key, else dask's configuration (``znn.scheduler``, e.g.
``DASK_ZNN__SCHEDULER=tcp://host:8786`` or a yaml file in ``~/.config/dask/``; then dask's own
``scheduler-address``), else ``threads``. A cluster started here (``local``) listens on 127.0.0.1 (dask config
``znn.local.host`` changes that); TLS comes from dask's ``distributed.comm.tls`` settings for ``tls://`` addresses.

This is where the limits of the process are set: when dask runs tasks in parallel, BLAS inside each task runs
single-threaded (threadpoolctl), so cores are never oversubscribed. How many threads one task's own kernels use is
the graph's decision, from the workers its plan was split for (``Graph.task_threads``: a stage with fewer tasks
than cores gives each several; the kernels split their work over Python threads, never BLAS's), and while a graph
runs on threads the GIL changes hands every :data:`GIL_SWITCH_S` (workers coming back from kernels do not wait
behind one running Python). Workers of a
cluster started here get the same limits through their environment, and dask settings for long single-threaded
tasks (:data:`WORKER_SETTINGS`).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import dask
from dask.base import annotate
from dask.callbacks import Callback, normalize_callback
from dask.local import get_sync
from dask.threaded import get as threaded_get
from distributed.diagnostics.plugin import WorkerPlugin
from threadpoolctl import threadpool_limits

from znn.environment import STARTING_ENVIRONMENT
from znn.environment import cores as cores  # re-exported: the one "0 threads = every core" rule
from znn.errors import ConfigError

SCHEDULERS = ("synchronous", "threads", "local")
_ALIASES = {"sync": "synchronous", "single-threaded": "synchronous", "threading": "threads"}
SCHEDULER_HELP = "synchronous, threads, local, or a scheduler address like tcp://127.0.0.1:8786"
# dask settings for the workers of a cluster started here; workflows/cluster/dask-config/workers.yaml holds the
# same for clusters started by hand (a test keeps the two equal). dask's defaults suit tasks of milliseconds; a znn
# task is one block or layer on one thread for 0.1 s to minutes, and these defaults only cost it time. Measured on
# workflows/cluster/scaling.znn (32^3 blocks, one thread): see workflows/cluster/README.md.
WORKER_SETTINGS: dict[str, Any] = {
    # BLAS and OpenMP single-threaded: one block per worker thread, cores never oversubscribed
    "distributed.nanny.pre-spawn-environ.OMP_NUM_THREADS": 1,
    "distributed.nanny.pre-spawn-environ.MKL_NUM_THREADS": 1,
    "distributed.nanny.pre-spawn-environ.OPENBLAS_NUM_THREADS": 1,
    # dask sets MALLOC_TRIM_THRESHOLD_=65536, which also fixes glibc's mmap threshold at 128 KiB: every array of
    # every block is then a fresh mmap whose pages fault in again (forward passes 1.5x slower); None unsets it
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    # the statistical profiler samples the compute thread's stack every 10 ms (the dashboard's Profile page)
    "distributed.worker.profile.enabled": False,
    # event-loop health checks every 20 ms and psutil readings every 500 ms in every scheduler, nanny and worker
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
}
_PRE_SPAWN = "distributed.nanny.pre-spawn-environ."
_UNSET_VARIABLES = [key[len(_PRE_SPAWN):] for key, value in WORKER_SETTINGS.items()
                    if key.startswith(_PRE_SPAWN) and value is None]
# A nanny writes its pre-spawn settings into the environment of the process that starts it (distributed's Nanny
# does os.environ.update), so after a cluster with dask's defaults this process holds MALLOC_TRIM_THRESHOLD_=65536,
# and the workers of every later cluster would inherit it: only a value the process had when znn was imported is
# the user's.


@dataclass
class Runner:
    """Runs a raw dask graph (dict) for some keys on one scheduler."""

    kind: str
    workers: int
    client: Any = None
    _cluster: Any = field(default=None, repr=False)
    _owns_client: bool = field(default=False, repr=False)
    # on a cluster: the worker addresses tasks may run on (None: any worker)
    only_workers: tuple[str, ...] | None = None

    def get(self, dsk: dict[Any, Any], keys: list[Any], priority: dict[Any, int] | None = None) -> list[Any]:
        """The values of ``keys`` of ``dsk``, in order; among ready tasks, those of higher ``priority`` (key ->
        number, every key of ``dsk``) start first: dask's own order breaks ties, and without it dask's order alone
        decides."""
        values: dict[Any, Any] = {}
        self.run(dsk, keys, values.__setitem__, priority)
        return [values[key] for key in keys]

    def run(self, dsk: dict[Any, Any], keys: list[Any], report: Callable[[Any, Any], None],
            priority: dict[Any, int] | None = None, threads_per_task: int = 1) -> None:
        """Compute ``keys`` of ``dsk`` wherever this runner runs, calling ``report(key, value)`` once per key as it
        finishes; nothing is kept here, so results that ``report`` drops are freed.

        In-process (synchronous, or ``workers // threads_per_task`` threads) BLAS stays single-threaded: parallelism
        comes from dask, and the same kernels then give the same bits everywhere (a multi-threaded GEMM may sum in
        another order). On a cluster each result is released once collected: the scheduler then forgets it, so a
        worker dying later costs only the tasks it was running (recomputed on another worker), not results already
        reported."""
        if not self.distributed:
            with single_threaded_kernels():
                self._run_here(dsk, keys, report, priority, max(1, self.workers // max(1, threads_per_task)))
            return
        from distributed import as_completed

        with annotate(priority=priority.get) if priority else nullcontext():
            # the scheduler calls a callable annotation with each key; a dict's own get needs no znn there
            futures = self.client.get(dsk, keys, sync=False, workers=self.only_workers)
        for future in as_completed(futures):
            value = future.result()
            future.release()
            report(future.key, value)

    def _run_here(self, dsk: dict[Any, Any], keys: list[Any], report: Callable[[Any, Any], None],
                  priority: dict[Any, int] | None, num_workers: int) -> None:
        # dask's local schedulers take explicit callbacks instead of the active ones, so those are passed on too
        reporter = _Reporter(keys, report)
        callbacks = [*Callback.active, normalize_callback(reporter)]
        if priority:
            callbacks.append(normalize_callback(PriorityOrder(priority)))
        if self.kind == "synchronous":
            values = get_sync(dsk, keys, callbacks=callbacks)
        else:
            with quick_gil_handoff() if num_workers > 1 else nullcontext():
                values = threaded_get(dsk, keys, num_workers=num_workers, callbacks=callbacks)
        reporter.finish(values)

    def on_workers(self, count: int) -> "Runner":
        """A runner for the first ``count`` workers (by address) of this cluster: the others stay idle. It shares
        this runner's client; closing it closes nothing. Tasks restricted to some workers are assigned to them as
        they are submitted, not queued for the next free one, so they can end unevenly; with every worker there
        is no restriction."""
        addresses = sorted(self.client.scheduler_info()["workers"])
        if not 0 < count <= len(addresses):
            raise ConfigError(f"cannot run on {count} of the cluster's {len(addresses)} workers")
        only = tuple(addresses[:count]) if count < len(addresses) else None
        return Runner("distributed", count, self.client, only_workers=only)

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
    def started_cluster(self) -> bool:
        """Whether this runner started its own cluster (``local``), which announced its dashboard already."""
        return self._cluster is not None

    @property
    def dashboard(self) -> str | None:
        return getattr(self.client, "dashboard_link", None) if self.client is not None else None

    def close(self) -> None:
        """Close the client and cluster this runner started (a client given to :func:`make_runner` stays open)."""
        if self.client is not None and self._owns_client:
            self.client.close()
        if self._cluster is not None:
            self._cluster.close()
        self.client = self._cluster = None

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Reporter(Callback):
    """Reports each wanted key's value as its task finishes (dask's local schedulers call ``posttask`` in the
    thread that runs the scheduler); :meth:`finish` reports the keys no task computed (values given in the graph)."""

    def __init__(self, keys: list[Any], report: Callable[[Any, Any], None]):
        super().__init__(posttask=self._posttask)  # type: ignore[no-untyped-call]
        self.keys = keys
        self.pending = set(keys)
        self.report = report

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        if key in self.pending:
            self.pending.discard(key)
            self.report(key, result)

    def finish(self, values: Any) -> None:
        for key, value in zip(self.keys, values):
            if key in self.pending:
                self.pending.discard(key)
                self.report(key, value)


class PriorityOrder(Callback):
    """Makes dask's local schedulers start the ready task of highest priority first.

    They keep ready tasks in a list ordered by ``dask.order`` and start the last one; after the first tasks are
    found and after each task finishes (when its dependents became ready) this re-sorts that list by priority.
    The sort is stable, so dask's order still decides between tasks of equal priority.
    """

    def __init__(self, priority: dict[Any, int]):
        super().__init__(start_state=self._sort, posttask=self._after_task)  # type: ignore[no-untyped-call]
        self.priority = priority

    def _sort(self, dsk: Any, state: dict[str, Any]) -> None:
        state["ready"].sort(key=self.priority.__getitem__)

    def _after_task(self, key: Any, result: Any, dsk: Any, state: dict[str, Any], worker_id: Any) -> None:
        self._sort(dsk, state)


class _WisdomPlugin(WorkerPlugin):
    """A dask worker plugin importing FFTW wisdom at worker start (and at registration)."""

    def __init__(self, wisdom: tuple[bytes, ...]):
        self.wisdom = wisdom

    def setup(self, worker: Any) -> None:
        import pyfftw

        from znn.ops import fft, wisdom

        wisdom.ensure_cache_loaded(fft.planner_effort())  # first, so the driver's plans win over the disk cache's
        with wisdom.PLANNER_LOCK:
            pyfftw.import_wisdom(self.wisdom)


def check_scheduler(value: str, where: str = "scheduler") -> str:
    """``value`` in canonical spelling (aliases such as ``sync`` resolved); ConfigError naming ``where`` if it is
    neither a known scheduler nor an address."""
    text = str(value).strip()
    text = _ALIASES.get(text, text)
    if text in SCHEDULERS or "://" in text:
        return text
    raise ConfigError(f"{where} = {value!r} is not a scheduler; use {SCHEDULER_HELP}")


def resolve_scheduler(cli_value: str | None = None, job_value: Any = None) -> str:
    """The scheduler a command runs on: ``cli_value`` (``--scheduler``), else the job file's ``scheduler`` key,
    else dask configuration ``znn.scheduler``, else dask's ``scheduler-address``, else ``threads``.

    ``job_value`` is the job's value (None when the job does not give one) or the :class:`~znn.io.config.Job`
    itself, whose ``scheduler`` counts only when the file sets the key (its built-in default does not hide dask's
    configuration). Returns ``synchronous``, ``threads``, ``local`` or an address; ConfigError for anything else.
    """
    if cli_value:
        return check_scheduler(cli_value, "--scheduler")
    job_text = _job_scheduler(job_value)
    if job_text:
        return check_scheduler(job_text, "scheduler (job file)")
    configured = dask.config.get("znn.scheduler", None)
    if configured:
        return check_scheduler(configured, "znn.scheduler (dask config)")
    address = dask.config.get("scheduler-address", None)
    if address:
        return check_scheduler(address, "scheduler-address (dask config)")
    return "threads"


def _job_scheduler(job: Any) -> str | None:
    if job is None or isinstance(job, str):
        return job or None
    ini = getattr(job, "ini", None)
    sections = getattr(ini, "sections", None)
    if sections is not None:  # a Job: only a key the file sets counts
        from znn.io.config import SECTION

        if "scheduler" not in sections.get(SECTION, {}):
            return None
    value = getattr(job, "values", {}).get("scheduler")
    return str(value) if value else None


def make_runner(scheduler: str | Any = "threads", num_threads: int = 0,
                note: Callable[[str], None] | None = None) -> Runner:
    """A runner for ``scheduler``: ``synchronous``, ``threads``, ``local`` (a multi-process cluster on
    127.0.0.1 with ``num_threads`` single-threaded workers), a scheduler address (``tcp://host:8786``) or a
    ``distributed.Client``. ``note`` says what was started (a local cluster's address; default: on stderr)."""
    n = cores(num_threads)
    if scheduler in (None, ""):
        scheduler = "threads"
    if isinstance(scheduler, str):
        scheduler = check_scheduler(scheduler)
    if scheduler == "synchronous":
        return Runner("synchronous", 1)
    if scheduler == "threads":
        return Runner("threads", n)
    from distributed import Client

    if isinstance(scheduler, Client):
        return Runner("distributed", len(scheduler.scheduler_info().get("workers", {})), scheduler)
    if scheduler == "local":
        return local_runner(n, note=note)
    try:
        client = Client(scheduler, timeout=dask.config.get("znn.connect-timeout", "10s"))
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"cannot reach the dask scheduler at {scheduler} ({exc}); start one with "
                          "`dask scheduler` (see workflows/cluster/) or use scheduler = local") from None
    return Runner("distributed", len(client.scheduler_info().get("workers", {})), client, _owns_client=True)


def _on_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def worker_settings() -> dict[str, Any]:
    """:data:`WORKER_SETTINGS` less the keys the user set: in a dask yaml file or ``DASK_*`` variable, or in this
    process to a value other than dask's default. What a user set wins."""
    defaults = dask.config.merge(*dask.config.defaults)
    files_and_environment = dask.config.collect()
    unset = object()

    def user_set(key: str) -> bool:
        return (dask.config.get(key, unset, config=files_and_environment) is not unset
                or dask.config.get(key, unset) != dask.config.get(key, unset, config=defaults)
                or key.startswith(_PRE_SPAWN) and STARTING_ENVIRONMENT.get(key[len(_PRE_SPAWN):]) is not None)

    return {key: value for key, value in WORKER_SETTINGS.items() if not user_set(key)}


def local_runner(n: int, tuned: bool = True, note: Callable[[str], None] | None = None) -> Runner:
    """A LocalCluster of ``n`` single-threaded worker processes; scheduler and dashboard on 127.0.0.1 (dask config
    ``znn.local.host`` to listen elsewhere). ``tuned=False`` leaves out :data:`WORKER_SETTINGS` (dask's defaults:
    ``znn bench scaling --settings`` compares the two)."""
    from distributed import Client, LocalCluster

    host = str(dask.config.get("znn.local.host", "127.0.0.1"))
    settings = worker_settings() if tuned else {}
    for name in _UNSET_VARIABLES:
        if settings.get(_PRE_SPAWN + name, "kept") is None:
            os.environ.pop(name, None)  # left here by the nanny of an earlier cluster, not set by the user
    with dask.config.set(settings):  # read by the scheduler and nannies here, passed on
        cluster = LocalCluster(n_workers=n, threads_per_worker=1,
                               host=host, dashboard_address=f"{host}:0", processes=True)
    client = Client(cluster)
    (note or _on_stderr)(f"local dask cluster: {n} single-threaded worker process(es), scheduler "
                         f"{cluster.scheduler_address}, dashboard {client.dashboard_link}")
    return Runner("distributed", n, client, cluster, _owns_client=True)


# The interpreter's switch interval while graphs run on threads. A worker coming back from a kernel (NumPy, BLAS
# and FFTW release the GIL) waits for the GIL until the worker holding it drops it, which one running Python
# between its kernels does only every switch interval (5 ms by default); the tasks make many short kernel calls,
# so at 5 ms the workers convoy behind each other. Interleaved steps at 2 threads on the development VM (AMD EPYC):
# VD2D3D 4x40x40 9-14% and N4_relu 1x100x100 7% shorter at 20 us than at 5 ms, N4_relu 1x256x256 unchanged.
GIL_SWITCH_S = 2e-5
_handoff_lock = threading.Lock()
_handoff_depth = [0, 0.0]  # graphs running with the short interval, and the interval before the first


@contextmanager
def quick_gil_handoff() -> Iterator[None]:
    """:data:`GIL_SWITCH_S` as the switch interval while inside (graphs running side by side share it; the last
    one out restores what was there before the first)."""
    with _handoff_lock:
        if _handoff_depth[0] == 0:
            _handoff_depth[1] = sys.getswitchinterval()
            sys.setswitchinterval(min(_handoff_depth[1], GIL_SWITCH_S))
        _handoff_depth[0] += 1
    try:
        yield
    finally:
        with _handoff_lock:
            _handoff_depth[0] -= 1
            if _handoff_depth[0] == 0:
                sys.setswitchinterval(_handoff_depth[1])


@contextmanager
def single_threaded_kernels() -> Iterator[None]:
    with threadpool_limits(limits=1):
        yield
