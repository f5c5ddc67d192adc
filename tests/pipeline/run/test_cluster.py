"""Cluster deployment and fault tolerance of dense inference: which scheduler a command uses, atomic chunk writes,
and a real `dask scheduler` with two `dask worker` processes losing one to SIGKILL mid-run."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest

from tests.shared import ROOT
from znn.errors import ConfigError
from znn.io.atomic_store import PARTIAL_DIR, AtomicLocalStore, clear_partial
from znn.io.config import parse_job
from znn.io.netfile import load_network
from znn.io.volume import read_volume, write_volume
from znn.network import Network
from znn.pipeline.dense.manifest import MANIFEST_DIR
from znn.pipeline.dense.plan import DenseOptions, plan_dense
from znn.pipeline.dense.volume import DenseRequest, InferenceResult, infer_volume
from znn.pipeline.run.schedulers import make_runner, resolve_scheduler

TINY3D = ROOT / "workflows" / "inference" / "tiny3d.znn"
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "ZNN_FFTW_PLANNER": "FFTW_ESTIMATE"}


# ------------------------------------------------------------------------------------------------ which scheduler
def test_scheduler_resolution_order():
    unset = parse_job("[parameters]\nnum_threads = 2\n")
    given = parse_job("[parameters]\nscheduler = synchronous\n")
    assert resolve_scheduler(None, None) == resolve_scheduler(None, unset) == "threads"
    assert resolve_scheduler(None, given) == "synchronous"
    assert resolve_scheduler("tcp://10.0.0.1:8786", given) == "tcp://10.0.0.1:8786"  # the command line wins
    assert resolve_scheduler("sync", None) == "synchronous"
    with dask.config.set({"znn.scheduler": "local"}):
        assert resolve_scheduler(None, unset) == "local"  # the job's built-in default does not hide dask config
        assert resolve_scheduler(None, given) == "synchronous"
        assert resolve_scheduler("threads", given) == "threads"
    with dask.config.set({"scheduler-address": "tls://head:8786"}):
        assert resolve_scheduler(None, unset) == "tls://head:8786"
    with pytest.raises(ConfigError, match=r"--scheduler = 'procs'.*tcp://"):
        resolve_scheduler("procs", given)
    with pytest.raises(ConfigError, match=r"scheduler \(job file\) = 'thread'"):
        resolve_scheduler(None, parse_job("[parameters]\nscheduler = thread\n"))


def test_unreachable_address_says_how_to_start_a_scheduler():
    with dask.config.set({"znn.connect-timeout": "1s"}), pytest.raises(ConfigError, match="dask scheduler"):
        make_runner("tcp://127.0.0.1:9", 1)


# ------------------------------------------------------------------------------------------------ atomic writes
def _chunk_array(root: Path, **kw: Any) -> Any:
    import zarr

    return zarr.open_array(AtomicLocalStore(root), path="a", mode="a", shape=(4, 64, 64), chunks=(4, 32, 32),
                           dtype="float32", fill_value=0, **kw)


def test_interrupted_chunk_write_leaves_the_old_chunk_or_none(tmp_path, monkeypatch):
    import znn.io.atomic_store as atomic

    arr = _chunk_array(tmp_path / "s.zarr")
    old = np.full((4, 32, 32), 7, np.float32)
    arr[:, :32, :32] = old
    chunk = tmp_path / "s.zarr" / "a" / "c" / "0" / "0" / "0"
    before = chunk.read_bytes()

    def dies_halfway(path: Path, data: Any, fsync: bool) -> None:
        raw = bytes(memoryview(data).cast("B"))
        with open(path, "xb") as f:
            f.write(raw[: len(raw) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")  # the writer fails mid-chunk

    monkeypatch.setattr(atomic, "_write_all", dies_halfway)
    with pytest.raises(OSError, match="No space"):
        arr[:, :32, :32] = np.full((4, 32, 32), 9, np.float32)  # overwrite: the old chunk stays
    with pytest.raises(OSError, match="No space"):
        arr[:, 32:, 32:] = np.full((4, 32, 32), 9, np.float32)  # first write: no chunk appears
    assert chunk.read_bytes() == before
    assert not (chunk.parent.parent / "1" / "1").exists()
    assert not any((tmp_path / "s.zarr" / PARTIAL_DIR).iterdir())  # the half-written temporary file is gone
    monkeypatch.undo()
    back = read_volume(tmp_path / "s.zarr" / "a")
    np.testing.assert_array_equal(back[:, :32, :32], old)
    assert not back[:, 32:, 32:].any()
    assert not [p for p in (tmp_path / "s.zarr").rglob("*") if p.is_file() and "tmp" in p.name]


_WRITER = textwrap.dedent("""
    import sys, numpy as np, zarr
    from znn.io.atomic_store import AtomicLocalStore
    arr = zarr.open_array(AtomicLocalStore(sys.argv[1]), path="a", mode="r+")
    value = 1
    while True:
        for i in range(arr.shape[1] // arr.chunks[1]):
            arr[:, i * arr.chunks[1]:(i + 1) * arr.chunks[1]] = np.full((arr.shape[0], arr.chunks[1], *arr.shape[2:]),
                                                                        value, np.float32)
            print(value, flush=True)
            value += 1
""")


def test_writer_killed_mid_write_never_leaves_a_partial_chunk(tmp_path):
    import zarr

    store = tmp_path / "k.zarr"
    zarr.open_array(AtomicLocalStore(store), path="a", mode="w", shape=(1, 8, 512, 512), chunks=(1, 2, 512, 512),
                    dtype="float32", fill_value=0)  # 1 MiB chunks (compressed: a torn chunk would not decode)
    env = {**os.environ, **WORKER_ENV, "PYTHONPATH": str(ROOT)}
    for kill_after in (0.2, 0.35, 0.5):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(store)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        try:
            assert proc.stdout is not None
            proc.stdout.readline()  # one chunk written: the writer is in its loop
            time.sleep(kill_after)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        arr = zarr.open_array(store, path="a", mode="r")
        for i in range(4):
            chunk = arr[:, 2 * i:2 * i + 2]  # decodes, and holds one write's value throughout
            assert np.unique(chunk).size == 1, f"chunk {i} mixes writes after kill at {kill_after} s"
    clear_partial(store)
    assert not (store / PARTIAL_DIR).exists()


_MARKER_WRITER = textwrap.dedent("""
    import os, sys, time
    from znn.pipeline.dense.manifest import Manifest
    manifest = Manifest(sys.argv[1], "digest", "layout")
    manifest.begin({})
    def stalls(fd):  # the marker's bytes are in the temporary file: hold the writer here until it is killed
        print("writing", flush=True)
        time.sleep(60)
    os.fsync = stalls
    manifest.mark_done((0, 3, 1))
""")


def test_worker_killed_while_marking_a_block_done_leaves_nothing_in_done(tmp_path):
    store = tmp_path / "m.zarr"
    env = {**os.environ, **WORKER_ENV, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _MARKER_WRITER, str(store)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"writing\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert list((store / MANIFEST_DIR / "done").iterdir()) == []  # no marker, and no stray temporary file
    assert len(list((store / PARTIAL_DIR).iterdir())) == 1  # the temporary marker, cleared by the next run
    clear_partial(store)
    assert not (store / PARTIAL_DIR).exists()


# ------------------------------------------------------------------------------------------------ worker loss
def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **WORKER_ENV, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _address(scheduler_file: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "dask scheduler exited"
        try:
            return str(json.loads(scheduler_file.read_text())["address"])
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)
    raise TimeoutError("dask scheduler did not write its scheduler file")


def _infer(net: Network, inputs: dict, store: Path, outsz: tuple[int, int, int], **request: Any) -> InferenceResult:
    """A dense run of ``net`` in blocks of ``outsz`` (the call sites of the tests below)."""
    return infer_volume(DenseRequest(plan_dense(net, inputs, DenseOptions(outsz)), store, **request))


class _KillAfter:
    """A progress reporter for infer_volume that SIGKILLs a worker process once ``after`` blocks are reported."""

    def __init__(self, after: int, kill: Any):
        self.after, self.kill, self.seen, self.killed_at = after, kill, 0, None

    def update(self, n: int = 1, **_: Any) -> None:
        self.seen += n
        if self.killed_at is None and self.seen >= self.after:
            self.killed_at = self.seen
            self.kill()

    def close(self) -> None:
        pass


def test_worker_killed_mid_run_gives_the_single_process_output(tmp_path):
    from distributed import Client

    net = Network.initialise(load_network(TINY3D), seed=11)
    vol = np.random.default_rng(5).integers(0, 255, (24, 40, 40), dtype=np.uint8)
    write_volume(tmp_path / "in.zarr", vol)
    files = {"input": [str(tmp_path / "in.zarr")]}
    outsz = (4, 8, 8)
    total = 6 * 5 * 5
    want = _infer(net, files, tmp_path / "single.zarr", outsz, scheduler="synchronous", progress=False)

    procs: list[subprocess.Popen[bytes]] = []
    client = None
    try:
        sched_file = tmp_path / "scheduler.json"
        procs.append(_spawn(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                             "--no-dashboard", "--scheduler-file", str(sched_file)], tmp_path / "scheduler.log"))
        address = _address(sched_file, procs[0])
        assert address.startswith("tcp://127.0.0.1:")
        for name in ("w1", "w2"):
            procs.append(_spawn(["distributed.cli.dask_worker", "--scheduler-file", str(sched_file), "--nthreads", "1",
                                 "--no-nanny", "--host", "127.0.0.1", "--no-dashboard", "--memory-limit", "0",
                                 "--death-timeout", "60", "--name", name], tmp_path / f"{name}.log"))
        client = Client(address, timeout="60s")
        client.wait_for_workers(2, timeout=90)
        pids = client.run(os.getpid)  # worker address -> pid
        victim: dict[str, Any] = {}

        def kill() -> None:
            busy = {w: ks for w, ks in client.processing().items() if ks}
            addr = next(iter(busy)) if busy else next(iter(pids))
            victim.update(addr=addr, busy=bool(busy))
            os.kill(pids[addr], signal.SIGKILL)

        reporter = _KillAfter(20, kill)
        got = _infer(net, files, tmp_path / "cluster.zarr", outsz, scheduler=make_runner(client),
                     progress=lambda total, initial: reporter)
        assert reporter.killed_at is not None and reporter.killed_at < total - 20, "killed too late to matter"
        assert victim["busy"], "the killed worker was running no block"
        assert list(client.scheduler_info()["workers"]) != [victim["addr"]]
        assert len(client.scheduler_info()["workers"]) == 1
        assert got.blocks_run == len(got.stats) == total
        np.testing.assert_array_equal(read_volume(got.arrays["output"]), read_volume(want.arrays["output"]))
        assert len(list((tmp_path / "cluster.zarr" / MANIFEST_DIR / "done").iterdir())) == total
        again = _infer(net, files, tmp_path / "cluster.zarr", outsz, scheduler=make_runner(client),
                       progress=False)
        assert (again.blocks_skipped, again.blocks_run) == (total, 0)
    finally:
        if client is not None:
            client.close()
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ------------------------------------------------------------------------------------------------ commands
def _forward_job(tmp_path: Path, net: Network, vol: np.ndarray, **keys: str) -> Path:
    from znn.io.checkpoint import save_checkpoint

    write_volume(tmp_path / "vol.h5", vol, overwrite=True)
    save_checkpoint(tmp_path / "net.h5", net)
    (tmp_path / "data.spec").write_text("[image1]\nfnames = vol.h5\npp_types = standard3D\n\n[sample1]\ninput = 1\n")
    values = {"fdata_spec": "data.spec", "forward_net": "net.h5", "forward_range": "1", "forward_outsz": "4,8,8",
              "output_prefix": "out/run", "is_bd_mirror": "yes", "num_threads": "2", **keys}
    path = tmp_path / "job.cfg"
    path.write_text("[parameters]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
    return path


def test_forward_scheduler_local_overrides_the_job_and_listens_on_localhost(tmp_path, capsys, monkeypatch):
    from znn.cli import main
    from znn.io.config import load_job
    from znn.pipeline.dense import memplan
    from znn.pipeline.jobs.forward import forward_job, plan_job

    net = Network.initialise(load_network(TINY3D), seed=12)
    vol = np.random.default_rng(6).integers(0, 200, (8, 16, 16), dtype=np.uint8)
    job = _forward_job(tmp_path, net, vol, scheduler="synchronous")
    want = read_volume(forward_job(load_job(job), progress=False)[0].arrays["output"])
    calls = []
    for name in ("plan_parallel", "plan_memory"):
        monkeypatch.setattr(memplan, name, lambda *a, name=name, **k: calls.append((name, a[2])))
    plan_job(load_job(job), 1 << 30, net, scheduler="tcp://127.0.0.1:1")  # blocks of one worker process
    plan_job(load_job(job), 1 << 30, net, scheduler="threads")  # one block per thread, or threads per block
    assert calls == [("plan_memory", 1), ("plan_parallel", 2)]
    monkeypatch.undo()
    assert main(["forward", str(job), "--quiet", "--fresh", "--scheduler", "local"]) == 0
    out = capsys.readouterr().out  # what was started is a note: stdout, so stderr holds only an error
    assert "local dask cluster: 2 single-threaded worker process(es), scheduler tcp://127.0.0.1:" in out
    assert "dashboard http://127.0.0.1:" in out
    np.testing.assert_array_equal(read_volume(tmp_path / "out" / "run_sample1_output.zarr" / "output"), want)


def test_scaling_bench_rows_and_volume_grid():
    from znn.bench.scaling import (
        ScalingRequest,
        _grid,
        block_grid_shape,
        format_table,
        run_scaling_bench,
    )

    assert [_grid(b) for b in (1, 2, 8, 12, 16)] == [(1, 1, 1), (1, 1, 2), (2, 2, 2), (2, 2, 3), (2, 2, 4)]
    assert block_grid_shape(16, (4, 8, 8)) == (8, 16, 32)
    rows = run_scaling_bench(ScalingRequest("tiny3d", 8, 4, repeat=1, scheduler="synchronous"))
    assert len(rows) == 1 and rows[0]["blocks"] == 4 and rows[0]["speedup"] == 1.0 and rows[0]["voxels_s"] > 0
    assert "voxels/s" in format_table(rows) and "scheduler synchronous" in format_table(rows)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_worker_settings_file_for_hand_started_clusters_equals_the_local_clusters():
    import yaml

    from znn.pipeline.run.schedulers import WORKER_SETTINGS

    path = ROOT / "workflows" / "cluster" / "dask-config" / "workers.yaml"
    assert _flat(yaml.safe_load(path.read_text())) == WORKER_SETTINGS


def test_local_cluster_workers_get_the_settings_for_long_tasks_unless_the_user_set_them():
    from znn.pipeline.run.schedulers import (
        WORKER_SETTINGS,
        local_runner,
        worker_settings,
    )

    def seen_by_worker() -> dict[str, Any]:
        return {"env": {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")},
                "profile": dask.config.get("distributed.worker.profile.enabled"),
                "tick": dask.config.get("distributed.admin.tick.interval")}

    # a cluster with dask's defaults first: its nanny writes MALLOC_TRIM_THRESHOLD_=65536 into this process's
    # environment, which the next cluster's workers must not inherit
    local_runner(1, tuned=False).close()
    with dask.config.set({"distributed.admin.tick.interval": "300ms"}):  # the user's choice wins
        assert "distributed.admin.tick.interval" not in worker_settings()
        assert len(worker_settings()) == len(WORKER_SETTINGS) - 1
        runner = make_runner("local", 1)
    try:
        seen = list(runner.client.run(seen_by_worker).values())
    finally:
        runner.close()
    # no MALLOC_TRIM_THRESHOLD_ (dask sets 65536 by default), no statistical profiler, the user's tick interval
    assert seen == [{"env": {"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": "1"}, "profile": False,
                     "tick": "300ms"}]


def test_a_variable_the_user_started_with_is_left_to_the_workers(monkeypatch):
    import znn.pipeline.run.schedulers as schedulers

    key = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
    assert key in schedulers.worker_settings() or os.environ.get("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setitem(schedulers.STARTING_ENVIRONMENT, "MALLOC_TRIM_THRESHOLD_", "0")  # as if set in the shell
    assert key not in schedulers.worker_settings()


def test_runner_on_some_workers_runs_every_block_there(tmp_path, local_client):
    net = Network.initialise(load_network(TINY3D), seed=3)
    write_volume(tmp_path / "in.zarr", np.random.default_rng(2).integers(0, 255, (8, 24, 24), dtype=np.uint8))
    files = {"input": [str(tmp_path / "in.zarr")]}
    cluster = make_runner(local_client)
    one, both = cluster.on_workers(1), cluster.on_workers(2)
    assert one.workers == 1 and len(one.only_workers) == 1 and both.only_workers is None
    pids = local_client.run(os.getpid)
    got = _infer(net, files, tmp_path / "one.zarr", (4, 8, 8), scheduler=one, progress=False)
    assert got.blocks_run == 18 and {s["pid"] for s in got.stats} == {pids[one.only_workers[0]]}
    assert all(s["finished"] >= s["started"] for s in got.stats)
    one.close()  # a view: the cluster's client stays open
    assert local_client.status == "running"
    with pytest.raises(ConfigError, match="3 of the cluster's 2 workers"):
        cluster.on_workers(3)
