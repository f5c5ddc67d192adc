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

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from znn.bench.networks import bench_network
from znn.io.netfile import load_network
from znn.network import Network
from znn.pipeline.dense import memplan
from znn.pipeline.forward.autotune import inference_modes
from znn.pipeline.forward.phases import PhaseForward
from znn.pipeline.run.schedulers import single_threaded_kernels
from znn.text import format_bytes, parse_bytes

__all__ = ["NETWORKS", "run_forward_bench", "format_table", "add_arguments", "run_from_args"]

NETWORKS = ("n337", "n726")  # names in znn.bench.networks
TARGETS = {"n337": 1.0, "n726": 2.0}  # team target: znn / torch throughput at the largest patch that fits
DEFAULT_OUTSZ = {"n337": (8, 16, 32), "n726": (8, 16, 32)}


def _torch() -> Any | None:
    try:
        import torch

        from znn.bench import torchnet
    except ImportError:
        return None
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


def _bench_znn(net: Network, outsz: tuple[int, int, int], modes: Any, cache: bool, threads: int,
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


def _bench_torch(tmods: Any, net: Network, outsz: tuple[int, int, int], threads: int, repeat: int,
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


def _bench_znn_cluster(runner: Any, net: Network, outsz: tuple[int, int, int], modes: Any, cache: bool,
                       repeat: int, seed: int) -> dict[str, Any]:
    """Dense inference of a synthetic volume of two blocks per worker on ``runner``'s cluster (see
    :func:`znn.bench.scaling.measure`)."""
    import tempfile

    from znn.bench.scaling import block_grid_shape, measure, synthetic_volume

    with tempfile.TemporaryDirectory(prefix="znn-bench-") as tmp:
        shape = block_grid_shape(2 * max(1, runner.workers), outsz)
        volume = synthetic_volume(Path(tmp) / "input.zarr", shape, seed)
        return measure([runner], net, volume, outsz, modes, cache, repeat, Path(tmp))[0]


def run_forward_bench(nets: Sequence[str] = ("n337", "n726"), sizes: dict[str, Sequence[int]] | None = None,
                      threads: int = 2, repeat: int = 2, modes: str = "optimize", memory: str = "16GB",
                      torch: bool = True, seed: int = 0, progress: Any = None,
                      block_threads: int | None = None, scheduler: str | None = None) -> list[dict[str, Any]]:
    """One row per (network, output cube): znn and torch seconds, voxels/s, ratio, predicted memory.

    ``scheduler`` (resolved by :func:`~znn.pipeline.run.schedulers.resolve_scheduler`; default threads): ``threads``
    times blocks in this process, ``synchronous`` the same on one thread, ``local`` or an address dense inference
    on a dask cluster."""
    from znn.pipeline.run.schedulers import make_runner, resolve_scheduler

    where = resolve_scheduler(scheduler, None)
    if where == "synchronous":
        threads, block_threads = 1, 1
    runner = None if where in ("threads", "synchronous") else make_runner(where, threads)
    try:
        return _forward_rows(nets, sizes, threads, repeat, modes, memory, torch, seed, progress, block_threads,
                             where, runner)
    finally:
        if runner is not None:
            runner.close()


def _forward_rows(nets: Sequence[str], sizes: dict[str, Sequence[int]] | None, threads: int, repeat: int,
                  modes: str, memory: str, torch: bool, seed: int, progress: Any, block_threads: int | None,
                  where: str, runner: Any) -> list[dict[str, Any]]:
    tmods = _torch() if torch else None
    budget = parse_bytes(memory)
    if runner is not None:
        block_threads = 1  # single-threaded worker processes, one block each
    rows = []
    for name in nets:
        spec = load_network(bench_network(name))
        net = Network.initialise(spec, seed=seed).sliding_window()
        for side in (sizes or DEFAULT_OUTSZ)[name]:
            outsz = (int(side),) * 3
            fits = False
            # one block per thread if that fits the memory, else all threads on one block; cached spectra first
            for bt in [block_threads] if block_threads else [1, threads]:
                for cache in (True, False):
                    m = memplan.choose_modes(spec, outsz, cache) if modes == "optimize" else modes
                    est = memplan.block_estimate(spec, outsz, m, cache)
                    in_flight = 1 if runner is not None else max(1, threads // bt)  # per process
                    peak = est.total(in_flight, memplan.process_rss())
                    fits = peak <= budget
                    if fits:
                        break
                if fits:
                    break
            row: dict[str, Any] = {"net": name, "outsz": list(outsz), "threads": threads, "repeat": repeat,
                                   "block_threads": bt, "modes": ",".join(sorted(set(est.modes.values()))),
                                   "spectra_cache": cache, "predicted_bytes": peak, "fits": fits,
                                   "scheduler": where}
            if not fits:
                rows.append(row)
                continue
            if modes == "optimize":  # the planner's speed model chose for the memory estimate; now time the layers
                m = inference_modes(spec, outsz, modes, np.float32, cache, bt)
                row["modes"] = ",".join(sorted(set(m.values())))
            rng = np.random.default_rng(seed)
            x = {n: rng.standard_normal((spec.nodes[n].size, *p)).astype(np.float32)
                 for n, p in spec.layout(outsz).input_patch.items()}
            vox = math.prod(outsz)
            ours = None
            if runner is not None:
                dense = _bench_znn_cluster(runner, net, outsz, m, cache, repeat, seed)
                row.update(znn_s=dense["seconds"], znn_vox_s=round(dense["voxels_s"]), workers=runner.workers,
                           blocks=dense["blocks"])
            else:
                secs, warm, ours = _bench_znn(net, outsz, m, cache, threads, bt, repeat, x)
                row.update(znn_s=round(secs, 3), znn_vox_s=round(max(1, threads // bt) * vox / secs),
                           spectra_s=round(warm, 2), peak_rss_so_far=memplan.peak_rss())
            if tmods is not None:
                tsecs, theirs = _bench_torch(tmods, net, outsz, threads, repeat, x)
                row.update(torch_s=round(tsecs, 3), torch_vox_s=round(vox / tsecs),
                           ratio=round(row["znn_vox_s"] / (vox / tsecs), 2))
                if ours is not None:
                    row["max_diff"] = float(np.abs(ours - theirs).max() / max(1e-30, np.abs(theirs).max()))
            rows.append(row)
            if progress is not None:
                progress(row)
    return rows


_COLUMNS = (("net", "net", "{}"), ("outsz", "output", "{}"), ("block_threads", "thr/block", "{}"),
            ("modes", "conv modes", "{}"),
            ("spectra_cache", "spectra", "{}"), ("predicted_bytes", "plan mem", "{}"), ("znn_vox_s", "znn vox/s", "{:,}"),
            ("spectra_s", "spectra s", "{}"), ("torch_vox_s", "torch vox/s", "{:,}"), ("ratio", "znn/torch", "{:.2f}"),
            ("max_diff", "rel diff", "{:.1e}"))


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-" if key != "znn_vox_s" or row.get("fits", True) else "does not fit"
    if key == "predicted_bytes":
        return format_bytes(value)
    if key == "spectra_cache":
        return "cached" if value else "per block"
    if isinstance(value, list):
        return "x".join(map(str, value))
    return fmt.format(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = [t for _, t, _ in _COLUMNS]
    body = [[_cell(r, k, f) for k, _, f in _COLUMNS] for r in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *body]]
    if rows:
        lines.append(f"output voxels/s, {rows[0]['threads']} threads, median of {rows[0]['repeat']}; znn runs "
                     f"{rows[0]['threads']} // thr/block blocks at once, torch one patch with "
                     f"{rows[0]['threads']} intra-op threads; targets znn/torch >= {TARGETS}")
        if rows[0].get("scheduler", "threads") not in ("threads", "synchronous"):
            lines.append(f"znn here: dense inference on the dask cluster {rows[0]['scheduler']} "
                         f"({rows[0].get('workers', '?')} worker(s), one block per single-threaded worker at a time, "
                         "two blocks per worker), not --threads // thr/block")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nets", nargs="+", choices=sorted(NETWORKS), default=sorted(NETWORKS))
    parser.add_argument("--outsz", type=int, nargs="+", help="output cube sides (default: 8 16 32)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block-threads", type=int, help="threads per block (default: 1 if one block per thread "
                                                          "fits --memory, else --threads)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--modes", choices=["optimize", "fft", "direct"], default="optimize",
                        help="conv modes (optimize: the planner's cost model per layer)")
    parser.add_argument("--memory", default="16GB", help="memory the blocks may use (default 16GB)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--scheduler", help="threads (default: blocks timed in this process), synchronous, local "
                                            "(a cluster of --threads single-threaded workers on 127.0.0.1) or a "
                                            "scheduler address: znn's side is then dense inference on that cluster; "
                                            "default: dask config znn.scheduler, else threads")
    parser.add_argument("--json", help="also write the rows to this JSON file")


def run_from_args(args: argparse.Namespace) -> list[dict[str, Any]]:
    sizes = {n: args.outsz for n in NETWORKS} if args.outsz else None
    rows = run_forward_bench(args.nets, sizes, args.threads, args.repeat, args.modes, args.memory,
                             not args.no_torch, block_threads=args.block_threads, scheduler=args.scheduler,
                             progress=lambda r: print(f"  {r['net']} {r['outsz']}: znn {r.get('znn_vox_s')} vox/s, "
                                                      f"torch {r.get('torch_vox_s')} vox/s", file=sys.stderr,
                                                      flush=True))
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="znn bench forward", description=__doc__.split("\n")[0])
    add_arguments(parser)
    run_from_args(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
