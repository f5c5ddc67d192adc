"""The input side of dense inference: input files, their preprocessing statistics, mirrored region reads."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np

from znn.errors import ConfigError, ShapeError, VolumeError

PP_TYPES = ("none", "standard2D", "standard3D", "symetric_rescale")


# ---------------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class InputFile:
    """One input volume file (``path`` in the syntax of :func:`znn.io.volume.parse_volume_path`) and its
    preprocessing (a ``pp_types`` name of the .spec file)."""

    path: str
    pp: str = "none"


@dataclass(frozen=True)
class Source:
    """A preprocessed input channel group: the file, its (c, z, y, x) shape, and per-z ``offset``/``scale`` such that
    the network sees ``(raw - offset[z]) * scale[z]``."""

    path: str
    shape: tuple[int, int, int, int]
    offset: np.ndarray
    scale: np.ndarray


def _as_4d(shape: Sequence[int], path: str) -> tuple[int, int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        return (1, 1, *shape)  # type: ignore[return-value]
    if len(shape) == 3:
        return (1, *shape)  # type: ignore[return-value]
    if len(shape) == 4:
        return shape  # type: ignore[return-value]
    raise VolumeError(f"{path}: a {len(shape)}D volume; inputs are 2D to 4D (channels, z, y, x)")


def preprocess_stats(path: str, pp: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-z ``(offset, scale)`` of preprocessing ``pp`` over the whole volume at ``path``, computed out of core.

    ``standard2D``: per slice zero mean, unit (population) std; ``standard3D``: the same over the whole volume;
    ``symetric_rescale``: min..max to -1..1; ``none``: identity. A constant slice/volume gets scale 1.
    """
    from znn.io.volume import open_volume

    if pp not in PP_TYPES:
        raise ConfigError(f"{path}: preprocessing {pp!r} is not known; use one of {', '.join(PP_TYPES)}")
    arr = open_volume(path)
    c, z, _, _ = _as_4d(arr.shape, path)
    if pp == "none":
        return np.zeros(z), np.ones(z)
    vol = arr.reshape((c, z, *arr.shape[-2:])).astype(np.float64)
    with dask.config.set(scheduler="threads"):
        if pp == "standard2D":
            mean, sq = dask.compute(vol.mean(axis=(0, 2, 3)), (vol * vol).mean(axis=(0, 2, 3)))
        elif pp == "standard3D":
            m, s = dask.compute(vol.mean(), (vol * vol).mean())
            mean, sq = np.full(z, m), np.full(z, s)
        else:
            lo, hi = dask.compute(vol.min(), vol.max())
            span = float(hi - lo)
            scale = 2.0 / span if span > 0 else 1.0
            # 2 (x - lo) / span - 1 = (x - (lo + span / 2)) * 2 / span
            return np.full(z, float(lo) + span / 2), np.full(z, scale)
    std = np.sqrt(np.maximum(np.asarray(sq) - np.asarray(mean) ** 2, 0.0))
    return np.asarray(mean, np.float64), np.where(std > 0, 1.0 / np.where(std > 0, std, 1.0), 1.0)


def open_sources(files: Sequence[InputFile]) -> list[Source]:
    from znn.io.volume import volume_shape_dtype

    out = []
    for f in files:
        shape, _ = volume_shape_dtype(f.path)
        offset, scale = preprocess_stats(f.path, f.pp)
        out.append(Source(f.path, _as_4d(shape, f.path), offset, scale))
    return out


def mirror_indices(start: int, stop: int, n: int) -> np.ndarray:
    """Source indices of positions ``start..stop-1`` of an axis of length ``n`` extended by mirroring (NumPy's
    ``reflect``: the border voxel is not repeated; repeated reflection where the extension exceeds ``n``)."""
    i = np.arange(start, stop)
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    m = np.mod(i, period)
    return np.where(m >= n, period - m, m)


_OPENED: dict[str, Any] = {}
_OPENED_LOCK = threading.Lock()


def _opened(path: str) -> Any:
    """The lazily opened volume at ``path`` (one per process)."""
    from znn.io.volume import open_volume

    with _OPENED_LOCK:
        if path not in _OPENED:
            _OPENED[path] = open_volume(path)
        return _OPENED[path]


def read_region(src: Source, lo: Sequence[int], size: Sequence[int], mirror: bool, dtype: np.dtype) -> np.ndarray:
    """Preprocessed channels ``(c, *size)`` of ``src`` starting at volume position ``lo`` (may be negative or past
    the end when mirroring)."""
    shape3 = src.shape[1:]
    idx = [mirror_indices(a, a + s, n) if mirror else np.arange(a, a + s) for a, s, n in zip(lo, size, shape3)]
    if not mirror and any(i[0] < 0 or i[-1] >= n for i, n in zip(idx, shape3)):
        raise ShapeError(f"{src.path}: block reads outside the volume {shape3}; enable is_bd_mirror")
    box = [(int(i.min()), int(i.max()) + 1) for i in idx]
    arr = _opened(src.path)
    sl = tuple(slice(a, b) for a, b in box)
    if arr.ndim == 2:
        raw = np.asarray(arr[sl[1:]].compute(scheduler="sync"))[None, None]
    elif arr.ndim == 3:
        raw = np.asarray(arr[sl].compute(scheduler="sync"))[None]
    else:
        raw = np.asarray(arr[(slice(None), *sl)].compute(scheduler="sync"))
    z0, z1 = box[0]
    offset = src.offset[z0:z1].astype(dtype)[None, :, None, None]
    scale = src.scale[z0:z1].astype(dtype)[None, :, None, None]
    data = (raw.astype(dtype) - offset) * scale
    local = [i - a for i, (a, _) in zip(idx, box)]
    if all(len(li) == b - a and (li == np.arange(b - a)).all() for li, (a, b) in zip(local, box)):
        return np.ascontiguousarray(data)
    return np.ascontiguousarray(data[np.ix_(np.arange(data.shape[0]), *local)])
