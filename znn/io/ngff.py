"""OME-Zarr (OME-NGFF 0.5 on zarr v3): the metadata of every zarr image the project writes, its downsampled pyramid,
and the voxel size read back from an input that has one.

An image is a zarr group whose attributes hold ``"ome"`` (version ``0.5``, ``multiscales``: axes with names, types
and units, one dataset per pyramid level with its scale and translation) and ``"znn"`` (provenance: what made it).
Its levels are the arrays ``0`` (full resolution), ``1``, ... inside the group; their ``dimension_names`` match the
axes. A label image (a segmentation) also holds ``"image-label"`` under ``"ome"`` and is downsampled with a method
that keeps its ids (``mode`` or ``stride``; never ``mean``)::

    out.zarr/output/zarr.json   {"attributes": {"ome": {"version": "0.5", "multiscales": [...]}, "znn": {...}}}
    out.zarr/output/0           (c, z, y, x) full resolution, dimension_names ["c", "z", "y", "x"]
    out.zarr/output/1, 2, ...   downsampled levels (``write_pyramid``)

A segmentation is laid out as NGFF readers (ome-zarr-py, napari) look for labels: an image group holding the group
``labels`` (attribute ``"labels": [names]``) whose members are the label images. `znn segment` writes its own
image-shaped store, whose image is the label volume itself (its datasets are the label image's arrays, so nothing
is stored twice)::

    seg.zarr/zarr.json                 {"ome": {"multiscales": [{"datasets": [{"path": "labels/segmentation/0"}...
    seg.zarr/labels/zarr.json          {"ome": {"version": "0.5", "labels": ["segmentation"]}}
    seg.zarr/labels/segmentation/      the label image ("image-label", source "../../"), levels 0, 1, ...

The API (every function takes plain paths, so it also serves writers outside dense inference):

- :class:`Resolution` (voxel size z,y,x and a unit) and :func:`parse_resolution` (``"40,4,4 nm"``), the value of
  the ``resolution`` key of job and sample files;
- :class:`ImageMeta`: what an image's metadata is made from (resolution, origin, provenance, ``labels``, method);
- :func:`create_image` ``(store, name, shape, chunks, dtype, meta)``: the image group with its level-0 array,
  filled with 0, to be written chunk by chunk; :func:`write_image_metadata` ``(group, meta, ndim, factors)``
  (re)writes the attributes of an open group; :func:`image_attributes` builds them without writing;
- :func:`write_pyramid` ``(store, name, levels, run)``: levels 1.. made blockwise (one task per output chunk, run
  by ``run(graph, keys)``, dask's threaded scheduler by default) from the level below, with the image's method;
  :func:`drop_pyramid` removes them (level 0 changed under them);
- :func:`level_zero` (the level-0 path of an image group's attributes: readers open ``store/name`` there),
  :func:`resolution_of` (the voxel size in an image group's attributes), :func:`resolution_of_h5` (an h5
  dataset's ``resolution`` (nm, as CREMI writes it) or ``element_size_um`` (micrometer, ilastik/Fiji) attribute;
  :func:`h5_attributes` writes both); :func:`znn.io.volume.volume_resolution` reads them for any volume path;
- :func:`labels_attributes` (a ``labels`` group's attributes), :func:`label_names` (the names one lists) and
  :func:`parent_attributes` (the image attributes of a group whose image is the label image below it);
- :func:`origin_of` (where voxel 0 of an image's level 0 lies, in voxels: its translation over its scale);
- :func:`provenance`: the ``"znn"`` attribute (znn version, sha256 of the network file and checkpoint, job file,
  output transform and any other fields).

Used for a label image (``znn segment``, through :func:`znn.io.stores.create_label_array`, which also writes the
``labels`` group and the image around it)::

    meta = ImageMeta(resolution, provenance=provenance(job=job_path, method="watershed"), labels=True)
    path = create_image(store, "labels/segmentation", (Z, Y, X), chunks, "uint64", meta)  # then fill level 0
    write_pyramid(store, "labels/segmentation", levels=3)                                 # mode downsampling
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from znn.errors import VolumeError
from znn.ops.downsample import downsample

__all__ = ["NGFF_VERSION", "Resolution", "parse_resolution", "ImageMeta", "axes", "image_attributes",
           "write_image_metadata", "create_image", "level_zero", "multiscale", "resolution_of", "resolution_of_h5",
           "origin_of", "labels_attributes", "label_names", "parent_attributes", "LABEL_SOURCE",
           "h5_attributes", "pyramid_factors", "write_pyramid", "drop_pyramid", "provenance", "file_sha256",
           "znn_version", "AXIS_NAMES", "UNITS"]

NGFF_VERSION = "0.5"
AXIS_NAMES = ("c", "z", "y", "x")  # a volume's axes, leading ones optional (znn.io.volume)
#: unit spellings accepted in ``resolution`` -> the UDUNITS-2 name NGFF asks for
UNITS = {"nm": "nanometer", "nanometer": "nanometer", "nanometers": "nanometer",
         "um": "micrometer", "µm": "micrometer", "micron": "micrometer", "microns": "micrometer",
         "micrometer": "micrometer", "micrometers": "micrometer",
         "mm": "millimeter", "millimeter": "millimeter", "millimeters": "millimeter",
         "a": "angstrom", "å": "angstrom", "angstrom": "angstrom", "angstroms": "angstrom",
         "pm": "picometer", "picometer": "picometer", "picometers": "picometer"}
DEFAULT_UNIT = "nanometer"  # electron microscopy: a resolution written without a unit is in nanometers
LABEL_METHODS = ("mode", "stride")  # downsampling that keeps label ids (an average of two ids is a third id)
AUTO_TOP = 256  # an automatic pyramid stops once a level is at most this many voxels along every axis
MAX_LEVELS = 16
#: where a label image's image is, relative to it: the image group holding its ``labels`` group (NGFF's default)
LABEL_SOURCE = "../../"


# ---------------------------------------------------------------------------------------------------- resolution
@dataclass(frozen=True)
class Resolution:
    """The voxel size along z, y, x in ``unit`` (a UDUNITS-2 length such as ``nanometer``; None: unknown)."""

    zyx: tuple[float, float, float]
    unit: str | None = DEFAULT_UNIT

    def __str__(self) -> str:
        return ",".join(f"{v:g}" for v in self.zyx) + (f" {self.unit}" if self.unit else "")


def parse_resolution(text: str) -> Resolution:
    """``z,y,x`` voxel size with an optional unit: ``40,4,4 nm``, ``0.05,0.004,0.004 um``, ``4,4,4`` (nanometers).
    ValueError, saying what is expected, otherwise."""
    example = "write z,y,x and a unit, like 40,4,4 nm"
    last = max((i for i, c in enumerate(text) if c.isdigit() or c == "."), default=-1)  # the unit follows
    numbers, unit = text[: last + 1], text[last + 1 :].strip() or None
    try:
        values = tuple(float(v) for v in numbers.replace(" ", "").split(","))
    except ValueError:
        raise ValueError(f"{text.strip()!r} is not a voxel size; {example}") from None
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{text.strip()!r} is not three positive finite sizes; {example}")
    if unit is not None and unit.lower() not in UNITS:
        raise ValueError(f"{text.strip()!r}: unknown unit {unit!r}; use one of nm, um, mm, angstrom, pm")
    return Resolution((values[0], values[1], values[2]), UNITS[unit.lower()] if unit else DEFAULT_UNIT)


# ---------------------------------------------------------------------------------------------------- attributes
@dataclass(frozen=True)
class ImageMeta:
    """What an image's metadata is made from. ``resolution``: voxel size (None: unknown, scale 1 and no unit);
    ``origin``: where voxel 0 lies, in voxels of ``resolution`` along z, y, x (e.g. a valid-only prediction starts
    half a field of view into its input); ``provenance``: the ``"znn"`` attribute; ``labels``: a label image;
    ``method``: how levels are downsampled (default ``mean``, ``mode`` for labels)."""

    resolution: Resolution | None = None
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    labels: bool = False
    method: str | None = None

    @property
    def downsampling(self) -> str:
        """The pyramid's method; VolumeError for an unknown one, or one that averages the ids of a label image."""
        method = self.method or ("mode" if self.labels else "mean")
        if method not in ("mean", *LABEL_METHODS):
            raise VolumeError(f"downsampling method {method!r} is not known; use mean, {' or '.join(LABEL_METHODS)}")
        if self.labels and method not in LABEL_METHODS:
            raise VolumeError(f"a label image is downsampled with {' or '.join(LABEL_METHODS)}, not {method!r}: "
                              "averaging ids makes ids that are in no segment")
        return method


