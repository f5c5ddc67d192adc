"""What an engine's next, larger patch will cost, from the patches it ran: `znn bench forward` runs each engine at
ascending output patches and skips a patch that the measured growth says would pass the time cap or the machine's
memory, or that follows a patch the engine could not finish; past the listed patches, how far a peer grows to find
its own largest patch in a memory budget (:func:`next_side`); and which measured patch is the largest that fits.

Growth is extrapolated over input-patch voxels (what every layer's activations scale with): through the two
largest patches measured (slope at least zero), or in proportion from one.
"""

from __future__ import annotations

import math
from fractions import Fraction
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from znn.bench.common import Row

__all__ = ["Point", "extrapolate", "skip_reason", "GROWTH", "MAX_GROWN", "grain", "next_side", "largest_fit"]

# The most one growth step multiplies a cube's side by (exact, so 96 grows to 128 with no rounding below it).
GROWTH = Fraction(4, 3)
# Growth steps per engine at the most: where peak and time hardly grow with the patch (a tiny network) nothing else
# would stop it; (4/3)^6 is over 5x the side.
MAX_GROWN = 6


@dataclass(frozen=True)
class Point:
    """One run of an engine: ``voxels`` of its input patch, ``seconds`` of one pass, ``peak_rss`` bytes; ``failed``:
    killed or crashed (larger patches are not tried)."""

    voxels: int
    seconds: float = 0.0
    peak_rss: int = 0
    failed: bool = False


def extrapolate(points: Sequence[Point], voxels: int) -> tuple[float, float] | None:
    """Predicted (seconds, peak bytes) at ``voxels`` from the successful ``points``; None without any."""
    done = sorted((p for p in points if not p.failed), key=lambda p: p.voxels)
    if not done:
        return None
    last = done[-1]
    if len(done) == 1 or done[-2].voxels == last.voxels:
        scale = voxels / max(1, last.voxels)
        return last.seconds * scale, last.peak_rss * scale
    prev = done[-2]
    span = last.voxels - prev.voxels

    def line(a: float, b: float) -> float:
        return b + max(0.0, (b - a) / span) * (voxels - last.voxels)

    return line(prev.seconds, last.seconds), line(prev.peak_rss, last.peak_rss)


def skip_reason(points: Sequence[Point], voxels: int, time_cap: float, memory: int) -> str | None:
    """Why an engine with runs ``points`` should not run a patch of ``voxels`` input voxels, or None: a smaller
    patch failed, or one pass is predicted over ``time_cap`` seconds or its peak over ``memory`` bytes."""
    if any(p.failed and p.voxels <= voxels for p in points):
        return "skipped (a smaller patch did not finish)"
    predicted = extrapolate(points, voxels)
    if predicted is None:
        return None
    seconds, peak = predicted
    if seconds > time_cap:
        return f"skipped (time cap: a pass predicted {seconds:.0f} s > {time_cap:.0f} s)"
    if peak > memory:
        return f"skipped (memory: predicted peak {peak / 2**30:.1f} GiB > {memory / 2**30:.1f} GiB)"
    return None


def grain(side: int) -> int:
    """The sides one growth step from ``side`` lands on are multiples of this: the largest power of two up to
    ``side / 8`` (at least 1), fine enough to come near the largest patch that fits, coarse enough that the runs
    there stay few."""
    return 1 << max(0, (side // 8).bit_length() - 1)


def next_side(points: Sequence[Point], side: int, voxels_of: Callable[[int], int], time_cap: float,
              memory: int) -> int | None:
    """The output cube side a peer grows to after ``side``, the largest it ran (``points``: its runs, in input
    voxels; ``voxels_of``: input voxels of an output cube side): the largest multiple of :func:`grain` above ``side``
    and at most ``side * GROWTH`` (at least one grain above it) that :func:`skip_reason` lets run within
    ``time_cap`` seconds and ``memory`` bytes (the prediction from the runs so far). None, so growth stops, when a run failed or was killed, or even
    the smallest step is predicted over the time cap or the memory."""
    if not points or any(p.failed for p in points):
        return None
    step = grain(side)
    top = max(side + step, int(side * GROWTH) // step * step)  # 2 * 4/3 is below 3
    for candidate in range(top, side, -step):  # predictions only grow with the side: the first that fits is it
        if skip_reason(points, voxels_of(candidate), time_cap, memory) is None:
            return candidate
    return None


def largest_fit(rows: Sequence[Row], memory: int) -> Row | None:
    """Of the measured ``rows`` (``outsz``, ``vox_s``, ``peak_rss``), the one of the largest output patch whose peak
    resident memory fits ``memory`` bytes (the faster of equal patches); None when none fits."""
    fits = [r for r in rows if r.get("vox_s") is not None and 0 < r.get("peak_rss", 0) <= memory]
    if not fits:
        return None
    return max(fits, key=lambda r: (math.prod(r["outsz"]), r["vox_s"]))
