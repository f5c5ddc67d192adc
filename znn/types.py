"""Small types shared by every layer: a (z, y, x) triple, a block index, a MALIS normalisation."""

from __future__ import annotations

from typing import Literal

Triple = tuple[int, int, int]  # a (z, y, x) size, offset, stride or dilation
Index = tuple[int, int, int]  # the (z, y, x) position of an output block in the block grid
MalisNorm = Literal["none", "frac", "num", "pair"]  # how MALIS normalises its pair weights (znn.ops.malis)


def parse_triple(text: str) -> Triple:
    """``z,y,x`` as three positive integers; ValueError (saying what is expected) otherwise."""
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise ValueError(f"{text!r} is not z,y,x (three integers like 1,100,100)") from None
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"{text!r} is not z,y,x (three positive integers like 1,100,100)")
    return values[0], values[1], values[2]