def axes(ndim: int, unit: str | None) -> list[dict[str, str]]:
    """NGFF axes of a 2D to 4D volume ``([c,] [z,] y, x)``: c a channel axis, z, y, x space axes in ``unit``."""
    if not 2 <= ndim <= len(AXIS_NAMES):
        raise VolumeError(f"an OME-Zarr image here has 2 to 4 axes (c, z, y, x), not {ndim}")
    found = []
    for name in AXIS_NAMES[-ndim:]:
        axis = {"name": name, "type": "channel" if name == "c" else "space"}
        if name != "c" and unit:
            axis["unit"] = unit
        found.append(axis)
    return found


def _datasets(ndim: int, meta: ImageMeta, factors: Sequence[Sequence[int]], method: str) -> list[dict[str, Any]]:
    """One dataset per level: its scale (voxel size times the product of the factors so far) and translation
    (the centre of its first voxel; a window's centre for the averaging methods, its first voxel for striding)."""
    spatial = min(ndim, 3)
    size = [1.0] * (ndim - spatial) + list((meta.resolution.zyx if meta.resolution else (1.0,) * 3)[-spatial:])
    start = [0.0] * (ndim - spatial) + [o * s for o, s in zip(meta.origin[-spatial:], size[-spatial:])]
    total = [1] * ndim
    found = []
    for level in range(len(factors) + 1):
        if level:
            total = [t * int(f) for t, f in zip(total, _full(factors[level - 1], ndim))]
        shift = 0.0 if method == "stride" else 0.5
        translation = [s0 + shift * (t - 1) * s for s0, t, s in zip(start, total, size)]
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [s * t for s, t in zip(size, total)]}]
        if any(translation):
            transforms.append({"type": "translation", "translation": translation})
        found.append({"path": str(level), "coordinateTransformations": transforms})
    return found


