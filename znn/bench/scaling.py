"""Dense-inference throughput on 1, 2, ... single-threaded dask worker processes, and the speedup over one.

One local dask cluster (`--scheduler local`: worker processes on 127.0.0.1, one thread each, with znn's worker
settings; ``--settings znn dask`` adds one with dask's defaults) of the most workers asked for runs the same
`znn forward` work on its first 1, 2, ... workers (the others idle):
:func:`~znn.pipeline.dense.volume.infer_volume` over a synthetic uint8 zarr volume of ``--blocks`` output blocks of
``--outsz``, writing a zarr output. One untimed run first (each worker plans its FFTs and makes its kernel spectra
once per process, as a long run would), then ``--repeat`` rounds of timed runs, every worker count once per round
(``fresh``: every block recomputed); medians are reported as blocks/s and output voxels/s, and the speedup over
the first worker count as the median of the per-round ratios, so a change in the machine's load between rounds
cancels out. Blocks read their input and write their output themselves, so only statistics travel to the driver:
the work scales as far as the cores do. ``--scheduler ADDRESS`` measures an existing cluster instead (one row).

The default network, ``workflows/cluster/scaling.znn`` (32 maps, 3x3x3 convolutions, one 2x2x2 max filter; FOV
16^3), costs about 1 s per 48^3 block on one core, far above the ~1 ms a distributed task costs. ``--net n337``
or ``n726`` uses ZNNi's 80-map networks (about 10 s and 3 GiB of cached kernel spectra per worker at 16^3).
Run ``znn bench scaling --help``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from znn.bench.common import Column, Row, mode_names, plain_cell, rows_table
from znn.bench.networks import BENCH_NETWORKS, bench_network
from znn.io.netfile import load_network
from znn.network import Network
from znn.pipeline.dense.plan import DenseOptions, plan_dense
from znn.pipeline.dense.volume import DenseRequest, infer_volume
from znn.pipeline.forward.autotune import inference_modes
from znn.pipeline.run.schedulers import (
    Runner,
    local_runner,
    make_runner,
    resolve_scheduler,
)
from znn.types import Triple

__all__ = ["SCALING_NETWORKS", "DenseWork", "ScalingRequest", "block_grid_shape", "synthetic_volume", "measure",
           "run_scaling_bench", "format_table"]

SCALING_NETWORKS = tuple(BENCH_NETWORKS)


def _grid(blocks: int) -> Triple:
    """``blocks`` as a z,y,x grid, as even as its prime factors allow (x the longest)."""
    grid = [1, 1, 1]
    n, f, factors = max(1, int(blocks)), 2, []
    while n > 1:
        while n % f == 0:
            factors.append(f)
            n //= f
        f += 1
    for f in sorted(factors, reverse=True):
        axis = max(i for i in range(3) if grid[i] == min(grid))
        grid[axis] *= f
    return grid[0], grid[1], grid[2]


def block_grid_shape(blocks: int, outsz: Sequence[int]) -> Triple:
    """A volume of ``blocks`` output blocks of ``outsz`` (mirrored borders: the output has the volume's size)."""
    grid = _grid(blocks)
    return grid[0] * int(outsz[0]), grid[1] * int(outsz[1]), grid[2] * int(outsz[2])


def synthetic_volume(path: Path, shape: Sequence[int], seed: int = 0) -> str:
    """A random uint8 zarr volume of ``shape`` at ``path``; returns its path."""
    from znn.io.volume import write_volume

    data = np.random.default_rng(seed).integers(0, 256, tuple(shape), dtype=np.uint8)
    write_volume(path, data, chunks=tuple(min(64, int(s)) for s in shape))
    return str(path)


def _cpu_seconds() -> float:
    """CPU seconds (user + system) this process has used."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return float(usage.ru_utime + usage.ru_stime)


def _worker_cpu(runner: Runner) -> float:
    """CPU seconds used so far by the runner's worker processes (this process for in-process runners)."""
    if runner.client is None:
        return _cpu_seconds()
    only = list(runner.only_workers) if runner.only_workers else None
    return float(sum(runner.client.run(_cpu_seconds, workers=only).values()))


def _machine_idle() -> tuple[float, float] | None:
    """(idle, total) jiffies of all cores since boot (Linux /proc/stat), or None elsewhere."""
    try:
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    return fields[3] + fields[4], sum(fields[:8])


# what run_block times: reading the input patch, the forward pass, writing the output chunk and its marker
_BLOCK_PARTS = ("read_s", "forward_s", "write_s")


@dataclass(frozen=True)
class DenseWork:
    """The dense inference every runner is timed on: ``net`` over the volume file ``volume`` in output blocks of
    ``outsz``, with ``modes`` and kernel spectra cached or not."""

    net: Network
    volume: str
    outsz: Sequence[int]
    modes: Any
    spectra_cache: bool


def _run(runner: Runner, work: DenseWork, store: Path) -> Row:
    """One run: its result, the cores its workers used and the cores the machine left idle meanwhile, the median
    seconds of one block, and how busy the workers were (their blocks' seconds / (wall seconds x workers))."""
    net = work.net
    cpu0, idle0 = _worker_cpu(runner), _machine_idle()
    plan = plan_dense(net, {net.spec.inputs[0]: [work.volume]},
                      DenseOptions(work.outsz, modes=work.modes, spectra_cache=work.spectra_cache))
    result = infer_volume(DenseRequest(plan, store, scheduler=runner, progress=False, fresh=True))
    cpu1, idle1 = _worker_cpu(runner), _machine_idle()
    idle = None
    if idle0 is not None and idle1 is not None and idle1[1] > idle0[1]:
        idle = (idle1[0] - idle0[0]) / (idle1[1] - idle0[1]) * (os.cpu_count() or 1)
    block_s = [st["finished"] - st["started"] for st in result.stats]
    busy = sum(block_s) / max(result.seconds * max(1, runner.workers), 1e-9)
    return {"result": result, "worker_cores": (cpu1 - cpu0) / max(result.seconds, 1e-9), "idle_cores": idle,
            "block_s": statistics.median(block_s), "busy": busy,
            **{part: statistics.median(st[part] for st in result.stats) for part in _BLOCK_PARTS}}


def measure(runners: Sequence[Runner], work: DenseWork, repeat: int, workdir: Path,
            baselines: Sequence[int] | None = None) -> list[Row]:
    """Seconds, blocks/s and voxels/s of ``work`` on each runner, and the speedup over its baseline runner
    (``baselines[i]``, by default the first): one untimed run each (it warms every worker), then ``repeat`` rounds
    that time every runner once, in forward order in even rounds and in reverse order in odd ones (so neither count
    always runs first after the other). The speedup is the median over rounds of the baseline's seconds over this
    runner's in the same round: a change in the machine's load between rounds, which moves both alike, cancels
    out."""
    baselines = list(baselines) if baselines is not None else [0] * len(runners)

    def run(i: int) -> Row:
        return _run(runners[i], work, workdir / f"out-{i}.zarr")

    firsts = [run(i) for i in range(len(runners))]
    runs: list[list[Row]] = [[] for _ in runners]
    for k in range(repeat):
        order = range(len(runners)) if k % 2 == 0 else reversed(range(len(runners)))
        for i in order:
            runs[i].append(run(i))
    return [_summary(first, timed, runs[base]) for first, timed, base in zip(firsts, runs, baselines)]


def _summary(first: Row, timed: Sequence[Row], baseline: Sequence[Row]) -> Row:
    """One runner's row: its warm-up run ``first``, the medians of its ``timed`` runs and the median of the
    ratios of its ``baseline``'s seconds over its own, round by round."""
    seconds = [t["result"].seconds for t in timed]
    s = statistics.median(seconds)
    idle = [t["idle_cores"] for t in timed if t["idle_cores"] is not None]
    blocks, voxels = first["result"].blocks_run, first["result"].voxels_run
    paired = [a["result"].seconds / b["result"].seconds for a, b in zip(baseline, timed)]
    return {"blocks": blocks, "voxels": voxels, "warmup_s": round(first["result"].seconds, 2),
            "seconds": round(s, 3), "runs_s": [round(v, 2) for v in seconds],
            "blocks_s": blocks / s, "voxels_s": voxels / s, "speedup": statistics.median(paired),
            "worker_cores": statistics.median(t["worker_cores"] for t in timed),
            "cpu_s_block": statistics.median(t["worker_cores"] * t["result"].seconds / blocks for t in timed),
            "block_s": statistics.median(t["block_s"] for t in timed),
            "busy": statistics.median(t["busy"] for t in timed),
            **{part: statistics.median(t[part] for t in timed) for part in _BLOCK_PARTS},
            "idle_cores": statistics.median(idle) if idle else None}


@dataclass(frozen=True)
class ScalingRequest:
    """What to measure: network ``net`` (a name in :data:`SCALING_NETWORKS`) in output blocks of ``side``^3 over a
    volume of ``blocks`` blocks, on local clusters of each count in ``workers`` per worker ``settings`` (``znn``:
    the local clusters znn starts; ``dask``: dask's defaults), or on the cluster at ``scheduler``. ``workdir``:
    where the synthetic volume and outputs go (None: the system temp)."""

    net: str = "scaling"
    side: int = 48
    blocks: int = 16
    workers: Sequence[int] = (1, 2)
    repeat: int = 3
    modes: str = "optimize"
    spectra_cache: bool = True
    scheduler: str | None = None
    seed: int = 0
    workdir: str | None = None
    settings: Sequence[str] = ("znn",)


def _runners(request: ScalingRequest, where: str, clusters: list[Runner]) -> tuple[list[tuple[str, int]],
                                                                                  list[Runner]]:
    """(settings, count) of each row and the runner of each row; the clusters it starts go into ``clusters`` as
    they start (the caller closes them, also when a later one fails)."""
    if where != "local":
        clusters.append(make_runner(where))
        return [("-", 0)], clusters[:]
    # one cluster of the most workers per settings, each count run on its first workers: a cluster per count
    # would leave the others' idle processes (and schedulers, in this process) on the cores
    settings, most = list(request.settings), max(request.workers)
    kinds = [(s, n) for s in settings for n in request.workers]
    for kind in settings:
        clusters.append(local_runner(most, tuned=kind == "znn"))
    return kinds, [clusters[settings.index(kind)].on_workers(n) for kind, n in kinds]


def run_scaling_bench(request: ScalingRequest = ScalingRequest()) -> list[Row]:
    """One row per worker count and worker settings, or one for the cluster at ``scheduler``, with the speedup
    over the first row of its settings."""
    spec = load_network(bench_network(request.net))
    net = Network.initialise(spec, seed=request.seed)
    outsz = (int(request.side),) * 3
    shape = block_grid_shape(request.blocks, outsz)
    m = inference_modes(spec, outsz, request.modes, net.dtype, request.spectra_cache)
    where = resolve_scheduler(request.scheduler, None) if request.scheduler else "local"
    tmp = Path(tempfile.mkdtemp(prefix="znn-scaling-", dir=request.workdir))
    clusters: list[Runner] = []
    try:
        volume = synthetic_volume(tmp / "input.zarr", shape, request.seed)
        kinds, runners = _runners(request, where, clusters)
        baselines = [next(j for j, (t, _) in enumerate(kinds) if t == kind) for kind, _ in kinds]
        measured = measure(runners, DenseWork(net, volume, outsz, m, request.spectra_cache), request.repeat, tmp,
                           baselines)
    finally:
        for r in reversed(clusters):  # last started, first closed: each LocalCluster restores the log levels it found
            r.close()
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [{"net": request.net, "outsz": list(outsz), "volume": list(shape), "workers": runner.workers,
             "settings": kind, "scheduler": where, "modes": mode_names(m), "spectra_cache": request.spectra_cache,
             "repeat": request.repeat, **result}
            for runner, result, (kind, _) in zip(runners, measured, kinds)]
    for row, base in zip(rows, baselines):
        row["efficiency"] = row["speedup"] * rows[base]["workers"] / row["workers"]
    return rows


_COLUMNS = (Column("settings", "settings"), Column("workers", "workers"), Column("blocks", "blocks"),
            Column("seconds", "median s", "{:.2f}"), Column("runs_s", "runs s"),
            Column("blocks_s", "blocks/s", "{:.2f}"), Column("voxels_s", "voxels/s", "{:,.0f}"),
            Column("speedup", "speedup", "{:.2f}x"), Column("efficiency", "per worker", "{:.0%}"),
            Column("worker_cores", "cores used", "{:.2f}"), Column("idle_cores", "cores idle", "{:.2f}"),
            Column("cpu_s_block", "CPU s/block", "{:.3f}"), Column("block_s", "s/block", "{:.3f}"),
            Column("read_s", "read", "{:.3f}"), Column("forward_s", "forward", "{:.3f}"),
            Column("write_s", "write", "{:.3f}"), Column("busy", "busy", "{:.1%}"))


def format_table(rows: Sequence[Row]) -> str:
    lines = [rows_table(_COLUMNS, rows, lambda row, col: plain_cell(row[col.key], col.fmt, list_sep=" "))]
    if rows:
        r = rows[0]
        lines.append(f"net {r['net']}, output blocks {'x'.join(map(str, r['outsz']))}, volume "
                     f"{'x'.join(map(str, r['volume']))}, conv modes {r['modes']}, kernel spectra "
                     f"{'cached' if r['spectra_cache'] else 'per block'}; scheduler {r['scheduler']} "
                     f"(single-threaded worker processes); median of {r['repeat']} runs after a warm-up run; "
                     f"speedup = median over the rounds of the seconds of the first row with the same worker "
                     f"settings / this row's (each round runs every row once; settings znn: what znn gives the "
                     f"workers it starts, dask: dask's defaults); cores used = CPU seconds of the workers / wall "
                     f"seconds, cores idle = the "
                     f"machine's idle cores meanwhile, CPU s/block = worker CPU seconds per block, s/block = "
                     f"seconds of one block from its start to its end on a worker, of which read / forward / write: "
                     f"reading its input, the network, writing its output chunk and marker; busy = the blocks' "
                     f"seconds / "
                     f"(wall seconds x workers), the rest is scheduling (medians over the runs). A speedup below "
                     f"the worker count with a rising s/block is the workers slowing each other down (shared "
                     f"caches and memory, other processes on the cores); with a falling busy, it is the scheduler")
    return "\n".join(lines)
