"""The `znn` command. User mistakes end in one line naming the file, line or key at fault; no traceback."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence

from znn.errors import ZnnError


def parse_triple(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not z,y,x (three integers like 1,100,100)") from None
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not z,y,x (three positive integers like 1,100,100)")
    return values  # type: ignore[return-value]


def _cmd_describe(args: argparse.Namespace) -> int:
    from znn.describe import describe, load_any_network

    spec = load_any_network(args.network)
    print(describe(spec, args.outsz or (1, 1, 1), itemsize=8 if args.float64 else 4))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"describe": _cmd_describe}


# Modules that add commands: each has `register(subparsers) -> {command: handler}`. A module not (yet) in the
# package is skipped; one that exists but fails to import is a bug and raises.
COMMAND_MODULES = (
    "znn.bench.cli",
    "znn.pipeline.train_cli",
    "znn.pipeline.forward_cli",
    "znn.pipeline.evaluate_cli",
    "znn.pipeline.workflow_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="znn", description="ZNN-compatible convolutional networks for EM, on dask")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("describe", help="table of a network's groups, FOV and input patch")
    p.add_argument("network", help="a .znn network file (or a .h5 checkpoint)")
    p.add_argument("--outsz", type=parse_triple, help="output patch z,y,x (default 1,1,1)")
    p.add_argument("--float64", action="store_true", help="estimate memory for float64")
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            COMMANDS.update(importlib.import_module(name).register(sub))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ZnnError as exc:
        print(f"znn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"znn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