def _full(factors: Sequence[int], ndim: int) -> list[int]:
    """Per-level ``factors`` of the spatial axes with 1 for the leading (channel) axes."""
    return [1] * (ndim - len(factors)) + [int(f) for f in factors]


def image_attributes(name: str, ndim: int, meta: ImageMeta,
                     factors: Sequence[Sequence[int]] = ()) -> dict[str, Any]:
    """The zarr attributes of image ``name`` with ``ndim`` axes and one level per entry of ``factors`` (each
    level's spatial factors relative to the level below) beyond level 0: ``{"ome": ..., "znn": ...}``."""
    method = meta.downsampling
    unit = meta.resolution.unit if meta.resolution else None
    description = ("most frequent id of each window" if method == "mode" else "every factor-th voxel"
                   if method == "stride" else "mean of each window")
    ome: dict[str, Any] = {"version": NGFF_VERSION, "multiscales": [{
        "name": name, "axes": axes(ndim, unit), "datasets": _datasets(ndim, meta, factors, method), "type": method,
        "metadata": {"description": description, "method": f"znn.ops.downsample.downsample_{method}",
                     "version": znn_version()}}]}
    if meta.labels:
        ome["image-label"] = {"source": {"image": LABEL_SOURCE}}
    return {"ome": ome, "znn": dict(meta.provenance)}


def labels_attributes(names: Sequence[str]) -> dict[str, Any]:
    """The attributes of an image's ``labels`` group listing its label images ``names`` (NGFF "labels")."""
    return {"ome": {"version": NGFF_VERSION, "labels": list(names)}}


def label_names(attrs: Mapping[str, Any]) -> list[str] | None:
    """The label images a ``labels`` group's attributes list (0.5: under ``"ome"``; older: at the top); None for
    any other group."""
    ome = attrs.get("ome")
    names = (ome if isinstance(ome, Mapping) else attrs).get("labels")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    return list(names)


