"""`znn bench ...`: benchmarks that print tables (and JSON), never timed tests."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
from collections.abc import Callable

# bench subcommand -> module with `add_arguments(parser)` and `run_from_args(args)`; modules not present are skipped
BENCHES = {
    "ops": "znn.bench.ops",
    "net": "znn.bench.net",
    "forward": "znn.bench.forward",
    "scaling": "znn.bench.scaling",
}


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:  # type: ignore[type-arg]
    bench = sub.add_parser("bench", help="benchmarks: conv layers, whole networks, dense inference")
    kinds = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, module in BENCHES.items():
        if importlib.util.find_spec(module) is None:
            continue
        mod = importlib.import_module(module)
        p = kinds.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(bench_run=mod.run_from_args)
    return {"bench": _run}


def _run(args: argparse.Namespace) -> int:
    args.bench_run(args)
    return 0
