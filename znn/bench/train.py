"""Data-parallel training throughput on local clusters: samples and output voxels per second, communication.

``znn bench train NET.znn --outsz z,y,x --replicas 1 2`` starts, for each replica count N, a local cluster of N
single-threaded worker processes on 127.0.0.1 and runs ``--steps`` data-parallel steps
(:class:`~znn.pipeline.train.replicas.ReplicaEngine`) after one warm-up step, on random patches and the bounded
loss of ``znn bench net``. A row per N: ``samples_s`` (patches per second, N per step), ``vox_s`` (output voxels
per second), ``step_s`` (median), ``comm_s`` (median time a step did not spend in its slowest replica's compute:
weights out, gradients in, the reduction tree, scheduling), ``comm_share`` and ``bytes_per_step`` (weights to
every worker, patches, gradients back), and ``speedup`` against the first row.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from znn.bench.common import Column, Row, rows_table
from znn.bench.net import bounded_loss
from znn.network import Network
from znn.pipeline.graph.build import Hyper
from znn.pipeline.run.schedulers import local_runner
from znn.pipeline.train.engine import Engine
from znn.pipeline.train.replicas import ReplicaEngine
from znn.types import Triple

__all__ = ["TrainBenchRequest", "run_train_bench", "format_table"]


@dataclass(frozen=True)
class TrainBenchRequest:
    network: str | Path
    outsz: Triple
    replicas: tuple[int, ...] = (1, 2)
    steps: int = 5
    mode: str = "fft"
    dtype: str = "float32"
    seed: int = 0
    eta: float = 1e-6


def run_train_bench(request: TrainBenchRequest, progress: Callable[[str], None] | None = None) -> list[Row]:
    """One row per replica count of ``request.replicas`` (see the module docstring)."""
    from znn.pipeline.jobs.describe import load_any_network

    say = progress or (lambda s: None)
    spec = load_any_network(request.network)
    net = Network.initialise(spec, seed=request.seed, dtype=np.dtype(request.dtype))
    rows: list[Row] = []
    for count in request.replicas:
        say(f"{count} replica(s) on a local cluster of {count} single-threaded worker(s)")
        rows.append(_measure(request, net, count))
    for row in rows:
        row["speedup"] = row["samples_s"] / rows[0]["samples_s"]
    return rows


def _measure(request: TrainBenchRequest, net: Network, count: int) -> Row:
    with local_runner(count) as runner:
        engine = Engine(net.copy(), request.outsz, request.mode, runner, seed=request.seed, plan_workers=1)
        replicas = ReplicaEngine(engine, count, token=f"bench-{count}-{time.time()}")
        rng = np.random.default_rng(request.seed)
        hyper = Hyper(request.eta, 0.9, 0.0, float(math.prod(request.outsz)))

        def patches() -> list[dict[str, np.ndarray]]:
            return [{k: rng.standard_normal((net.spec.nodes[k].size, *v)).astype(net.dtype)
                     for k, v in engine.input_patch.items()} for _ in range(count)]

        replicas.train_steps(patches(), [bounded_loss] * count, hyper)  # warm-up: replicas built, FFTs planned
        replicas.reports.clear()
        t0 = time.perf_counter()
        for _ in range(request.steps):
            replicas.train_steps(patches(), [bounded_loss] * count, hyper)
        wall = time.perf_counter() - t0
    reports = replicas.reports
    step = statistics.median(r.wall_s for r in reports)
    comm = statistics.median(r.comm_s for r in reports)
    samples = count * request.steps / wall
    return {"network": str(request.network), "outsz": list(request.outsz), "replicas": count,
            "modes": dict(replicas.setup.modes), "step_s": step, "samples_s": samples,
            "vox_s": samples * math.prod(request.outsz), "comm_s": comm, "comm_share": comm / step,
            "bytes_per_step": int(statistics.median(r.bytes_sent for r in reports))}


COLUMNS = [Column("replicas", "replicas"), Column("step_s", "step s", "{:.3f}"),
           Column("samples_s", "samples/s", "{:.2f}"), Column("vox_s", "output vox/s", "{:,.0f}"),
           Column("speedup", "vs first", "{:.2f}x"), Column("comm_s", "comm s", "{:.3f}"),
           Column("comm_share", "comm share", "{:.1%}"), Column("bytes_per_step", "bytes/step", "{:,}")]


def format_table(rows: Sequence[Row]) -> str:
    head = f"network {rows[0]['network']}  output {'x'.join(map(str, rows[0]['outsz']))}" if rows else ""
    return head + "\n" + rows_table(COLUMNS, rows)