def parent_attributes(label_attrs: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The image attributes of a group whose image is the label image at ``prefix`` below it (``labels/<name>``):
    the label image's multiscales with every dataset path under ``prefix``, so both name the same arrays (an NGFF
    reader wants an image to hold the labels; a segmentation has no other image to offer)."""
    found = multiscale(label_attrs)
    if found is None:
        raise VolumeError(f"{prefix}: not an OME-Zarr label image (no 'ome' multiscales attribute)")
    datasets = [{**d, "path": f"{prefix}/{d['path']}"} for d in found["datasets"]]
    znn = label_attrs.get("znn")
    return {"ome": {"version": NGFF_VERSION, "multiscales": [{**found, "datasets": datasets}]},
            "znn": dict(znn) if isinstance(znn, Mapping) else {}}


def write_image_metadata(group: Any, meta: ImageMeta, ndim: int, factors: Sequence[Sequence[int]] = ()) -> None:
    """Set the attributes of the open zarr ``group`` (an image named after the group) to those of ``meta`` with one
    level per entry of ``factors`` beyond level 0 (see :func:`image_attributes`)."""
    name = group.basename or Path(str(getattr(group.store, "root", "image"))).stem
    group.attrs.put(image_attributes(name, ndim, meta, factors))


def create_image(store: str | os.PathLike[str], name: str, shape: Sequence[int], chunks: Sequence[int] | None,
                 dtype: Any, meta: ImageMeta) -> str:
    """Create (or replace) image ``name`` of the zarr ``store`` (``""``: the store itself, replaced whole) with its
    level-0 array of ``shape``/``chunks`` (None: zarr's choice)/``dtype`` filled with 0, ready to be written chunk by
    chunk; returns its volume path (``store/name``, which every reader opens at level 0). Metadata writes are atomic.
    """
    import zarr

    from znn.io.atomic_store import AtomicLocalStore

    meta.downsampling  # noqa: B018 - a label image with an averaging method is refused before anything is written
    if name:
        group = zarr.open_group(AtomicLocalStore(str(store)), mode="a").create_group(name, overwrite=True)
    else:
        group = zarr.open_group(AtomicLocalStore(str(store)), mode="w")
    group.create_array("0", shape=tuple(shape), chunks=tuple(chunks) if chunks else "auto", dtype=dtype,
                       fill_value=0, dimension_names=AXIS_NAMES[-len(shape):], overwrite=True)
    write_image_metadata(group, meta, len(shape))
    return f"{store}/{name}" if name else str(store)


# ---------------------------------------------------------------------------------------------------- reading
def multiscale(attrs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The first ``multiscales`` entry of a group's attributes (0.5: under ``"ome"``; 0.4 and older: at the top)
    when it names at least one dataset by path; None for the attributes of anything but an image."""
    ome = attrs.get("ome")
    scales = (ome if isinstance(ome, Mapping) else attrs).get("multiscales")
    if not isinstance(scales, list) or not scales or not isinstance(scales[0], Mapping):
        return None
    datasets = scales[0].get("datasets")
    if not isinstance(datasets, list) or not datasets:
        return None
    if not all(isinstance(d, Mapping) and isinstance(d.get("path"), str) for d in datasets):
        return None
    return dict(scales[0])


def level_zero(attrs: Mapping[str, Any]) -> str | None:
    """The path (inside the group) of the full-resolution array of an image group's attributes; None if the
    attributes are no image's."""
    found = multiscale(attrs)
    return None if found is None else str(found["datasets"][0]["path"])


def _transform(transforms: Any, kind: str) -> list[float] | None:
    """The ``scale`` or ``translation`` values of a list of NGFF coordinate transformations (None: there is none)."""
    for t in transforms if isinstance(transforms, list) else []:
        if isinstance(t, Mapping) and t.get("type") == kind and isinstance(t.get(kind), list):
            return [float(v) for v in t[kind]]
    return None


def _spatial(axes_: Any, ndim: int) -> list[int]:
    """Indices of the space axes (by type, or by name for the older spelling as plain strings), at most 3."""
    if not isinstance(axes_, list) or len(axes_) != ndim:
        return list(range(ndim))[-3:]
    found = [i for i, a in enumerate(axes_) if (a.get("type") == "space" if isinstance(a, Mapping)
                                                else str(a) in "zyx")]
    return found[-3:]


def resolution_of(attrs: Mapping[str, Any], dataset: str | None = None) -> Resolution | None:
    """The voxel size of ``dataset`` (default: level 0) of an image group's attributes (its scale times the
    image-wide one), with the unit of its space axes; None when they hold none."""
    found = multiscale(attrs)
    if found is None:
        return None
    chosen = next((d for d in found["datasets"] if d["path"] == dataset), found["datasets"][0])
    scale = _transform(chosen.get("coordinateTransformations"), "scale")
    if scale is None or not all(math.isfinite(v) and v > 0 for v in scale):
        return None
    overall = _transform(found.get("coordinateTransformations"), "scale") or [1.0] * len(scale)
    scale = [s * o for s, o in zip(scale, overall)] if len(overall) == len(scale) else scale
    spatial = _spatial(found.get("axes"), len(scale))
    if not spatial:
        return None
    sizes = [1.0] * (3 - len(spatial)) + [scale[i] for i in spatial]
    units = [a.get("unit") for a in found.get("axes") or [] if isinstance(a, Mapping) and a.get("unit")]
    unit = UNITS.get(str(units[-1]).lower(), str(units[-1])) if units else None
    return Resolution((sizes[0], sizes[1], sizes[2]), unit)


def resolution_of_h5(attrs: Mapping[str, Any]) -> Resolution | None:
    """The voxel size an h5 dataset's attributes give: ``resolution`` (z,y,x in nanometers, as CREMI writes it)
    or ``element_size_um`` (z,y,x in micrometers, as ilastik and Fiji write it); None when neither is usable."""
    for key, unit in (("resolution", "nanometer"), ("element_size_um", "micrometer")):
        try:
            values = [float(v) for v in np.asarray(attrs[key]).ravel()]
        except (KeyError, TypeError, ValueError):
            continue
        if len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values):
            return Resolution((values[0], values[1], values[2]), unit)
    return None


