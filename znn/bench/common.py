"""What every benchmark shares: PyTorch when it is installed, the machine its figures come from, the table of
rows, and the rows as JSON (stamped with the machine)."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from znn.environment import machine
from znn.text import format_table

Row = dict[str, Any]


def import_torch() -> Any | None:
    """The ``torch`` module, or None when PyTorch (an optional extra) is not installed."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a name set to None in ``sys.modules``, Python's way
    of blocking an import, counts as missing)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class Column:
    """One column of a benchmark table: the row's ``key``, its ``title`` and the format of a value."""

    key: str
    title: str
    fmt: str = "{}"


def plain_cell(value: Any, fmt: str, list_sep: str = "x") -> str:
    """``-`` for a missing value, a list joined by ``list_sep`` (``8x16x32``), anything else by ``fmt``."""
    if value is None:
        return "-"
    if isinstance(value, list):
        return list_sep.join(map(str, value))
    return fmt.format(value)


def rows_table(columns: Sequence[Column], rows: Sequence[Row],
               cell: Callable[[Row, Column], str] | None = None) -> str:
    """The rows as right-aligned columns (numbers line up), one line per row under the titles."""
    show = cell or (lambda row, col: plain_cell(row.get(col.key), col.fmt))
    body = [[show(row, col) for col in columns] for row in rows]
    return format_table([col.title for col in columns], body, right=True, rule=False)


def machine_line(cluster: str | None = None) -> str:
    """The first line of every benchmark's table: the machine its figures were measured on (figures mean little
    without it). ``cluster``: the scheduler's address when the work ran on a cluster, whose workers may be other
    machines."""
    m = machine()
    physical = f" ({m['physical_cores']} physical)" if m["physical_cores"] else ""
    line = f"machine: {m['cpu']}, {m['logical_cores']} logical cores{physical}, {m['isa']}"
    if cluster is not None and "://" in cluster:
        line += f"; the workers of the cluster at {cluster} may be other machines"
    return line


def write_json(path: str | Path, payload: Mapping[str, Any]) -> None:
    """``payload`` as JSON at ``path``, with the machine it was measured on first (``"machine"``: see
    :func:`znn.environment.machine`)."""
    Path(path).write_text(json.dumps({"machine": machine(), **payload}, indent=1, default=str))


def write_rows(path: str | Path, rows: Sequence[Row], meta: dict[str, Any] | None = None) -> None:
    """``{"machine": {...}, "rows": [...]}`` (with ``meta`` before the rows when given) as JSON at ``path``."""
    payload: dict[str, Any] = {} if meta is None else {"meta": meta}
    payload["rows"] = list(rows)
    write_json(path, payload)


def mode_names(modes: str | Mapping[str, str]) -> str:
    """Conv modes for a table: one mode as given, a per-layer map as its distinct modes (``direct,fft``)."""
    return modes if isinstance(modes, str) else ",".join(sorted(set(modes.values())))
