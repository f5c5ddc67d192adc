"""A small progress reporter for long loops (dense inference blocks, training iterations).

``Progress(total, unit, label)`` draws a one-line bar on a terminal (count, rate, ETA, extra fields) and, when the
stream is not a terminal (a log file, CI), prints a plain line every ``every_percent`` per cent instead, so logs
stay short. ``update(n, **fields)`` adds ``n`` units; keyword fields (``voxels=...``) are summed when numeric and
shown as rates when they are counts (``rate_fields``) or as values otherwise.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable
from typing import Any, TextIO

__all__ = ["Progress", "format_duration", "format_count"]


def format_duration(seconds: float) -> str:
    """``75`` -> ``1:15``, ``3725`` -> ``1:02:05``."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_count(value: float) -> str:
    """Engineering-style short numbers: 1234 -> 1.23k, 2.5e6 -> 2.50M."""
    for limit, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.2f}{suffix}"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class Progress:
    """Progress of ``total`` units of ``unit`` (e.g. 120 ``blocks``), labelled ``label``, written to ``stream``.

    Thread-safe. ``rate_fields`` names keyword fields of :meth:`update` that are summed and shown as a rate per
    second (``voxels`` -> ``1.2M voxels/s``); other fields are shown as their latest value. ``initial`` units may
    count as already done (skipped work): they are shown but excluded from the rate and ETA. The bar is drawn when
    ``stream`` is a terminal (``tty``, an attribute to override), at most every ``min_interval`` seconds.
    """

    min_interval = 0.2

    def __init__(self, total: int, unit: str = "items", label: str = "", stream: TextIO | None = None, *,
                 initial: int = 0, rate_fields: Iterable[str] = ("voxels",), every_percent: float = 10.0,
                 enabled: bool = True):
        self.total = max(0, int(total))
        self.unit = unit
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_percent = every_percent
        self.rate_fields = tuple(rate_fields)
        self.initial = int(initial)
        self.count = int(initial)
        self.sums: dict[str, float] = {}
        self.values: dict[str, Any] = {}
        self.start = time.perf_counter()
        self._lock = threading.Lock()
        self._last_draw = 0.0
        self._last_percent = -1.0
        self._closed = False
        self._printed = -1
        if self.initial and not self.tty:
            self._line(f"{self.initial} of {self.total} {self.unit} already done")

    # -- public ---------------------------------------------------------------------------------------------
    def update(self, n: int = 1, **fields: Any) -> None:
        """Add ``n`` finished units; numeric ``rate_fields`` are accumulated, other fields replace the shown value."""
        with self._lock:
            self.count += n
            for key, value in fields.items():
                if key in self.rate_fields:
                    self.sums[key] = self.sums.get(key, 0.0) + float(value)
                else:
                    self.values[key] = value
            self._maybe_draw()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def rate(self, field: str | None = None) -> float:
        """Units (or ``field``) per second since the start, counting only work done here."""
        done = self.sums.get(field, 0.0) if field else self.count - self.initial
        return done / self.elapsed if self.elapsed > 0 else 0.0

    def eta(self) -> float | None:
        r = self.rate()
        return (self.total - self.count) / r if r > 0 else None

    def describe(self) -> str:
        """The status line (without a bar): ``label: 3/10 blocks, 1.2M voxels/s, elapsed 0:10, ETA 0:23``."""
        parts = [f"{self.count}/{self.total} {self.unit}"]
        for key in self.rate_fields:
            if key in self.sums:
                parts.append(f"{format_count(self.rate(key))} {key}/s")
        parts.extend(f"{k} {v}" for k, v in self.values.items())
        parts.append(f"elapsed {format_duration(self.elapsed)}")
        eta = self.eta()
        if self.count < self.total and eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        return (f"{self.label}: " if self.label else "") + ", ".join(parts)

    def close(self) -> None:
        """Draw the final state (once) and end the terminal line."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self.enabled:
                return
            if self.tty:
                self._draw_bar()
                self.stream.write("\n")
                self.stream.flush()
            elif self._printed != self.count or self.count == self.initial:
                self._line(self.describe() + (" (done)" if self.count >= self.total else ""))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- drawing --------------------------------------------------------------------------------------------
    def _maybe_draw(self) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if now - self._last_draw >= self.min_interval or self.count >= self.total:
                self._last_draw = now
                self._draw_bar()
            return
        percent = 100.0 * self.count / self.total if self.total else 100.0
        step = max(self.every_percent, 1e-9)
        if int(percent // step) > int(self._last_percent // step) or self._last_percent < 0:
            self._last_percent = percent
            self._printed = self.count
            self._line(self.describe() + (" (done)" if self.count >= self.total else ""))

    def _draw_bar(self, width: int = 24) -> None:
        frac = self.count / self.total if self.total else 1.0
        filled = int(round(width * min(1.0, frac)))
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r[{bar}] {100 * frac:5.1f}% {self.describe()}\x1b[K")
        self.stream.flush()

    def _line(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text + "\n")
            self.stream.flush()
