"""ZNN's parameter initialisers, seeded.

Names and defaults follow ZNN (``init`` / ``init_args`` of a `.znn` block): ``zero``, ``constant`` (value),
``uniform`` (min,max; default -0.1,0.1; one value v means -v,v), ``gaussian`` (mean,std; default 0,0.01),
``bernoulli`` (p; default 0.5), ``xavier`` (uniform +-sqrt(6/(fan_in+fan_out))), ``msra`` (gaussian with
std sqrt(2/fan_in)). Fan-in of a conv edge group is in_maps * kernel volume, fan-out out_maps * kernel volume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

INITIALISERS = ("zero", "constant", "uniform", "gaussian", "bernoulli", "xavier", "msra")

# How many init_args each initialiser takes: (minimum, maximum).
INIT_ARG_COUNTS = {
    "zero": (0, 0),
    "constant": (1, 1),
    "uniform": (0, 2),
    "gaussian": (0, 2),
    "bernoulli": (0, 1),
    "xavier": (0, 0),
    "msra": (0, 0),
}


def initialise(
    name: str,
    shape: Sequence[int],
    rng: np.random.Generator,
    args: Sequence[float] = (),
    fan_in: float = 1.0,
    fan_out: float = 1.0,
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """An array of ``shape`` filled by ZNN initialiser ``name`` with ``args``, drawn from ``rng``."""
    args = tuple(float(a) for a in args)
    if name == "zero":
        values = np.zeros(shape)
    elif name == "constant":
        values = np.full(shape, args[0] if args else 0.0)
    elif name == "uniform":
        low, high = _uniform_bounds(args)
        values = rng.uniform(low, high, size=shape)
    elif name == "gaussian":
        mean, std = args if len(args) == 2 else (0.0, 0.01)
        values = rng.normal(mean, std, size=shape)
    elif name == "bernoulli":
        p = args[0] if args else 0.5
        values = (rng.random(size=shape) < p).astype(np.float64)
    elif name == "xavier":
        r = np.sqrt(6.0) / np.sqrt(fan_in + fan_out)
        values = rng.uniform(-r, r, size=shape)
    elif name == "msra":
        values = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)
    else:
        raise ValueError(f"unknown initialiser {name!r}; valid: {', '.join(INITIALISERS)}")
    return np.asarray(values, dtype=dtype)


def _uniform_bounds(args: tuple[float, ...]) -> tuple[float, float]:
    if not args:
        return -0.1, 0.1
    if len(args) == 1:
        return -abs(args[0]), abs(args[0])
    return args[0], args[1]
