"""Image preprocessing and label-to-target transforms of ZNN's sample files (`.spec` ``pp_types``).

Conventions (checked against seung-lab/znn-release ``python/front_end/zdataset.py``, ``zsample.py`` and the
older ``python/ZNN_Dataset.py``):

Images, one ``(Z, Y, X)`` volume per channel:

- ``none``: cast to float only.
- ``standard2D``: each z-slice minus its mean, divided by its (population) standard deviation.
- ``standard3D``: the same over the whole volume.
- ``symetric_rescale``: min..max mapped linearly onto -1..1 (ZNN's spelling).

A slice or volume of constant value has no spread; ZNN divides by zero there (NaN). Here it is only centred
(``standard*``) or mapped to 0 (``symetric_rescale``), so one blank slice cannot poison a training run.

Labels. ``label > 0`` means "inside a cell" both for ISBI-style labels (0 membrane, 255 interior) and for
segmentations (0 boundary, > 0 object id):

- ``binary_class``: two channels, **channel 0 = non-boundary (label > 0), channel 1 = boundary (label == 0)**,
  in ZNN's order (``ret[0] = lbl > 0``, ``ret[1] = 1 - ret[0]``). A softmax network trained on it outputs
  P(non-boundary), P(boundary) in that order.
- ``one_class``: one channel, ``label > 0`` (ZNN: ``(data > 0)``): the *non-boundary* probability.
- ``affinity``: three channels (z, y, x). ``aff[c, v] = 1`` iff voxel ``v`` and its predecessor ``v - e_c``
  along axis ``c`` carry the same non-zero id, else 0; this is ZNN's ``_seg2aff`` and the convention of
  :mod:`znn.ops.malis` (``aff[c, z, y, x]`` links a voxel to its predecessor along axis ``c``). ZNN's version
  returns a volume one voxel smaller per axis; here the shape is kept and the first plane along axis ``c`` (which
  has no predecessor) is 0 in ``aff[c]`` and masked out by :func:`affinity_mask`.
- ``none``: the label values as float, channels kept.
- ``auto``: ``binary_class`` for ``out_type = boundary``, ``affinity`` for ``out_type = affinity``.

Masks: > 0 is valid. An affinity edge is valid iff both of its voxels are valid (ZNN's ``_msk2affmsk`` in
``ZNN_Dataset.py``; the later ``zsample.py`` marks an edge valid when either voxel is, which trains on edges
whose other end is unlabelled, so the stricter rule is kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

from znn.errors import ConfigError, ShapeError, closest

__all__ = [
    "IMAGE_PP_TYPES",
    "ImageStats",
    "Normalisation",
    "image_stats",
    "normalisation",
    "LABEL_PP_TYPES",
    "LABEL_CHANNELS",
    "preprocess_image",
    "resolve_label_pp",
    "binary_class",
    "one_class",
    "affinity",
    "affinity_mask",
    "label_targets",
    "target_mask",
    "segmentation_ids",
]

Array = NDArray[Any]

IMAGE_PP_TYPES = ("none", "standard2D", "standard3D", "symetric_rescale")
LABEL_PP_TYPES = ("none", "one_class", "binary_class", "affinity", "auto")
#: target channels of each label transform (``none`` keeps the label's own channels)
LABEL_CHANNELS = {"one_class": 1, "binary_class": 2, "affinity": 3}
_AUTO = {"boundary": "binary_class", "affinity": "affinity"}


# --------------------------------------------------------------------------------------------------------------
# images


@dataclass(frozen=True)
class ImageStats:
    """What an image preprocessing needs to know of a volume, per z-slice: mean and (population) variance over the
    slice (``standard2D``) or the whole volume (``standard3D``, the same value on every slice), or the whole
    volume's ``low``..``high`` range (``symetric_rescale``). Computed in memory by :func:`image_stats` or out of
    core by dense inference; :func:`normalisation` turns either into the one formula."""

    mean: Array
    var: Array
    low: Array
    high: Array

    @classmethod
    def of_moments(cls, mean: Array, var: Array) -> "ImageStats":
        mean = np.asarray(mean, np.float64)
        return cls(mean, np.asarray(var, np.float64), np.zeros_like(mean), np.zeros_like(mean))

    @classmethod
    def of_range(cls, low: float, high: float, depth: int) -> "ImageStats":
        zeros = np.zeros(depth)
        return cls(zeros, zeros, np.full(depth, float(low)), np.full(depth, float(high)))


@dataclass(frozen=True)
class Normalisation:
    """Per z-slice: the network sees ``(raw - offset) / divisor + shift``."""

    offset: Array
    divisor: Array
    shift: Array

    def apply(self, raw: Array, z_axis: int, dtype: DTypeLike) -> Array:
        """``raw`` normalised in ``dtype`` arithmetic; its axis ``z_axis`` holds the slices of ``offset`` (etc.)."""
        where: list[slice | None] = [None] * raw.ndim
        where[z_axis] = slice(None)

        def per_z(values: Array) -> Array:
            return np.asarray(values[tuple(where)], dtype=dtype)

        out = (np.asarray(raw, dtype=dtype) - per_z(self.offset)) / per_z(self.divisor)
        return out + per_z(self.shift) if np.any(self.shift) else out


def normalisation(pp_type: str, stats: ImageStats) -> Normalisation:
    """The one formula from statistics to normalisation: ``standard*`` subtract the mean and divide by the standard
    deviation (a constant slice is only centred); ``symetric_rescale`` maps low..high onto -1..1 (a constant volume
    onto 0); ``none`` is the identity. Dividing (not multiplying by a reciprocal) keeps the ends of a rescale at
    exactly -1 and 1."""
    if pp_type not in IMAGE_PP_TYPES:
        raise ConfigError(f"image pp_type {pp_type!r} is not valid; {closest(pp_type, IMAGE_PP_TYPES)}")
    zeros, ones = np.zeros_like(stats.mean), np.ones_like(stats.mean)
    if pp_type in ("standard2D", "standard3D"):
        std = np.sqrt(stats.var)
        return Normalisation(stats.mean, np.where(std > 0, std, 1.0), zeros)
    if pp_type == "symetric_rescale":
        span = stats.high - stats.low
        spread = span > 0
        return Normalisation(stats.low, np.where(spread, span / 2, 1.0), np.where(spread, -1.0, 0.0))
    return Normalisation(zeros, ones, zeros)


def image_stats(volume: Array, pp_type: str) -> ImageStats:
    """The statistics :func:`normalisation` needs for ``pp_type``, of one ``(Z, Y, X)`` channel in memory."""
    vol = as_zyx(volume, "image").astype(np.float64)
    depth = vol.shape[0]
    if pp_type == "standard2D":
        return ImageStats.of_moments(vol.mean(axis=(1, 2)), vol.var(axis=(1, 2)))
    if pp_type == "standard3D":
        return ImageStats.of_moments(np.full(depth, vol.mean()), np.full(depth, vol.var()))
    if pp_type == "symetric_rescale" and vol.size:
        return ImageStats.of_range(vol.min(), vol.max(), depth)
    return ImageStats.of_range(0.0, 0.0, depth)


def preprocess_image(volume: Array, pp_type: str, dtype: DTypeLike = np.float32) -> Array:
    """One image channel ``(Z, Y, X)`` preprocessed by ``pp_type``; returns a new float array of ``dtype``.

    Statistics and arithmetic are in float64 whatever ``dtype`` is.
    """
    if pp_type not in IMAGE_PP_TYPES:
        raise ConfigError(f"image pp_type {pp_type!r} is not valid; {closest(pp_type, IMAGE_PP_TYPES)}")
    vol = as_zyx(volume, "image").astype(np.float64)
    if pp_type != "none":
        vol = normalisation(pp_type, image_stats(vol, pp_type)).apply(vol, 0, np.float64)
    return vol.astype(dtype, copy=False)


# --------------------------------------------------------------------------------------------------------------
# labels


def resolve_label_pp(pp_type: str, out_type: str) -> str:
    """The label transform for ``pp_type``; ``auto`` picks by the job's ``out_type`` (boundary / affinity)."""
    if pp_type not in LABEL_PP_TYPES:
        raise ConfigError(f"label pp_type {pp_type!r} is not valid; {closest(pp_type, LABEL_PP_TYPES)}")
    if pp_type != "auto":
        return pp_type
    if out_type not in _AUTO:
        raise ConfigError(f"out_type {out_type!r} is not valid; {closest(out_type, tuple(_AUTO))}")
    return _AUTO[out_type]


