"""The `znn` command: one thin module per command (parse arguments, call one job, print). A user's mistake ends
in one line naming the file, line or key at fault, with exit status 2; no traceback."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from znn.cli.args import ArgumentParser, Handler
from znn.environment import keep_freed_memory
from znn.errors import ZnnError

# Modules that add commands: each has `register(subparsers) -> {command: handler}`.
COMMAND_MODULES = (
    "znn.cli.describe",
    "znn.cli.train",
    "znn.cli.forward",
    "znn.cli.segment",
    "znn.cli.evaluate",
    "znn.cli.workflow",
    "znn.cli.bench",
)
# Commands that train (or time training steps): they set glibc's malloc to keep freed memory before any thread
# starts, which is the only time the setting reaches every thread (see keep_freed_memory).
TRAINING_COMMANDS = frozenset({"train", "quickstart", "run", "bench"})


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    parser = ArgumentParser(prog="znn", description="ZNN-compatible convolutional networks for EM, on dask")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, Handler] = {}
    for name in COMMAND_MODULES:
        commands.update(importlib.import_module(name).register(sub))
    return parser, commands


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    if args.command in TRAINING_COMMANDS:
        keep_freed_memory()
    try:
        return commands[args.command](args)
    except ZnnError as exc:
        print(f"znn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"znn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