#: nanometers per unit, for the h5 attributes (which have fixed units)
_NANOMETERS = {"nanometer": 1.0, "micrometer": 1e3, "millimeter": 1e6, "angstrom": 0.1, "picometer": 1e-3}


def h5_attributes(resolution: Resolution | None) -> dict[str, list[float]]:
    """The h5 dataset attributes that :func:`resolution_of_h5` reads back: ``resolution`` in nanometers and
    ``element_size_um`` in micrometers (none for an unknown size or unit)."""
    if resolution is None or resolution.unit not in _NANOMETERS:
        return {}
    nanometers = [v * _NANOMETERS[resolution.unit] for v in resolution.zyx]
    return {"resolution": nanometers, "element_size_um": [v / 1e3 for v in nanometers]}


def origin_of(attrs: Mapping[str, Any], dataset: str | None = None) -> tuple[float, float, float]:
    """Where voxel 0 of ``dataset`` (default: level 0) of an image group's attributes lies along z, y, x, in its
    voxels (its translation over its voxel size; 0 along axes without one): the ``origin`` of :class:`ImageMeta`."""
    found = multiscale(attrs) or {}
    datasets = found.get("datasets") or [{}]
    chosen = next((d for d in datasets if d.get("path") == dataset), datasets[0])
    translation = _transform(chosen.get("coordinateTransformations"), "translation") or [0.0] * 3
    resolution = resolution_of(attrs, chosen.get("path"))
    sizes = resolution.zyx if resolution else (1.0, 1.0, 1.0)
    spatial = translation[-3:]
    origin = [0.0] * (3 - len(spatial)) + [t / s for t, s in zip(spatial, sizes[-len(spatial):])]
    return origin[0], origin[1], origin[2]


def _meta_of(attrs: Mapping[str, Any]) -> ImageMeta:
    """The :class:`ImageMeta` that :func:`image_attributes` made ``attrs`` from (level 0's resolution and origin)."""
    found = multiscale(attrs) or {}
    resolution = resolution_of(attrs)
    origin = origin_of(attrs)
    ome = attrs.get("ome")
    labels = "image-label" in (ome if isinstance(ome, Mapping) else attrs)
    method = found.get("type") if found.get("type") in ("mean", *LABEL_METHODS) else None
    znn = attrs.get("znn")
    return ImageMeta(resolution, origin, dict(znn) if isinstance(znn, Mapping) else {}, labels, method)


