"""Synthetic EM-like volumes with exact ground truth, for the quickstart and for tests.

Cells are a Voronoi tessellation of jittered-grid seeds (nearest seed of every voxel by a k-d tree), with the
voxel coordinates bent by a smooth random field so that borders curve like membranes. Two layouts:

- ``"columns"`` (default, like serial-section EM such as ISBI 2012): a 2D tessellation per z-slice whose seeds
  drift slowly and independently across z, so each cell is a column keeping its id through the stack and its
  outline changes a little from slice to slice.
- ``"3d"``: a true 3D Voronoi tessellation (isotropic, like FIB-SEM), membranes in every direction.

Membranes are the voxels along cell borders, 1 to 3 voxels thick (a width drawn per cell), and are dark; cells
get their own grey level, a smooth texture and a few darker vesicle-like blobs; the image is blurred and noise
added. The segmentation is 0 on membranes and a cell id (> 0) elsewhere; blobs are inside cells and keep their
cell's id. :func:`boundary_labels` turns it into ISBI-style labels (0 membrane, 255 interior).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from scipy.spatial import cKDTree

from znn.errors import ShapeError
from znn.types import Triple

__all__ = ["EMStyle", "synthetic_em", "boundary_labels"]


@dataclass(frozen=True)
class EMStyle:
    """How the synthetic EM looks. ``cell_size``: the seed spacing in voxels; ``membrane_width``: the (min, max)
    membrane thickness; ``cells``: ``"columns"`` or ``"3d"``; ``drift``: the standard deviation of the seeds'
    per-slice motion (``"columns"``); ``blobs``: the mean number of dark blobs per cell area per slice; ``blur``: the
    Gaussian sigma in-plane; ``noise``: the standard deviation of the added noise in grey levels."""

    cell_size: float = 28.0
    membrane_width: tuple[int, int] = (1, 3)
    cells: Literal["columns", "3d"] = "columns"
    drift: float = 0.7
    blobs: float = 0.6
    blur: float = 0.8
    noise: float = 10.0


def synthetic_em(shape: Triple = (8, 256, 256), seed: int = 0,
                 style: EMStyle = EMStyle()) -> tuple[NDArray[np.uint8], NDArray[np.int32]]:
    """``(raw uint8 (Z, Y, X), segmentation int32 (Z, Y, X))`` looking as ``style`` says, deterministic for
    ``seed``."""
    extents = tuple(int(s) for s in shape)
    if len(extents) != 3 or min(extents) < 1:
        raise ShapeError(f"shape {extents} must be three positive extents z,y,x")
    if style.cell_size < 2 or not 1 <= style.membrane_width[0] <= style.membrane_width[1]:
        raise ShapeError("cell_size must be >= 2 and membrane_width (min, max) with 1 <= min <= max")
    rng = np.random.default_rng(seed)
    columns = style.cells == "columns"
    cell = _columns(extents, style.cell_size, style.drift, rng) if columns else \
        _voronoi3d(extents, style.cell_size, rng)
    n_cells = int(cell.max()) + 1
    membrane = _membranes(cell, style.membrane_width, n_cells, rng, planar=columns)
    seg = np.where(membrane, 0, cell).astype(np.int32)
    raw = _render(cell, membrane, n_cells, style, rng)
    return raw, seg


def boundary_labels(seg: NDArray[Any]) -> NDArray[np.uint8]:
    """ISBI-style labels of a segmentation: 0 where ``seg == 0`` (membrane), 255 elsewhere."""
    return np.where(np.asarray(seg) == 0, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------


def _grid_seeds(extent: tuple[float, ...], spacing: float, rng: np.random.Generator) -> NDArray[np.float64]:
    """Jittered grid points covering ``[-spacing, e + spacing)`` per axis (cells reach in from outside)."""
    axes = [np.arange(-spacing, e + spacing, spacing) + spacing / 2 for e in extent]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(extent))
    return grid + rng.uniform(-0.4, 0.4, grid.shape) * spacing


def _warped_grid(shape: tuple[int, ...], spacing: float, rng: np.random.Generator) -> NDArray[np.float64]:
    """Voxel coordinates ``(..., ndim)`` moved by a smooth random field, so cell borders curve."""
    grid = np.stack(np.meshgrid(*(np.arange(s, dtype=np.float64) for s in shape), indexing="ij"), axis=-1)
    sigma = [spacing / 2] * len(shape)
    field = np.stack([ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), sigma, mode="wrap")
                      for _ in shape], axis=-1)
    field *= 0.2 * spacing / max(float(field.std()), 1e-12)
    warped: NDArray[np.float64] = grid + field
    return warped


def _nearest_seed(points: NDArray[np.float64], coords: NDArray[np.float64]) -> NDArray[np.int64]:
    """Index of the nearest seed for every coordinate (``coords`` is ``(..., ndim)``)."""
    _, index = cKDTree(points).query(coords.reshape(-1, coords.shape[-1]))
    return np.asarray(index, dtype=np.int64).reshape(coords.shape[:-1])


def _columns(shape: tuple[int, ...], spacing: float, drift: float, rng: np.random.Generator) -> NDArray[np.int64]:
    z, y, x = shape
    seeds = _grid_seeds((y, x), spacing, rng)
    velocity = rng.normal(0.0, drift, seeds.shape)
    coords = _warped_grid((y, x), spacing, rng)
    cell = np.empty(shape, dtype=np.int64)
    for k in range(z):
        cell[k] = _nearest_seed(seeds + velocity * (k - (z - 1) / 2), coords)
    return _compact(cell)


def _voronoi3d(shape: tuple[int, ...], spacing: float, rng: np.random.Generator) -> NDArray[np.int64]:
    seeds = _grid_seeds(tuple(float(s) for s in shape), spacing, rng)
    return _compact(_nearest_seed(seeds, _warped_grid(shape, spacing, rng)))


def _compact(cell: NDArray[np.int64]) -> NDArray[np.int64]:
    """Consecutive cell ids from 1."""
    _, inv = np.unique(cell, return_inverse=True)
    return inv.reshape(cell.shape) + 1


def _membranes(cell: NDArray[np.int64], width: tuple[int, int], n_cells: int, rng: np.random.Generator,
               planar: bool) -> NDArray[np.bool_]:
    """Voxels within a per-cell half width of a cell border (in-plane only for columns)."""
    edge = np.zeros(cell.shape, dtype=bool)
    for axis in (1, 2) if planar else (0, 1, 2):
        later = [slice(None)] * 3
        earlier = [slice(None)] * 3
        later[axis], earlier[axis] = slice(1, None), slice(None, -1)
        edge[tuple(earlier)] |= cell[tuple(earlier)] != cell[tuple(later)]
    # half widths (w - 1) / 2: 0 keeps the 1-voxel border, 1 grows it to 3 voxels
    half = (rng.integers(width[0], width[1] + 1, n_cells + 1) - 1) / 2
    sampling = (1e6, 1.0, 1.0) if planar else None  # columns: distance within the slice only
    dist = ndimage.distance_transform_edt(~edge, sampling=sampling) if edge.any() else np.full(cell.shape, np.inf)
    return np.asarray(dist <= half[cell] + 1e-6)


def _render(cell: NDArray[np.int64], membrane: NDArray[np.bool_], n_cells: int, style: EMStyle,
            rng: np.random.Generator) -> NDArray[np.uint8]:
    shape, blur = cell.shape, style.blur
    tone = rng.uniform(0.58, 0.8, n_cells + 1)
    img = tone[cell]
    img += ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), sigma=(0.5, 1.5, 1.5)) * 0.12
    img = _add_blobs(img, membrane, style.cell_size, style.blobs, rng)
    img = np.where(membrane, rng.uniform(0.12, 0.22, n_cells + 1)[cell], img)
    img = ndimage.gaussian_filter(img, sigma=(0.0, blur, blur)) if blur > 0 else img
    img = img * 255 + rng.normal(0.0, style.noise, shape)
    raw: NDArray[np.uint8] = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return raw


def _add_blobs(img: NDArray[np.float64], membrane: NDArray[np.bool_], spacing: float, density: float,
               rng: np.random.Generator) -> NDArray[np.float64]:
    """Darker round blobs (vesicles, mitochondria) away from membranes, one slice at a time."""
    z, y, x = img.shape
    count = rng.poisson(density * y * x / spacing**2, z)
    yy, xx = np.mgrid[0:y, 0:x]
    for k in range(z):
        if count[k] == 0:
            continue
        centres = rng.uniform((0, 0), (y, x), (count[k], 2))
        radius = rng.uniform(1.5, spacing / 7 + 1.5, count[k])
        darkness = rng.uniform(0.15, 0.25, count[k])
        layer = np.zeros((y, x))
        for (cy, cx), r, d in zip(centres, radius, darkness):
            lo_y, hi_y = int(max(cy - r - 1, 0)), int(min(cy + r + 2, y))
            lo_x, hi_x = int(max(cx - r - 1, 0)), int(min(cx + r + 2, x))
            win = (slice(lo_y, hi_y), slice(lo_x, hi_x))
            inside = (yy[win] - cy) ** 2 + (xx[win] - cx) ** 2 <= r * r
            layer[win] = np.maximum(layer[win], inside * d)
        img[k] -= np.where(membrane[k], 0.0, layer)
    return img
