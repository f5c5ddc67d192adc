"""Dense-inference throughput (output voxels per second) of ZNNi's 80-map networks, side by side with PyTorch.

Networks (``workflows/inference/``): ``n337`` (7 convs of 3x3x3, three 2x2x2 max filters) and ``n726`` (6 convs of
7x7x7, two max filters), 80 maps, 3 outputs; the layer lists of ZNNi's ``networks/337.znni`` and ``276.znni``
(Zlateski, Lee, Seung 2016), written as ZNN sparse (max-filter) networks so they give dense output.

For each output patch (a cube, clipped to what the planner says fits ``--memory``):

* ``znn``: what `znn forward` does per block (:class:`~znn.pipeline.forward.phases.PhaseForward`, kernel spectra from
  the cache, made once per volume so not timed; their time is shown), ``--threads / --block-threads`` blocks at
  once, each on ``--block-threads`` threads; throughput = blocks x output voxels / wall time;
* with ``--scheduler local`` or an address, ``znn`` is instead dense inference (`znn forward`'s
  :func:`~znn.pipeline.dense.volume.infer_volume`) of a synthetic volume of two blocks per worker on that dask cluster,
  one block per single-threaded worker process at a time (``local``: ``--threads`` workers on 127.0.0.1); throughput
  = output voxels / wall time of the run, after a warm-up run (`znn bench scaling` compares worker counts);
* ``torch``: the same network with the same weights in PyTorch (``conv3d`` dilated by the sparsity, kernels
  flipped, ``max_pool3d`` at stride 1 dilated for max filters), ``torch.set_num_threads(--threads)``, one patch.

Medians over ``--repeat`` runs after a warm-up. Run ``znn bench forward --help``.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from znn.bench.common import (
    Column,
    Row,
    import_torch,
    mode_names,
    plain_cell,
    rows_table,
)
from znn.bench.networks import bench_network
from znn.bench.scaling import DenseWork, block_grid_shape, measure, synthetic_volume
from znn.io.netfile import load_network
from znn.network import Network
from znn.pipeline.dense import memplan
from znn.pipeline.dense.memplan import BlockEstimate
from znn.pipeline.forward.autotune import inference_modes
from znn.pipeline.forward.phases import PhaseForward
from znn.pipeline.run.schedulers import (
    Runner,
    make_runner,
    resolve_scheduler,
    single_threaded_kernels,
)
from znn.spec import NetworkSpec
from znn.text import format_bytes, parse_bytes
from znn.types import Triple

__all__ = ["NETWORKS", "ForwardBenchRequest", "run_forward_bench", "format_table"]

NETWORKS = ("n337", "n726")  # names in znn.bench.networks
TARGETS = {"n337": 1.0, "n726": 2.0}  # team target: znn / torch throughput at the largest patch that fits
DEFAULT_SIDES = {"n337": (8, 16, 32), "n726": (8, 16, 32)}  # output cube sides per network


def _torch() -> Any | None:
    """``(torch, znn.bench.torchnet)``, or None without PyTorch."""
    torch = import_torch()
    if torch is None:
        return None
    from znn.bench import torchnet

    return torch, torchnet


def _time(fn: Any, repeat: int, long: float = 60.0) -> float:
    t0 = time.perf_counter()
    fn()  # warm-up: FFTW plans, allocator, torch's primitive selection
    first = time.perf_counter() - t0
    if first > long:  # a run this long is its own measurement (planning and warm-up are a small part of it)
        return first
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bench_znn(net: Network, outsz: Triple, modes: Any, cache: bool, threads: int,
               block_threads: int, repeat: int, x: dict[str, np.ndarray]) -> tuple[float, float, np.ndarray]:
    engine = PhaseForward(net, outsz, modes, cache, threads=block_threads)
    blocks_at_once = max(1, threads // block_threads)
    t0 = time.perf_counter()
    engine.warm()
    warm = time.perf_counter() - t0
    pool = ThreadPoolExecutor(max_workers=blocks_at_once)
    out: list[np.ndarray] = []

    def blocks() -> None:
        results = list(pool.map(lambda _: engine.forward(x), range(blocks_at_once)))
        out[:] = [results[0][net.spec.outputs[0]]]

    with single_threaded_kernels():  # as dense inference runs blocks: their threads are the evaluator's own
        seconds = _time(blocks, repeat, long=float("inf"))
    pool.shutdown()
    return seconds, warm, out[0]


def _bench_torch(tmods: Any, net: Network, outsz: Triple, threads: int, repeat: int,
                 x: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
    torch, torchnet = tmods
    torch.set_num_threads(threads)
    model = torchnet.build_torch_net(net, outsz)
    tx = torchnet.to_tensors(x)
    out: list[Any] = []

    def run() -> None:
        with torch.no_grad():
            out[:] = [model(tx)[net.spec.outputs[0]]]

    seconds = _time(run, repeat)
    return seconds, out[0][0].numpy()


def _bench_znn_cluster(runner: Runner, net: Network, outsz: Triple, modes: Any, cache: bool, repeat: int,
                       seed: int) -> Row:
    """Dense inference of a synthetic volume of two blocks per worker on ``runner``'s cluster (see
    :func:`znn.bench.scaling.measure`)."""
    with tempfile.TemporaryDirectory(prefix="znn-bench-") as tmp:
        shape = block_grid_shape(2 * max(1, runner.workers), outsz)
        volume = synthetic_volume(Path(tmp) / "input.zarr", shape, seed)
        return measure([runner], DenseWork(net, volume, outsz, modes, cache), repeat, Path(tmp))[0]


@dataclass(frozen=True)
class ForwardBenchRequest:
    """What to time. ``sides``: output cube sides (None: :data:`DEFAULT_SIDES` of each network). ``modes``:
    optimize (the planner's cost model per layer), fft or direct. ``memory``: bytes the blocks may use.
    ``block_threads``: threads per block (None: 1 if one block per thread fits, else ``threads``). ``scheduler``
    (resolved by :func:`~znn.pipeline.run.schedulers.resolve_scheduler`; default threads): ``threads`` times blocks
    in this process, ``synchronous`` the same on one thread, ``local`` or an address dense inference on a dask
    cluster."""

    nets: Sequence[str] = NETWORKS
    sides: Sequence[int] | None = None
    threads: int = 2
    repeat: int = 2
    modes: str = "optimize"
    memory: int = parse_bytes("16GB")
    torch: bool = True
    seed: int = 0
    block_threads: int | None = None
    scheduler: str | None = None


@dataclass(frozen=True)
class _Bench:
    """A request with where it runs: the resolved scheduler, the cluster's runner (None: in this process) and
    PyTorch with our torchnet (None: not timed)."""

    request: ForwardBenchRequest
    where: str
    runner: Runner | None
    tmods: Any | None


def run_forward_bench(request: ForwardBenchRequest = ForwardBenchRequest(),
                      progress: Callable[[Row], None] | None = None) -> list[Row]:
    """One row per (network, output cube): znn and torch seconds, voxels/s, ratio, predicted memory."""
    where = resolve_scheduler(request.scheduler, None)
    if where == "synchronous":
        request = replace(request, threads=1, block_threads=1)
    runner = None if where in ("threads", "synchronous") else make_runner(where, request.threads)
    if runner is not None:
        request = replace(request, block_threads=1)  # single-threaded worker processes, one block each
    bench = _Bench(request, where, runner, _torch() if request.torch else None)
    try:
        rows = []
        for name in request.nets:
            spec = load_network(bench_network(name))
            net = Network.initialise(spec, seed=request.seed).sliding_window()
            for side in request.sides or DEFAULT_SIDES[name]:
                row = _row(bench, name, net, spec, (int(side),) * 3)
                rows.append(row)
                if progress is not None and row["fits"]:
                    progress(row)
        return rows
    finally:
        if runner is not None:
            runner.close()


@dataclass(frozen=True)
class _Fit:
    """How a block of one output patch runs: threads per block, spectra cached or not, conv modes, the memory
    estimate, the predicted peak of the process and whether it fits the budget."""

    block_threads: int
    cache: bool
    modes: str | dict[str, str]
    estimate: BlockEstimate
    peak: int
    fits: bool


def _fit(bench: _Bench, spec: NetworkSpec, outsz: Triple) -> _Fit:
    """One block per thread if that fits the memory, else all threads on one block; cached spectra first. When
    nothing fits, the last one tried (marked as not fitting)."""
    request = bench.request
    tries = [request.block_threads] if request.block_threads else [1, request.threads]
    for bt in tries:
        for cache in (True, False):
            m = memplan.choose_modes(spec, outsz, cache) if request.modes == "optimize" else request.modes
            est = memplan.block_estimate(spec, outsz, m, cache)
            in_flight = 1 if bench.runner is not None else max(1, request.threads // bt)  # per process
            peak = est.total(in_flight, memplan.process_rss())
            if peak <= request.memory:
                return _Fit(bt, cache, m, est, peak, True)
    return _Fit(bt, cache, m, est, peak, False)


def _row(bench: _Bench, name: str, net: Network, spec: NetworkSpec, outsz: Triple) -> Row:
    request = bench.request
    fit = _fit(bench, spec, outsz)
    row: Row = {"net": name, "outsz": list(outsz), "threads": request.threads, "repeat": request.repeat,
                "block_threads": fit.block_threads, "modes": mode_names(fit.estimate.modes),
                "spectra_cache": fit.cache, "predicted_bytes": fit.peak, "fits": fit.fits, "scheduler": bench.where}
    if not fit.fits:
        return row
    m = fit.modes
    if request.modes == "optimize":  # the planner's speed model chose for the memory estimate; now time the layers
        m = inference_modes(spec, outsz, request.modes, np.float32, fit.cache, fit.block_threads)
        row["modes"] = mode_names(m)
    rng = np.random.default_rng(request.seed)
    x = {n: rng.standard_normal((spec.nodes[n].size, *p)).astype(np.float32)
         for n, p in spec.layout(outsz).input_patch.items()}
    ours = _time_znn(bench, net, outsz, replace(fit, modes=m), x, row)
    if bench.tmods is not None:
        vox = math.prod(outsz)
        tsecs, theirs = _bench_torch(bench.tmods, net, outsz, request.threads, request.repeat, x)
        row.update(torch_s=round(tsecs, 3), torch_vox_s=round(vox / tsecs),
                   ratio=round(row["znn_vox_s"] / (vox / tsecs), 2))
        if ours is not None:
            row["max_diff"] = float(np.abs(ours - theirs).max() / max(1e-30, np.abs(theirs).max()))
    return row


def _time_znn(bench: _Bench, net: Network, outsz: Triple, fit: _Fit, x: dict[str, np.ndarray],
              row: Row) -> np.ndarray | None:
    """Time znn's side into ``row``; the output of one block when it ran in this process (None on a cluster)."""
    request = bench.request
    if bench.runner is not None:
        dense = _bench_znn_cluster(bench.runner, net, outsz, fit.modes, fit.cache, request.repeat, request.seed)
        row.update(znn_s=dense["seconds"], znn_vox_s=round(dense["voxels_s"]), workers=bench.runner.workers,
                   blocks=dense["blocks"])
        return None
    secs, warm, ours = _bench_znn(net, outsz, fit.modes, fit.cache, request.threads, fit.block_threads,
                                  request.repeat, x)
    row.update(znn_s=round(secs, 3),
               znn_vox_s=round(max(1, request.threads // fit.block_threads) * math.prod(outsz) / secs),
               spectra_s=round(warm, 2), peak_rss_so_far=memplan.peak_rss())
    return ours


_COLUMNS = (Column("net", "net"), Column("outsz", "output"), Column("block_threads", "thr/block"),
            Column("modes", "conv modes"), Column("spectra_cache", "spectra"), Column("predicted_bytes", "plan mem"),
            Column("znn_vox_s", "znn vox/s", "{:,}"), Column("spectra_s", "spectra s"),
            Column("torch_vox_s", "torch vox/s", "{:,}"), Column("ratio", "znn/torch", "{:.2f}"),
            Column("max_diff", "rel diff", "{:.1e}"))


def _cell(row: Row, col: Column) -> str:
    value = row.get(col.key)
    if value is None:
        return "-" if col.key != "znn_vox_s" or row.get("fits", True) else "does not fit"
    if col.key == "predicted_bytes":
        return format_bytes(value)
    if col.key == "spectra_cache":
        return "cached" if value else "per block"
    return plain_cell(value, col.fmt)


def format_table(rows: Sequence[Row]) -> str:
    lines = [rows_table(_COLUMNS, rows, _cell)]
    if rows:
        lines.append(f"output voxels/s, {rows[0]['threads']} threads, median of {rows[0]['repeat']}; znn runs "
                     f"{rows[0]['threads']} // thr/block blocks at once, torch one patch with "
                     f"{rows[0]['threads']} intra-op threads; targets znn/torch >= {TARGETS}")
        if rows[0].get("scheduler", "threads") not in ("threads", "synchronous"):
            lines.append(f"znn here: dense inference on the dask cluster {rows[0]['scheduler']} "
                         f"({rows[0].get('workers', '?')} worker(s), one block per single-threaded worker at a time, "
                         "two blocks per worker), not --threads // thr/block")
    return "\n".join(lines)