# ---------------------------------------------------------------------------------------------------- pyramids
def pyramid_factors(shape: Sequence[int], zyx: Sequence[float], levels: int | None) -> list[tuple[int, ...]]:
    """The factors of the space axes (the last ``len(zyx)`` of ``shape``, at most 3) of each level beyond 0,
    relative to the level below: 2 along the axes whose voxels are at most half the longest voxel (so anisotropic
    EM voxels, e.g. 40x4x4 nm, become rounder first), along all of them once the voxels are about round; never
    along an axis down to one voxel. ``levels`` None: until every axis is at most 256 voxels (auto). Stops early
    when no axis can be halved."""
    spatial = min(len(zyx), len(shape), 3)
    extent = [int(n) for n in shape[-spatial:]]
    size = [float(s) for s in zyx[-spatial:]]
    found: list[tuple[int, ...]] = []
    while len(found) < (MAX_LEVELS if levels is None else levels):
        movable = [i for i in range(spatial) if extent[i] > 1]
        if not movable or (levels is None and max(extent) <= AUTO_TOP):
            break
        longest = max(size[i] for i in movable)
        chosen = [i for i in movable if 2 * size[i] <= longest] or movable
        factors = tuple(2 if i in chosen else 1 for i in range(spatial))
        found.append(factors)
        extent = [math.ceil(n / f) for n, f in zip(extent, factors)]
        size = [s * f for s, f in zip(size, factors)]
    return found


@dataclass(frozen=True)
class _ChunkTask:
    """One output chunk of a pyramid level: ``region`` (lo, hi per axis) of array ``target``, made from the
    matching windows of array ``source`` (both inside ``store``)."""

    store: str
    source: str
    target: str
    region: tuple[tuple[int, int], ...]
    factors: tuple[int, ...]
    method: str


def _downsample_chunk(task: _ChunkTask) -> int:
    """Write one chunk of a pyramid level (a dask task; returns the voxels written)."""
    import zarr
    from zarr.storage import LocalStore

    from znn.io.atomic_store import AtomicLocalStore

    source = zarr.open_array(LocalStore(task.store, read_only=True), path=task.source, mode="r")
    target = zarr.open_array(AtomicLocalStore(task.store), path=task.target, mode="r+")
    read = tuple(slice(lo * f, min(hi * f, n)) for (lo, hi), f, n in zip(task.region, task.factors, source.shape))
    values = downsample(np.asarray(source[read]), task.factors, task.method)
    target[tuple(slice(lo, hi) for lo, hi in task.region)] = values
    return int(values.size)


def _level_graph(store: str, source: str, target: Any, factors: tuple[int, ...],
                 method: str) -> tuple[dict[Any, Any], list[Any]]:
    """One task per chunk of the (created, empty) array ``target``: a graph for any dask scheduler."""
    from dask.base import tokenize

    name = "ngff-pyramid-" + tokenize(store, source, target.path, factors, method)
    counts = [math.ceil(n / c) for n, c in zip(target.shape, target.chunks)]
    dsk: dict[Any, Any] = {}
    for index in np.ndindex(*counts):
        region = tuple((int(i) * c, min((int(i) + 1) * c, n)) for i, c, n in zip(index, target.chunks, target.shape))
        dsk[(name, *index)] = (_downsample_chunk, _ChunkTask(store, source, target.path, region, factors, method))
    return dsk, list(dsk)


def _threaded(dsk: dict[Any, Any], keys: list[Any]) -> None:
    from dask.threaded import get

    get(dsk, keys)


def _image_group(store: str | os.PathLike[str], name: str, mode: str) -> tuple[Any, Mapping[str, Any]]:
    """The zarr group of image ``name`` of ``store`` and its attributes; VolumeError when it is no image."""
    import zarr

    from znn.io.atomic_store import AtomicLocalStore

    try:
        group = zarr.open_group(AtomicLocalStore(str(store)), path=name, mode=mode)  # type: ignore[arg-type]
    except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
        raise VolumeError(f"{store}/{name}: no zarr group to build a pyramid in ({err})") from err
    attrs = group.attrs.asdict()
    if level_zero(attrs) is None:
        raise VolumeError(f"{store}/{name}: not an OME-Zarr image (no 'ome' multiscales attribute); create it with "
                          "znn.io.ngff.create_image")
    return group, attrs


