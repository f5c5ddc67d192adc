"""Data-parallel SGD on a real dask.distributed cluster: N replicas equal SGD on the averaged gradients of their
patches; a worker killed mid-step costs nothing; a scheduler lost stops the run with its last checkpoint named,
and a rerun resumes there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.pipeline.train.test_engine import TWO_INPUTS, _inputs, _square_loss
from tests.pipeline.train.test_train import make_job, run
from znn.errors import ConfigError
from znn.io.checkpoint import load_statistics
from znn.io.netfile import parse_network
from znn.network import Network
from znn.pipeline.graph.build import Hyper
from znn.pipeline.run.schedulers import make_runner
from znn.pipeline.train.engine import Engine
from znn.pipeline.train.replicas import ReplicaEngine

OUTSZ = (1, 4, 5)


def _patches(engine: Engine, count: int, first: int = 0) -> list[dict[str, np.ndarray]]:
    return [{k: v.astype(np.float32) for k, v in _inputs(engine, first + r).items()} for r in range(count)]


def _minibatch_reference(net: Network, batches, hyper: Hyper) -> Network:
    """Single-process SGD, one update per minibatch from the mean of its patches' gradients."""
    ref = Engine(net.copy(), OUTSZ, "fft", make_runner("synchronous"), plan_workers=1)
    for patches in batches:
        grads = [ref.gradients(p, _square_loss)[1] for p in patches]
        ref.apply_gradients({k: sum(g[k] for g in grads) / len(grads) for k in grads[0]}, hyper)
    return ref.net


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def _assert_close(trained: Network, want: Network, tolerance: float = 1e-6) -> None:
    for name in want.kernels:
        assert _relative(trained.kernels[name], want.kernels[name]) <= tolerance, name
    for name in want.biases:
        assert _relative(trained.biases[name], want.biases[name]) <= tolerance, name


def _replicas(client, net: Network, count: int) -> ReplicaEngine:
    engine = Engine(net.copy(), OUTSZ, "fft", make_runner(client), seed=0, plan_workers=1)
    return ReplicaEngine(engine, count, token=f"test-{os.getpid()}-{time.perf_counter()}")


@pytest.mark.parametrize("count", [2, 3])
def test_replicas_equal_sgd_on_the_averaged_gradients_of_their_patches(local_client, count):
    """Three steps of N replicas (3 on 2 workers: two share one) equal single-process SGD on minibatches of
    those N patches, to 1e-6; each step reports its bytes and communication time."""
    net = Network.initialise(parse_network(TWO_INPUTS), seed=1, dtype=np.float32)
    replicas = _replicas(local_client, net, count)
    hyper = Hyper(0.05, 0.9, 0.001, patch_size=float(np.prod(OUTSZ)))
    batches = [_patches(replicas.engine, count, first=10 * s) for s in range(3)]
    for patches in batches:
        costs, outputs = replicas.train_steps(patches, [_square_loss] * count, hyper)
        assert len(costs) == count and all(np.isfinite(costs))
    _assert_close(replicas.net, _minibatch_reference(net, batches, hyper))
    assert replicas.steps == 3
    assert all(r.bytes_sent > 0 and 0 <= r.comm_s <= r.wall_s for r in replicas.reports)


def test_a_validation_pass_runs_on_a_worker_and_equals_the_driver_s(local_client):
    """ReplicaEngine.forward is one task on a replica's worker, at the current weights (after a step too): the
    same outputs as the driver's engine gives in this process."""
    from distributed import get_task_stream

    net = Network.initialise(parse_network(TWO_INPUTS), seed=2, dtype=np.float32)
    replicas = _replicas(local_client, net, 2)
    patch = _patches(replicas.engine, 1, first=5)[0]
    hyper = Hyper(0.05, 0.9, 0.001, patch_size=float(np.prod(OUTSZ)))
    for _ in range(2):
        with get_task_stream(local_client) as stream:
            got = replicas.forward(patch)
        assert [t["key"] for t in stream.data if "replica_forward" in str(t["key"])], stream.data
        local = Engine(replicas.net.copy(), OUTSZ, "fft", make_runner("synchronous"), plan_workers=1)
        for node, want in local.forward(patch).items():
            np.testing.assert_allclose(got[node], want, rtol=1e-5, atol=1e-6, err_msg=node)
        replicas.train_steps(_patches(replicas.engine, 2, first=20), [_square_loss] * 2, hyper)


def test_replicas_need_a_cluster(tmp_path):
    with pytest.raises(ConfigError, match="replicas = 2 needs a dask.distributed cluster"):
        run(make_job(tmp_path, replicas="2"))


def test_a_job_trains_with_two_replicas_and_resumes(tmp_path, local_client):
    """`replicas = 2` on a cluster: the run finishes with its checkpoints and curve; 6 steps in one go equal 3
    steps, a resume, and 3 more."""
    job = make_job(tmp_path / "whole", scheduler=local_client.scheduler.address, replicas="2")
    whole = run(job)
    assert whole.iteration == 6 and load_statistics(tmp_path / "whole/out/net_current.h5")["iteration"] == 6
    split = make_job(tmp_path / "split", scheduler=local_client.scheduler.address, replicas="2")
    run(split, max_iter=3)
    resumed = run(split)
    assert resumed.iteration == 6
    for name, kernel in whole.engine.net.kernels.items():
        np.testing.assert_allclose(resumed.engine.net.kernels[name], kernel, rtol=0, atol=1e-6 * np.abs(kernel).max())


