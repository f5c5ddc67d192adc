"""Argument types and options that several commands share: each defined once."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from znn import types
from znn.errors import ZnnError
from znn.pipeline.run.schedulers import SCHEDULER_HELP
from znn.text import parse_bytes
from znn.types import Triple

Handler = Callable[[argparse.Namespace], int]
Subparsers = Any  # argparse's _SubParsersAction, private in typeshed


class ArgumentParser(argparse.ArgumentParser):
    """An argument parser whose mistakes end like the project's errors: one line on stderr, exit status 2 (argparse
    itself prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_triple(text: str) -> Triple:
    """``z,y,x``: three positive integers."""
    try:
        return types.parse_triple(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def triple_or_auto(text: str) -> Triple | str:
    return "auto" if text == "auto" else parse_triple(text)


def memory(text: str) -> int:
    """A memory size such as ``8GB``."""
    try:
        return parse_bytes(text)
    except ZnnError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def pyramid(text: str) -> int | str:
    """``--pyramid``: ``auto`` or a number of downsampled levels (the job key's values)."""
    from znn.io.config import parse_pyramid

    try:
        return parse_pyramid(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _number(text: str, convert: Callable[[str], float], kind: str) -> float:
    """``text`` as ``kind`` (``convert``: int or float), finite."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def _at_least(text: str, convert: Callable[[str], float], kind: str, low: float, strictly: bool = False) -> float:
    """``text`` as a finite ``kind`` >= ``low`` (> ``low`` when ``strictly``)."""
    value = _number(text, convert, kind)
    if value < low or (strictly and value == low):
        raise argparse.ArgumentTypeError(f"{text} is not {'>' if strictly else '>='} {low:g}")
    return value


def probability(text: str) -> float:
    value = _number(text, float, "a number")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not within [0, 1]")
    return value


def positive_number(text: str) -> float:
    """A finite number > 0 (minutes, a learning rate)."""
    return _at_least(text, float, "a number", 0, strictly=True)


def non_negative_number(text: str) -> float:
    """A finite number >= 0 (a limit)."""
    return _at_least(text, float, "a number", 0)


def count(text: str) -> int:
    """An integer >= 0 (an iteration)."""
    return int(_at_least(text, int, "an integer", 0))


def positive_int(text: str) -> int:
    return int(_at_least(text, int, "an integer", 1))


SCHEDULER_OPTION_HELP = (f"where the work runs: {SCHEDULER_HELP} (local: a cluster of num_threads single-threaded "
                         "worker processes on 127.0.0.1). Overrides the job's scheduler key; default: the job's key, "
                         "else dask config znn.scheduler, else threads")


def add_scheduler_argument(parser: argparse.ArgumentParser, help_text: str = SCHEDULER_OPTION_HELP) -> None:
    """``--scheduler`` as every command spells it (resolved by :func:`~znn.pipeline.run.schedulers.resolve_scheduler`);
    ``help_text`` says what it means where a command gives it a meaning of its own (the benchmarks)."""
    parser.add_argument("--scheduler", metavar="SCHEDULER", help=help_text)


def non_negative_triple(text: str) -> Triple:
    """``z,y,x``: three integers >= 0 (a halo)."""
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not z,y,x (three integers >= 0 like 8,32,32)")
    return values[0], values[1], values[2]


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """The settings of the segmentation method (:class:`znn.ops.segment.Method`), as `znn segment` and
    `znn evaluate --segment watershed` spell them; left out, each takes the method's default for the map's type."""
    from znn.ops.segment import method_defaults

    boundary, affinity = method_defaults("boundary"), method_defaults("affinity")

    def both(key: str) -> str:
        return f"default {boundary[key]:g} for boundary maps, {affinity[key]:g} for affinities"

    parser.add_argument("--seed-threshold", type=probability, help="seeds: connected voxels whose (smoothed) "
                        "boundary probability is below this; for affinities, voxels joined by edges above 1 minus "
                        f"this ({both('seed_threshold')})")
    parser.add_argument("--min-size", type=count, help=f"segments smaller than this many voxels join a neighbour "
                        f"({both('min_size')})")
    parser.add_argument("--sigma", type=non_negative_number, help="Gaussian smoothing of the height map in voxels, "
                        f"in-plane only in 2d ({both('sigma')})")
    parser.add_argument("--merge-threshold", type=probability, help="merge neighbouring regions while the mean "
                        "affinity of the voxel edges between them (for boundary maps, one minus the larger boundary "
                        "probability of each edge's two voxels) is above this; 1 merges nothing "
                        f"({both('merge_threshold')})")


def method_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The method settings given on the command line (those left out take the method's defaults)."""
    keys = ("seed_threshold", "min_size", "sigma", "merge_threshold")
    return {key: getattr(args, key) for key in keys if getattr(args, key, None) is not None}


def add_quiet_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def log(text: str) -> None:
    """Progress and notes go to stderr; results to stdout."""
    print(text, file=sys.stderr, flush=True)


def notes(quiet: bool) -> Callable[[str], None]:
    """Where a command's notes go: :func:`log`, or nowhere under ``--quiet`` (a failure's message is then the
    only line on stderr)."""
    return (lambda text: None) if quiet else log
