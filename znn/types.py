"""Small types shared by every layer: a (z, y, x) triple, a block index."""

from __future__ import annotations

Triple = tuple[int, int, int]  # a (z, y, x) size, offset, stride or dilation
Index = tuple[int, int, int]  # the (z, y, x) position of an output block in the block grid