def slow_loss(outputs):
    """The square loss, slowly: a replica's task is then still running when the test kills its worker."""
    time.sleep(0.4)
    return _square_loss(outputs)


def test_a_worker_killed_mid_step_costs_nothing():
    """SIGKILL one of two workers while its replica's task runs: dask recomputes the task on the other worker
    (the nanny restarts the dead one) and the three steps equal those of an undisturbed run."""
    from distributed import Client, LocalCluster

    net = Network.initialise(parse_network(TWO_INPUTS), seed=2, dtype=np.float32)
    hyper = Hyper(0.05, 0.9, 0.0, patch_size=float(np.prod(OUTSZ)))
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0",
                      processes=True) as cluster, Client(cluster) as client:
        replicas = _replicas(client, net, 2)
        batches = [_patches(replicas.engine, 2, first=10 * s) for s in range(3)]
        replicas.train_steps(batches[0], [slow_loss] * 2, hyper)
        victim = replicas.placement[1]
        pid = client.run(os.getpid, workers=[victim])[victim]
        killed = threading.Event()

        def kill_when_running() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not killed.is_set():
                if any("replica_gradients" in str(k) for k in client.processing(workers=[victim]).get(victim, ())):
                    time.sleep(0.1)  # inside the task
                    os.kill(pid, signal.SIGKILL)
                    killed.set()
                time.sleep(0.02)

        killer = threading.Thread(target=kill_when_running)
        killer.start()
        for patches in batches[1:]:
            replicas.train_steps(patches, [slow_loss] * 2, hyper)
        killer.join()
        assert killed.is_set()
    _assert_close(replicas.net, _minibatch_reference(net, batches, hyper))


def _start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def _cluster_processes(tmp: Path, port: int) -> list[subprocess.Popen[bytes]]:
    """A dask scheduler and two single-threaded workers as real processes on 127.0.0.1."""
    address = f"tcp://127.0.0.1:{port}"
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    procs = [_start([*dask, "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0"],
                    tmp / f"scheduler-{port}.log")]
    worker = [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--host", "127.0.0.1",
              "--dashboard-address", ":0"]
    procs += [_start(worker, tmp / f"worker-{port}-{i}.log") for i in range(2)]
    from distributed import Client

    with Client(address, timeout="30s") as client:
        client.wait_for_workers(2, timeout=60)
    return procs


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)


def test_a_lost_scheduler_stops_with_the_last_checkpoint_and_a_rerun_resumes(tmp_path):
    """`znn train --replicas 2` on a cluster of real processes; the scheduler SIGKILLed after the first
    checkpoint: the run stops with exit status 2 and an error naming the last checkpoint; on a new
    cluster the same command resumes from it."""
    import socket

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    job = make_job(tmp_path, Max_iter="400", Num_iter_per_save="2", Num_iter_per_test="400")
    current = tmp_path / "out/net_current.h5"
    port = free_port()
    procs = _cluster_processes(tmp_path, port)
    try:
        command = [sys.executable, "-m", "znn.cli", "train", str(job), "--scheduler", f"tcp://127.0.0.1:{port}",
                   "--replicas", "2", "--quiet"]
        # the client gives up reconnecting after znn.connect-timeout (10 s by default)
        env = {**os.environ, "DASK_ZNN__CONNECT_TIMEOUT": "2s"}
        train = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env)
        deadline = time.monotonic() + 120
        while not current.exists() and time.monotonic() < deadline and train.poll() is None:
            time.sleep(0.1)
        assert current.exists(), train.communicate(timeout=30)
        os.killpg(procs[0].pid, signal.SIGKILL)
        out, err = train.communicate(timeout=180)
    finally:
        _stop(procs)
    lines = err.decode().strip().splitlines()
    assert train.returncode == 2, err.decode()
    # the last line is the error (distributed's client may log its failed reconnect before it); no traceback
    assert "lost the dask scheduler" in lines[-1] and "net_current.h5 (iteration" in lines[-1], lines
    assert not any("Traceback" in line for line in lines), lines
    saved = int(load_statistics(current)["iteration"])
    port = free_port()
    procs = _cluster_processes(tmp_path, port)
    try:
        rerun = subprocess.run([*command[:6], f"tcp://127.0.0.1:{port}", "--replicas", "2", "--max-iter",
                                str(saved + 2)], capture_output=True, text=True, cwd=tmp_path, timeout=180)
    finally:
        _stop(procs)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from" in rerun.stderr and f"at iteration {saved}" in rerun.stderr, rerun.stderr
    assert int(load_statistics(current)["iteration"]) == saved + 2


def test_any_failure_of_a_client_that_gave_up_is_the_lost_cluster_and_other_failures_stay_themselves():
    """A client that could not reconnect closes itself, and its next call fails however its closed state makes it
    (in the test above, once: AttributeError inside Client.scatter, exit status 1 with a traceback): that is
    ClusterLost (exit status 2, the last checkpoint named); an error of the work on an open client is not."""
    from distributed import Client, LocalCluster

    from znn.pipeline.train.replicas import ClusterLost, _on_cluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        client = Client(cluster)
        with pytest.raises(ZeroDivisionError):
            _on_cluster(lambda: 1 / 0, client)
        client.close()
        with pytest.raises(ClusterLost, match="lost the dask scheduler"):
            _on_cluster(lambda: client.scatter(np.zeros(3), broadcast=True), client)
        with pytest.raises(ClusterLost, match="the client closed: ZeroDivisionError"):
            _on_cluster(lambda: 1 / 0, client)