def binary_class(label: Array, dtype: DTypeLike = np.float32) -> Array:
    """``(2, Z, Y, X)``: channel 0 = ``label > 0`` (non-boundary), channel 1 = ``label == 0`` (boundary)."""
    inside = as_zyx(label, "label") > 0
    return np.stack([inside, ~inside]).astype(dtype)


def one_class(label: Array, dtype: DTypeLike = np.float32) -> Array:
    """``(1, Z, Y, X)``: ``label > 0`` (ZNN's one_class, the non-boundary map)."""
    return (as_zyx(label, "label") > 0)[None].astype(dtype)


def affinity(segmentation: Array, dtype: DTypeLike = np.float32) -> Array:
    """``(3, Z, Y, X)`` affinity graph (channels z, y, x) of a ``(Z, Y, X)`` id volume (0 = boundary).

    ``aff[c, v] = 1`` iff ``seg[v] == seg[v - e_c] != 0``; the first plane along axis ``c`` is 0.
    """
    seg = segmentation_ids(segmentation)
    aff = np.zeros((3, *seg.shape), dtype=dtype)
    for c in range(3):
        later, earlier = _later_earlier(c)
        aff[c][later] = (seg[later] == seg[earlier]) & (seg[later] != 0)
    return aff


def affinity_mask(mask: Array, dtype: DTypeLike = np.float32) -> Array:
    """``(3, Z, Y, X)`` edge mask of a voxel mask: valid iff the voxel and its predecessor are (> 0).

    The first plane along each axis (no predecessor) is invalid.
    """
    valid = as_zyx(mask, "mask") > 0
    out = np.zeros((3, *valid.shape), dtype=dtype)
    for c in range(3):
        later, earlier = _later_earlier(c)
        out[c][later] = valid[later] & valid[earlier]
    return out