def drop_pyramid(store: str | os.PathLike[str], name: str) -> None:
    """Remove the levels beyond 0 of image ``name`` of ``store`` (level 0 changed, so they no longer show it)."""
    group, attrs = _image_group(store, name, "r+")
    found = multiscale(attrs) or {}
    for dataset in found.get("datasets", [])[1:]:
        if dataset["path"] in group:
            del group[dataset["path"]]
    if len(found.get("datasets", [])) > 1:
        write_image_metadata(group, _meta_of(attrs), group[level_zero(attrs)].ndim)


def write_pyramid(store: str | os.PathLike[str], name: str, levels: int | None, method: str | None = None,
                  run: Callable[[dict[Any, Any], list[Any]], Any] | None = None) -> list[str]:
    """Make the downsampled levels of image ``name`` of ``store`` (``levels`` of them, or None: automatically, see
    :func:`pyramid_factors`) from its level 0, replacing any there were, and record them in its metadata.

    Each level is made from the one below, one task per output chunk (chunks of level 0's shape), with ``method``
    (``mean``, ``mode``, ``stride``; default: the image's own). ``run(graph, keys)`` computes a level's graph
    (default: dask's threaded scheduler; dense inference passes its runner). Returns the levels' volume paths."""
    group, attrs = _image_group(store, name, "r+")
    if level_zero(attrs) != "0":  # levels are named 0, 1, ... here; another tool's names are its own business
        raise VolumeError(f"{store}/{name}: its full-resolution level is {level_zero(attrs)!r}, not '0'; pyramids "
                          "are made for images written by znn (create_image)")
    meta = _meta_of(attrs)
    meta = ImageMeta(meta.resolution, meta.origin, meta.provenance, meta.labels, method or meta.method)
    method = meta.downsampling
    drop_pyramid(store, name)
    base = group["0"]
    ndim = base.ndim
    factors = pyramid_factors(base.shape, (meta.resolution.zyx if meta.resolution else (1.0,) * 3), levels)
    source, shape = base.path, tuple(base.shape)
    for level, spatial in enumerate(factors, start=1):
        full = tuple(_full(spatial, ndim))
        shape = tuple(math.ceil(n / f) for n, f in zip(shape, full))
        target = group.create_array(str(level), shape=shape, chunks=tuple(min(c, n) for c, n in zip(base.chunks,
                                    shape)), dtype=base.dtype, fill_value=0, dimension_names=AXIS_NAMES[-ndim:],
                                    overwrite=True)
        (run or _threaded)(*_level_graph(str(store), source, target, full, method))
        source = target.path
    write_image_metadata(group, meta, ndim, factors)
    prefix = f"{store}/{name}" if name else str(store)
    return [f"{prefix}/{level}" for level in range(1, len(factors) + 1)]


# ---------------------------------------------------------------------------------------------------- provenance
def znn_version() -> str:
    """The installed znn's version (``unknown`` when it runs from a source tree that was never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("znn")
    except PackageNotFoundError:
        return "unknown"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes (hex), read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def provenance(*, network: str | os.PathLike[str] | None = None, checkpoint: str | os.PathLike[str] | None = None,
               job: str | os.PathLike[str] | None = None, **fields: Any) -> dict[str, Any]:
    """The ``"znn"`` attribute of an output: znn's version, the network file and checkpoint (absolute path and
    sha256 each, None when not given), the job file's absolute path, and ``fields`` (JSON values: the output
    transform, the sample, the inputs, ...)."""
    found: dict[str, Any] = {"version": znn_version()}
    for key, path in (("network", network), ("checkpoint", checkpoint)):
        found[key] = {"path": str(Path(path).resolve()), "sha256": file_sha256(path)} if path else None
    found["job"] = str(Path(job).resolve()) if job else None
    found.update(fields)
    return found
