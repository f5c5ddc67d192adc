"""`znn describe NET.znn`: a table of a network's groups, FOV and input patch."""

from __future__ import annotations

import argparse

from znn.cli.args import Handler, Subparsers, parse_triple
from znn.pipeline.jobs.describe import describe, load_any_network


def register(sub: Subparsers) -> dict[str, Handler]:
    p = sub.add_parser("describe", help="table of a network's groups, FOV and input patch")
    p.add_argument("network", help="a .znn network file (or a .h5 checkpoint)")
    p.add_argument("--outsz", type=parse_triple, help="output patch z,y,x (default 1,1,1)")
    p.add_argument("--float64", action="store_true", help="estimate memory for float64")
    return {"describe": _cmd_describe}


def _cmd_describe(args: argparse.Namespace) -> int:
    spec = load_any_network(args.network)
    print(describe(spec, args.outsz or (1, 1, 1), itemsize=8 if args.float64 else 4))
    return 0
