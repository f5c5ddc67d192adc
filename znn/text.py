"""How the project writes numbers and tables for people: each format defined once."""

from __future__ import annotations

import re
from collections.abc import Sequence

from znn.errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}


def parse_bytes(text: str | int | float) -> int:
    """``"8GB"`` -> 8e9, ``"512MiB"`` -> 512 * 2**20, ``"1.5g"`` -> 1.5 * 2**30; plain numbers are bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"memory {text!r} is not a size; write e.g. 8GB, 512MiB or 2000000000")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``: binary units, one decimal (whole bytes below 1 KiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def zyx(values: Sequence[int]) -> str:
    """``(1, 2, 3)`` -> ``1,2,3``, as job files and ``--outsz`` write a triple."""
    return ",".join(str(v) for v in values)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, right: bool = False,
                 rule: bool = True) -> str:
    """Columns two spaces apart, each as wide as its widest cell; left-aligned (``right``: right-aligned, for
    numbers); a dashed rule under the header when ``rule``."""
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).rjust(w) if right else str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    lines = [line(header)] + ([line(["-" * w for w in widths])] if rule else []) + [line(r) for r in rows]
    return "\n".join(lines)
