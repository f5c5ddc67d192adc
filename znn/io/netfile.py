"""Read `.znn` network files (ZNN's plain-text network language) into a :class:`~znn.spec.NetworkSpec`.

One ``key value`` pair per line; ``nodes NAME`` / ``edges NAME`` open a block. See docs/formats.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from znn.errors import NetworkSpecError, closest, where
from znn.io.files import read_text
from znn.ops.init import INIT_ARG_COUNTS
from znn.spec import (
    EDGE_TYPES,
    NODE_TYPES,
    TRANSFER_FUNCTIONS,
    EdgeGroup,
    NetworkSpec,
    NodeGroup,
)
from znn.types import Triple, parse_triple

_Parsed = TypeVar("_Parsed")
_Default = TypeVar("_Default")

# Keys ZNN accepts but this project has no use for beyond keeping them (per-edge overrides, loader hints).
_PASSIVE_KEYS = ("repeat", "fft", "eta", "momentum", "weight_decay", "load")
NODE_KEYS = ("type", "size", "function", "function_args", "dense", "init", "init_args", *_PASSIVE_KEYS)
EDGE_KEYS = ("type", "input", "output", "size", "stride", "init", "init_args", "ratio", "offset", *_PASSIVE_KEYS)
EDGE_REQUIRED = {
    "conv": ("size",),
    "max_filter": ("size",),
    "max_pool": ("size",),
    "dropout": (),
    "crop": ("offset",),
    "maxout": (),
}


def load_network(path: str | Path) -> NetworkSpec:
    """Parse and validate the `.znn` file at ``path``."""
    return parse_network(read_text(path, NetworkSpecError, ".znn network file", "give the path of a .znn file"), path)


def parse_network(text: str, path: str | Path | None = None) -> NetworkSpec:
    """Parse `.znn` text; ``path`` only labels error messages."""
    label = str(path) if path is not None else None
    blocks = _split_blocks(text, label)
    nodes = [_node(b, label) for b in blocks if b["kind"] == "nodes"]
    edges = [_edge(b, label) for b in blocks if b["kind"] == "edges"]
    return NetworkSpec.from_groups(nodes, edges, label)


def _split_blocks(text: str, path: str | None) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    seen: dict[tuple[str, str], int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise NetworkSpecError(
                f"{where(path, number)}: expected `key value` (two words), got {raw.strip()!r}; "
                "lists are written without spaces, like `size 1,7,7`"
            )
        key, value = parts
        if key in ("nodes", "edges"):
            if (key, value) in seen:
                raise NetworkSpecError(
                    f"{where(path, number)}: {key} {value!r} is defined twice (first on line {seen[key, value]}); "
                    "names must be unique"
                )
            seen[key, value] = number
            blocks.append({"kind": key, "name": value, "line": number, "pairs": {}, "lines": {}})
            continue
        if not blocks:
            raise NetworkSpecError(
                f"{where(path, number)}: {key!r} appears before any block; start with `nodes NAME` or `edges NAME`"
            )
        block = blocks[-1]
        if key in block["pairs"]:
            raise NetworkSpecError(
                f"{where(path, number)}: key {key!r} repeated in {block['kind']} {block['name']} "
                f"(first on line {block['lines'][key]})"
            )
        block["pairs"][key] = value
        block["lines"][key] = number
    return blocks


class _Reader:
    """Typed access to one block's pairs, raising errors that name the file, line and key."""

    def __init__(self, block: dict[str, Any], path: str | None, known: tuple[str, ...]):
        self.block, self.path = block, path
        self.pairs: dict[str, str] = block["pairs"]
        for key in self.pairs:
            if key not in known:
                self.fail(key, f"unknown key {key!r}; {closest(key, known)}")

    def fail(self, key: str | None, message: str) -> NoReturn:
        line = self.block["lines"].get(key, self.block["line"]) if key else self.block["line"]
        raise NetworkSpecError(f"{where(self.path, line)}: {self.block['kind']} {self.block['name']}: {message}")

    def get(self, key: str, parse: Callable[[str], _Parsed], default: _Default, what: str) -> _Parsed | _Default:
        if key not in self.pairs:
            return default
        try:
            return parse(self.pairs[key])
        except ValueError:
            self.fail(key, f"{key} {self.pairs[key]!r} is not {what}")

    def require(self, key: str, what: str) -> str:
        if key not in self.pairs:
            self.fail(None, f"missing key {key!r} ({what})")
        return self.pairs[key]

    def choice(self, key: str, choices: tuple[str, ...], default: str | None = None) -> str:
        value = self.pairs.get(key, default)
        if value is None:
            self.fail(None, f"missing key {key!r}; valid: {', '.join(choices)}")
        if value not in choices:
            self.fail(key, f"{key} {value!r} is not known; {closest(str(value), choices)}")
        return str(value)

    def args(self, key: str, name: str, counts: tuple[int, int]) -> tuple[float, ...]:
        values = self.get(key, _floats, (), "a comma-separated list of numbers")
        low, high = counts
        if not low <= len(values) <= high:
            self.fail(key, f"{name} takes {low} to {high} arguments, got {len(values)}")
        return values