def label_targets(label: Array, pp_type: str, dtype: DTypeLike = np.float32) -> Array:
    """The training target ``(C, Z, Y, X)`` of a label volume for a resolved ``pp_type`` (not ``auto``).

    ``label`` is ``(Z, Y, X)`` or ``(C, Z, Y, X)``; every transform but ``none`` needs one channel.
    """
    if pp_type == "none":
        arr = np.asarray(label)
        return (arr[None] if arr.ndim == 3 else arr).astype(dtype)
    if pp_type == "binary_class":
        return binary_class(label, dtype)
    if pp_type == "one_class":
        return one_class(label, dtype)
    if pp_type == "affinity":
        return affinity(label, dtype)
    raise ConfigError(f"label pp_type {pp_type!r} cannot make a target; resolve 'auto' first, or use "
                      f"{closest(pp_type, ('none', 'one_class', 'binary_class', 'affinity'))}")


def target_mask(voxel_mask: Array | None, pp_type: str, shape: tuple[int, int, int],
                dtype: DTypeLike = np.float32) -> Array:
    """The mask that goes with :func:`label_targets`: ``(3, Z, Y, X)`` edges for ``affinity``, else
    ``(1, Z, Y, X)`` (broadcast over the target's channels). ``voxel_mask`` None means every voxel is valid.
    """
    if voxel_mask is None:
        voxel_mask = np.ones(shape, dtype=bool)
    elif as_zyx(voxel_mask, "mask").shape != tuple(shape):
        raise ShapeError(f"mask shape {np.shape(voxel_mask)} does not match the label shape {tuple(shape)}")
    if pp_type == "affinity":
        return affinity_mask(voxel_mask, dtype)
    return (as_zyx(voxel_mask, "mask") > 0)[None].astype(dtype)


def segmentation_ids(segmentation: Array) -> NDArray[np.int64]:
    """A ``(Z, Y, X)`` (or ``(1, Z, Y, X)``) id volume as int64; float volumes must hold whole numbers."""
    seg = as_zyx(segmentation, "segmentation")
    if not np.issubdtype(seg.dtype, np.integer):
        if np.issubdtype(seg.dtype, np.bool_):
            return seg.astype(np.int64)
        if not np.all(np.isfinite(seg)) or np.any(seg != np.round(seg)):
            raise ShapeError("a segmentation must hold whole-number ids (0 = boundary); got fractional values")
    return seg.astype(np.int64, copy=False)


def _later_earlier(axis: int) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    later = [slice(None)] * 3
    earlier = [slice(None)] * 3
    later[axis] = slice(1, None)
    earlier[axis] = slice(None, -1)
    return tuple(later), tuple(earlier)


def as_zyx(arr: Array, what: str) -> Array:
    """``arr`` as a 3D ``(Z, Y, X)`` array; a single leading channel is dropped."""
    arr = np.asarray(arr)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ShapeError(f"a {what} must be a (Z, Y, X) volume (or (1, Z, Y, X)), got shape {arr.shape}")
    return arr
