"""The input side of dense inference: input files, their preprocessing statistics, mirrored region reads."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from dask.base import compute

from znn.errors import (
    ConfigError,
    NonFiniteError,
    ShapeError,
    VolumeError,
    ZnnFileNotFoundError,
)
from znn.io.finite import first_of_records, in_file, non_finite_records
from znn.ops.preprocess import IMAGE_PP_TYPES, ImageStats, Normalisation, normalisation
from znn.spec import NetworkSpec

Shape4 = tuple[int, int, int, int]


# ---------------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class InputFile:
    """One input volume file (``path`` in the syntax of :func:`znn.io.volume.parse_volume_path`) and its
    preprocessing (a ``pp_types`` name of the .spec file)."""

    path: str
    pp: str = "none"


@dataclass(frozen=True)
class Source:
    """A preprocessed input channel group: the file, its (c, z, y, x) shape, and the per-z normalisation of its
    preprocessing over the whole volume (what the network sees of it)."""

    path: str
    shape: Shape4
    norm: Normalisation


def as_4d(shape: Sequence[int], path: str) -> Shape4:
    """A volume's shape as (channels, z, y, x)."""
    dims = tuple(int(s) for s in shape)
    if len(dims) == 2:
        return (1, 1, dims[0], dims[1])
    if len(dims) == 3:
        return (1, dims[0], dims[1], dims[2])
    if len(dims) == 4:
        return (dims[0], dims[1], dims[2], dims[3])
    raise VolumeError(f"{path}: a {len(dims)}D volume; inputs are 2D to 4D (channels, z, y, x)")


def input_files(spec: NetworkSpec, inputs: Mapping[str, Sequence[InputFile | str]]) -> dict[str, list[InputFile]]:
    """The files of every network input node (a plain path is a file without preprocessing); ConfigError for a
    node without files, ZnnFileNotFoundError for a file that does not exist."""
    from znn.io.volume import parse_volume_path

    missing = [n for n in spec.inputs if n not in inputs]
    if missing:
        raise ConfigError(f"no input volume for network input(s) {', '.join(missing)}; the network's inputs are "
                          f"{', '.join(spec.inputs)} (give input1, input2, ... in the sample's [sampleN] section)")
    files = {n: [f if isinstance(f, InputFile) else InputFile(str(f)) for f in inputs[n]] for n in spec.inputs}
    for node, found in files.items():
        for f in found:
            if not parse_volume_path(f.path).file.exists():
                raise ZnnFileNotFoundError(f"{f.path}: input volume for network input {node!r} not found")
    return files


def preprocess_stats(path: str, pp: str) -> Normalisation:
    """Per-z normalisation of preprocessing ``pp`` over the whole volume at ``path``, its statistics computed out
    of core (one pass over the volume; the formula is :func:`znn.ops.preprocess.normalisation`'s).

    ``standard2D``: per slice zero mean, unit (population) std; ``standard3D``: the same over the whole volume;
    ``symetric_rescale``: min..max to -1..1; ``none``: identity. A constant slice/volume is only centred.
    The same pass looks for NaN and infinite voxels (a float volume is read even for ``none``): NonFiniteError.
    """
    from znn.io.volume import open_volume

    if pp not in IMAGE_PP_TYPES:
        raise ConfigError(f"{path}: preprocessing {pp!r} is not known; use one of {', '.join(IMAGE_PP_TYPES)}")
    arr = open_volume(path)
    c, z, _, _ = as_4d(arr.shape, path)
    vol = arr.reshape((c, z, *arr.shape[-2:]))
    records = non_finite_records(vol)
    terms = () if pp == "none" else _stat_terms(vol.astype(np.float64), pp)
    if records is None and not terms:
        return normalisation(pp, ImageStats.of_range(0.0, 0.0, z))  # an integer volume, nothing to read
    *values, found = compute(*terms, records, scheduler="threads")
    _refuse_non_finite(path, found)
    if pp == "none":
        return normalisation(pp, ImageStats.of_range(0.0, 0.0, z))
    return normalisation(pp, _stats_of(values, pp, z))


def _refuse_non_finite(path: str, records: np.ndarray | None) -> None:
    """NonFiniteError naming the first NaN or infinite voxel of the volume at ``path`` and how many there are."""
    found = None if records is None else first_of_records(records)
    if found is not None:
        raise NonFiniteError(f"{path}: input volume holds {in_file(found, path).describe()}; the network would "
                             "spread them over the output. Replace them in the file (e.g. with numpy.nan_to_num) or "
                             "give another volume")


def _stat_terms(vol: Any, pp: str) -> tuple[Any, ...]:
    """The lazy statistics of ``pp`` of a (c, z, y, x) float64 volume: moments E[x], E[x^2] per slice
    (standard2D) or over the volume (standard3D) (the variance is their difference: one pass), or the range."""
    if pp == "standard2D":
        return vol.mean(axis=(0, 2, 3)), (vol * vol).mean(axis=(0, 2, 3))
    if pp == "standard3D":
        return vol.mean(), (vol * vol).mean()
    return vol.min(), vol.max()


def _stats_of(values: list[Any], pp: str, z: int) -> ImageStats:
    """The :class:`ImageStats` of the computed :func:`_stat_terms` of a volume of ``z`` slices."""
    if pp in ("standard2D", "standard3D"):
        mean, sq = (np.broadcast_to(np.asarray(v, np.float64), (z,)).copy() for v in values)
        return ImageStats.of_moments(mean, np.maximum(sq - mean**2, 0.0))
    low, high = values
    return ImageStats.of_range(float(low), float(high), z)


def open_sources(files: Sequence[InputFile]) -> list[Source]:
    from znn.io.volume import volume_shape_dtype

    out = []
    for f in files:
        shape, _ = volume_shape_dtype(f.path)
        out.append(Source(f.path, as_4d(shape, f.path), preprocess_stats(f.path, f.pp)))
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
    norm = src.norm
    data = Normalisation(norm.offset[z0:z1], norm.divisor[z0:z1], norm.shift[z0:z1]).apply(raw, 1, dtype)
    local = [i - a for i, (a, _) in zip(idx, box)]
    if all(len(li) == b - a and (li == np.arange(b - a)).all() for li, (a, b) in zip(local, box)):
        return np.ascontiguousarray(data)
    return np.ascontiguousarray(data[np.ix_(np.arange(data.shape[0]), *local)])