def _node(block: dict[str, Any], path: str | None) -> NodeGroup:
    r = _Reader(block, path, NODE_KEYS)
    kind = r.choice("type", NODE_TYPES)
    size = r.get("size", _positive_int, None, "a positive integer")
    if size is None:
        r.fail(None, "missing key 'size' (the number of feature maps)")
    function = r.choice("function", tuple(TRANSFER_FUNCTIONS), "linear")
    init = r.choice("init", tuple(INIT_ARG_COUNTS), "zero")
    return NodeGroup(
        name=block["name"], type=kind, options=dict(r.pairs), lines=dict(block["lines"]), line=block["line"],
        path=path, size=size, function=function,
        function_args=r.args("function_args", function, TRANSFER_FUNCTIONS[function]),
        dense=r.get("dense", _flag, False, "0 or 1"),
        init=init, init_args=r.args("init_args", init, INIT_ARG_COUNTS[init]),
    )


def _edge(block: dict[str, Any], path: str | None) -> EdgeGroup:
    r = _Reader(block, path, EDGE_KEYS)
    kind = r.choice("type", EDGE_TYPES)
    for key in EDGE_REQUIRED[kind]:
        r.require(key, f"a {kind} edge needs it as z,y,x")
    size = r.get("size", parse_triple, (1, 1, 1), "a z,y,x triple of positive integers like 1,3,3")
    stride = r.get("stride", parse_triple, (1, 1, 1), "a z,y,x triple of positive integers like 1,2,2")
    if kind == "max_pool" and stride not in ((1, 1, 1), size):
        r.fail("stride", f"max_pool is non-overlapping: stride must equal size {','.join(map(str, size))} (or be omitted)")
    init = r.choice("init", tuple(INIT_ARG_COUNTS), "zero")
    ratio = r.get("ratio", float, 0.5, "a number")
    if not 0.0 < ratio <= 1.0:  # ZNN's ratio is the probability of keeping a voxel
        r.fail("ratio", f"dropout ratio {ratio} (the keep probability) must be in (0, 1]")
    return EdgeGroup(
        name=block["name"], type=kind, options=dict(r.pairs), lines=dict(block["lines"]), line=block["line"],
        path=path, input=r.require("input", "the node group it reads"),
        output=r.require("output", "the node group it writes"),
        size=size, stride=stride,
        offset=r.get("offset", _nonnegative_triple, (0, 0, 0), "a z,y,x triple of integers >= 0"),
        ratio=ratio, init=init, init_args=r.args("init_args", init, INIT_ARG_COUNTS[init]),
    )


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v != "")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _flag(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError(text)
    return text == "1"


def _nonnegative_triple(text: str) -> Triple:
    values = _ints(text)
    if min(values) < 0:
        raise ValueError(text)
    return values


def _ints(text: str) -> Triple:
    values = tuple(int(v) for v in text.split(","))
    if len(values) != 3:
        raise ValueError(text)
    return values
