"""`znn bench ops|net|forward|scaling`: arguments only; the work is :mod:`znn.bench` (each benchmark a request, a
``run_*`` function that returns rows, and its table). Benchmarks print tables (and JSON), never timed tests."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from znn.bench import forward, net, ops, scaling
from znn.bench import train as train_bench
from znn.bench.common import Row, machine_line, write_json, write_rows
from znn.cli.args import (
    Handler,
    Subparsers,
    add_scheduler_argument,
    memory,
    non_negative_number,
    parse_triple,
    positive_int,
    positive_number,
)
from znn.io.config import JOB_CONV_MODES
from znn.ops.conv import MODES as CONV_MODES
from znn.pipeline.run.schedulers import resolve_scheduler
from znn.types import Triple

MODES = list(JOB_CONV_MODES)


def register(sub: Subparsers) -> dict[str, Handler]:
    bench = sub.add_parser("bench", help="benchmarks: conv layers, whole networks, dense inference")
    kinds = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, module, add_arguments, run in (("ops", ops, _ops_arguments, _run_ops),
                                             ("net", net, _net_arguments, _run_net),
                                             ("forward", forward, _forward_arguments, _run_forward),
                                             ("scaling", scaling, _scaling_arguments, _run_scaling),
                                             ("train", train_bench, _train_arguments, _run_train)):
        p = kinds.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        add_arguments(p)
        p.set_defaults(bench_run=run)
    return {"bench": _run}


def _run(args: argparse.Namespace) -> int:
    args.bench_run(args)
    return 0


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- znn bench ops


def triple_or_cube(text: str) -> Triple:
    """``z,y,x``, or one number ``n`` for the cube ``n,n,n``."""
    return parse_triple(text if "," in text else ",".join([text] * 3))


def _ops_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", nargs="+", choices=[lay.name for lay in ops.LAYERS], help="default: all")
    parser.add_argument("--outsz", type=triple_or_cube, default=ops.DEFAULT_OUTSZ_3D,
                        help="output patch z,y,x of the 3D layers (or one number for a cube); default 24")
    parser.add_argument("--outsz2d", type=triple_or_cube, default=ops.DEFAULT_OUTSZ_2D,
                        help="output patch of the 2D layers: z,y,x with z forced to 1, or one number for a "
                             "square; default 1,128,128")
    parser.add_argument("--threads", type=positive_int, default=2, help="threads for every side (default 2)")
    parser.add_argument("--repeat", type=positive_int, default=5, help="timed runs per method, median reported")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--modes", nargs="+", choices=CONV_MODES, default=list(CONV_MODES))
    parser.add_argument("--no-torch", action="store_true", help="do not time PyTorch")
    parser.add_argument("--max-direct-gflop", type=non_negative_number, default=ops.DEFAULT_MAX_DIRECT_GFLOP,
                        help="skip direct mode for layers costing more (default %(default)s)")
    parser.add_argument("--wisdom", help="FFTW wisdom file to load before and save after")
    parser.add_argument("--json", help="also write the rows to this JSON file")


def _run_ops(args: argparse.Namespace) -> list[Row]:
    outsz2d = args.outsz2d if args.outsz2d[0] == 1 else (1, *args.outsz2d[1:])
    layers = tuple(args.layers) if args.layers else None
    request = ops.OpsRequest(layers, outsz2d, args.outsz, args.threads, args.repeat, args.dtype,
                             tuple(args.modes), not args.no_torch, args.max_direct_gflop, args.wisdom)
    rows = ops.run_ops_bench(request, progress=lambda r: _progress(
        f"  {r['layer']}: best {r['best_mode']} {r['best_ms']} ms, torch {r['torch_ms']} ms"))
    print(machine_line())  # after the run: a mistake is one line on stderr, nothing here
    print(ops.format_table(rows))
    if args.json:
        ops.write_json(rows, args.json)
    return rows


# ---------------------------------------------------------------------------------------------- znn bench net


def _net_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("network", help="a .znn network file (or a .h5 checkpoint: its spec, random weights)")
    parser.add_argument("--outsz", type=parse_triple, required=True, help="output patch z,y,x")
    parser.add_argument("--threads", type=int, nargs="+", default=[0],
                        help="workers and PyTorch threads, one run each (0: every core; e.g. --threads 1 2)")
    parser.add_argument("--plan-workers", type=positive_int, default=None,
                        help="build the step as for this many workers while running it on --threads (a small "
                             "machine shows the parallelism a large one would get); default: --threads")
    parser.add_argument("--repeat", type=positive_int, default=5, help="timed runs, median reported (default 5)")
    parser.add_argument("--mode", choices=MODES, default="fft",
                        help="conv mode of every layer; optimize measures each layer once and remembers")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eta", type=positive_number, default=net.DEFAULT_ETA, help="learning rate of the timed steps")
    parser.add_argument("--no-torch", action="store_true", help="do not build and time the PyTorch network")
    parser.add_argument("--torch-apart", action="store_true",
                        help="time PyTorch first, in a child process that exits before ours is built (for patches "
                             "where both do not fit in memory at once; the runs are then not interleaved)")
    parser.add_argument("--json", help="also write the report to this JSON file")


def _run_net(args: argparse.Namespace) -> list[dict[str, Any]]:
    request = net.NetRequest(args.network, args.outsz, args.threads[0], args.repeat, args.mode, not args.no_torch,
                             args.dtype, args.seed, args.eta, plan_workers=args.plan_workers,
                             torch_apart=args.torch_apart)
    reports = net.run_net_benches(request, args.threads, progress=lambda s: _progress(f"  {s}"))
    print(machine_line())
    print("\n\n".join(net.format_report(r) for r in reports))
    if len(reports) > 1:
        print("\n" + net.format_summary(reports))
    if args.json:  # one report, or every run's under "runs"
        write_json(args.json, reports[0] if len(reports) == 1 else {"runs": reports})
    return reports


# ---------------------------------------------------------------------------------------------- znn bench train


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("network", help="a .znn network file (or a .h5 checkpoint: its spec, random weights)")
    parser.add_argument("--outsz", type=parse_triple, required=True, help="output patch z,y,x")
    parser.add_argument("--replicas", type=positive_int, nargs="+", default=[1, 2],
                        help="replica counts, each on a local cluster of that many single-threaded workers "
                             "(default 1 2)")
    parser.add_argument("--steps", type=positive_int, default=5, help="timed steps per count (default 5)")
    parser.add_argument("--mode", choices=MODES, default="fft", help="conv mode of every layer")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows to this JSON file")


def _run_train(args: argparse.Namespace) -> list[Row]:
    request = train_bench.TrainBenchRequest(args.network, args.outsz, tuple(args.replicas), args.steps, args.mode,
                                            args.dtype, args.seed)
    rows = train_bench.run_train_bench(request, progress=lambda s: _progress(f"  {s}"))
    print(machine_line("local"))
    print(train_bench.format_table(rows))
    if args.json:
        write_rows(args.json, rows)
    return rows


# ---------------------------------------------------------------------------------------------- znn bench forward


def _forward_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nets", nargs="+", choices=forward.CHOICES, default=list(forward.NETWORKS),
                        help="networks (default: n337 n726; tiny3d for a quick run)")
    parser.add_argument("--outsz", type=positive_int, nargs="+",
                        help="output cube sides, run in ascending order (default: 16 32 48 64 96)")
    parser.add_argument("--threads", type=positive_int, default=2, help="threads of every engine (default 2)")
    parser.add_argument("--block-threads", type=positive_int, help="threads per znn block in the table of patches "
                                                                   "(default: 1 if one block per thread fits "
                                                                   "--memory, else --threads)")
    parser.add_argument("--repeat", type=positive_int, default=2, help="timed runs after a warm-up, median reported")
    parser.add_argument("--modes", choices=MODES, default="optimize",
                        help="conv modes (optimize: timed per layer, as the dense planner does)")
    parser.add_argument("--memory", type=memory, default="16GB",
                        help="memory an engine may use: znn's plan and the largest patch of each engine fit it; a "
                             "peer's largest is searched past --outsz, growing its cube while its measured growth "
                             "predicts the next peak within it (default 16GB)")
    parser.add_argument("--time-cap", type=positive_number, default=300.0,
                        help="seconds: skip (or do not grow to) a patch whose one pass the engine's measured growth "
                             "predicts longer, kill a run that takes (repeat + 1) times longer (default %(default)s)")
    parser.add_argument("--no-torch", action="store_true", help="do not run PyTorch")
    parser.add_argument("--no-ort", action="store_true", help="do not run ONNX Runtime")
    parser.add_argument("--no-grow", action="store_true",
                        help="do not grow the peers' cubes past --outsz: a peer's largest patch is its largest listed "
                             "cube that fits --memory (a quicker, less fair run)")
    parser.add_argument("--no-alternatives", action="store_true",
                        help="time only the plan's choice, not the alternatives at its patch")
    add_scheduler_argument(parser, "threads (default: blocks timed in a child process), synchronous, local (a "
                                   "cluster of --threads single-threaded workers on 127.0.0.1) or a scheduler address: "
                                   "znn's side of the table of patches is then dense inference on that cluster; "
                                   "default: dask config znn.scheduler, else threads")
    parser.add_argument("--json", help="also write the rows to this JSON file")


def _run_forward(args: argparse.Namespace) -> list[Row]:
    request = forward.ForwardBenchRequest(tuple(args.nets), args.outsz, args.threads, args.repeat, args.modes,
                                          args.memory, not args.no_torch, block_threads=args.block_threads,
                                          scheduler=args.scheduler, ort=not args.no_ort, time_cap=args.time_cap,
                                          alternatives=not args.no_alternatives, grow=not args.no_grow)
    rows = forward.run_forward_bench(request, progress=lambda r: _progress(forward.progress_line(r)))
    print(machine_line(resolve_scheduler(args.scheduler, None)))
    print(forward.format_table(rows))
    if args.json:
        write_rows(args.json, rows)
    return rows


# ---------------------------------------------------------------------------------------------- znn bench scaling


def _scaling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--net", choices=sorted(scaling.SCALING_NETWORKS), default="scaling",
                        help="network (default: workflows/cluster/scaling.znn)")
    parser.add_argument("--outsz", type=positive_int, default=48, help="output block side (default 48)")
    parser.add_argument("--blocks", type=positive_int, default=16,
                        help="blocks in the volume (default 16; a multiple of every worker count keeps workers "
                             "equally busy)")
    parser.add_argument("--workers", type=positive_int, nargs="+", default=[1, 2],
                        help="worker counts (default 1 2)")
    parser.add_argument("--repeat", type=positive_int, default=3)
    parser.add_argument("--modes", choices=MODES, default="optimize")
    parser.add_argument("--no-cache", action="store_true", help="recompute kernel spectra per block")
    add_scheduler_argument(parser, "measure this existing cluster (an address) instead of a local cluster of "
                                   "max(--workers) workers")
    parser.add_argument("--settings", nargs="+", choices=["znn", "dask"], default=["znn"],
                        help="worker settings of the local clusters: znn (znn.pipeline.run.schedulers.WORKER_SETTINGS, "
                             "the default) and/or dask (dask's defaults), measured side by side")
    parser.add_argument("--workdir", help="where the synthetic volume and outputs go (default: the system temp)")
    parser.add_argument("--json", help="also write the rows to this JSON file")


def _run_scaling(args: argparse.Namespace) -> list[Row]:
    request = scaling.ScalingRequest(args.net, args.outsz, args.blocks, tuple(args.workers), args.repeat, args.modes,
                                     not args.no_cache, args.scheduler, workdir=args.workdir,
                                     settings=tuple(args.settings))
    rows = scaling.run_scaling_bench(request)
    print(machine_line(args.scheduler))  # without --scheduler: a local cluster
    print(scaling.format_table(rows))
    if args.json:
        write_rows(args.json, rows)
    return rows
