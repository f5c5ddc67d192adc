"""Benchmarks that anyone can rerun; the numbers quoted in the docs come from here.

* :mod:`znn.bench.ops` -- one conv layer forward + backward, direct vs FFT vs PyTorch (``znn bench ops``).
"""

__all__: list[str] = []
