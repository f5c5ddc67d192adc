"""Load one ``[sampleN]`` of a `.spec` file into memory: preprocessed inputs, training targets, masks, raw labels.

Conventions (ZNN's ``python/front_end/zdataset.py`` / ``zsample.py``, seung-lab/znn-release):

- The files of one ``[imageN]`` are the **channels** of that network input, in ``fnames`` order, each
  preprocessed with its own ``pp_types`` entry. A 4D file ``(C, Z, Y, X)`` gives C channels, all preprocessed
  with that file's type. ``[sampleN]`` names the network's nodes (``input = 1``, ``input-r = 2``; or
  ``input1, input2, ...`` in the network's order): see :mod:`znn.io.sample_nodes`.
- A ``[labelN]`` holds one label volume (a segmentation with 0 = boundary, or ISBI-style 0 = membrane /
  255 = interior); several files are stacked as channels only for ``pp_types = none``.
- Masks (> 0 valid) come from the label's ``fmasks`` (one per label file) and from ``[maskN]`` sections named
  by the sample's ``mask``/``mask1``.../``NODE_mask`` keys; where both exist a voxel must be valid in both.
- 2D images ``(Y, X)`` are volumes with Z = 1; a tif stack ``(Z, Y, X)`` is one channel.
- ``is_auto_crop``: volumes of a sample whose sections say yes (ZNN's default) are cropped centrally to the
  smallest extent per axis among all the sample's volumes; an odd excess loses its extra voxel at the start, as
  ZNN's ``_center_crop``. Volumes are cropped before preprocessing, so statistics describe what is used.
  Sizes that still differ are an error naming the sections.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

from znn.errors import NonFiniteError, ShapeError, SpecFileError, VolumeError
from znn.io.finite import find_non_finite, in_file
from znn.io.sample_nodes import bind_sample
from znn.io.specfile import SampleSpec, VolumeSet
from znn.io.volume import read_volume
from znn.ops.preprocess import (
    LABEL_CHANNELS,
    label_targets,
    preprocess_image,
    resolve_label_pp,
    target_mask,
)
from znn.spec import NetworkSpec
from znn.types import Triple

__all__ = ["SampleData", "load_sample", "make_sample", "center_crop"]

Array = NDArray[Any]


@dataclass
class SampleData:
    """One sample in memory; every volume has the same spatial shape ``(Z, Y, X)``.

    - ``inputs[i]``: float ``(C, Z, Y, X)`` for the i-th network input, preprocessed.
    - ``targets[k]``: float ``(C, Z, Y, X)`` for the k-th network output (binary_class: 2 channels, channel 1 =
      boundary; one_class: 1; affinity: 3 (z, y, x); none: the label's channels).
    - ``masks[k]``: float, ``(3, Z, Y, X)`` edge mask for affinity targets, else ``(1, Z, Y, X)`` (broadcasts over
      the target's channels); all ones where no mask was given.
    - ``labels[k]``: the raw label volume after cropping (``(Z, Y, X)``, or ``(C, Z, Y, X)`` for multi-channel
      ``none`` labels), in the file's dtype: a segmentation for Rand error, MALIS and affinity augmentation.
    - ``voxel_masks[k]``: bool ``(Z, Y, X)`` voxel mask, or None when every voxel is valid.
    - ``label_pp[k]``: the resolved label transform (``auto`` already replaced).
    """

    id: int
    inputs: list[Array]
    targets: list[Array] = field(default_factory=list)
    masks: list[Array] = field(default_factory=list)
    labels: list[Array] = field(default_factory=list)
    voxel_masks: list[NDArray[np.bool_] | None] = field(default_factory=list)
    label_pp: list[str] = field(default_factory=list)
    where: str = ""

    @property
    def shape(self) -> Triple:
        """The common spatial shape ``(Z, Y, X)``."""
        source = self.inputs[0] if self.inputs else self.labels[0]
        return tuple(source.shape[-3:])

    @property
    def has_outputs(self) -> bool:
        return bool(self.targets)


@dataclass
class _Raw:
    """A volume read from a file, with where it came from (for messages) and whether it may be cropped."""

    array: Array  # (C, Z, Y, X)
    section: str
    file: str
    auto_crop: bool


def load_sample(spec: SampleSpec, sample_id: int, out_type: str = "boundary",
                dtype: DTypeLike = np.float32, network: NetworkSpec | None = None) -> SampleData:
    """Read, crop and preprocess ``[sample<sample_id>]`` of ``spec``.

    ``out_type`` (``boundary``/``affinity``) resolves label ``pp_types = auto``; ``dtype`` is the float type of
    inputs, targets and masks; ``network`` orders inputs and outputs by its nodes (keys named after nodes need
    it). Raises ZnnFileNotFoundError naming the section for a missing file and SpecFileError for volumes that do
    not fit together or keys that do not fit the network.
    """
    sample = bind_sample(spec, sample_id, network)
    dtype = np.dtype(dtype)
    image_raws = [_read_section(spec.images[i]) for i in sample.inputs]
    label_sets = [spec.labels[i] for i in sample.outputs]
    label_raws = [_read_section(vs) for vs in label_sets]
    fmask_raws = [_read_masks(vs) for vs in label_sets]
    extra_masks = _sample_masks(spec, sample.masks, sample.where, len(label_sets))

    everything = [r for raws in (*image_raws, *label_raws) for r in raws]
    everything += [r for raws in fmask_raws for r in raws] + [r for r in extra_masks if r is not None]
    shape = _common_shape(everything, sample.where)

    def crop(r: _Raw) -> Array:
        return center_crop(r.array, shape) if r.auto_crop else r.array

    inputs = []
    for vs, raws in zip((spec.images[i] for i in sample.inputs), image_raws):
        channels = [preprocess_image(ch, pp, dtype) for r, pp in zip(raws, vs.pp_types) for ch in crop(r)]
        inputs.append(np.stack(channels))

    data = SampleData(sample_id, inputs, where=sample.where)
    for k, (vs, raws) in enumerate(zip(label_sets, label_raws)):
        pp = _label_pp(vs, out_type)
        label = np.concatenate([crop(r) for r in raws])
        if pp in LABEL_CHANNELS and label.shape[0] != 1:
            raise SpecFileError(f"{vs.where} fnames: pp_types {pp} needs one single-channel label volume, got "
                                f"{label.shape[0]} channels; list one file (several only with pp_types none)")
        voxel_mask = _combine_masks([crop(r) for r in fmask_raws[k]], extra_masks[k], crop)
        try:
            _add_output(data, label[0] if label.shape[0] == 1 else label, pp, voxel_mask, dtype)
        except ShapeError as exc:
            raise SpecFileError(f"{vs.where} fnames: {exc}") from None
    return data


def make_sample(
    inputs: Sequence[Array],
    labels: Sequence[Array] = (),
    *,
    label_pp: str | Sequence[str] = "auto",
    out_type: str = "boundary",
    masks: Sequence[Array | None] | None = None,
    sample_id: int = 0,
    dtype: DTypeLike = np.float32,
) -> SampleData:
    """A :class:`SampleData` from arrays already in memory (e.g. :mod:`znn.pipeline.jobs.synthetic` volumes).

    ``inputs`` are used as given (no preprocessing), each ``(Z, Y, X)`` or ``(C, Z, Y, X)``; ``labels`` are
    raw label volumes ``(Z, Y, X)`` transformed by ``label_pp`` (one for all or one per label; ``auto`` follows
    ``out_type``); ``masks`` optional ``(Z, Y, X)`` voxel masks (> 0 valid) per label. All spatial shapes must
    be equal.
    """
    dtype = np.dtype(dtype)
    ins = [np.asarray(x, dtype=dtype) for x in inputs]
    ins = [x[None] if x.ndim == 3 else x for x in ins]
    pps = [label_pp] * len(labels) if isinstance(label_pp, str) else list(label_pp)
    mks = list(masks) if masks is not None else [None] * len(labels)
    if len(pps) != len(labels) or len(mks) != len(labels):
        raise ShapeError(f"{len(labels)} labels need as many label_pp and masks (got {len(pps)} and {len(mks)})")
    shapes = {x.shape[1:] for x in ins} | {np.shape(lb)[-3:] for lb in labels}
    shapes |= {np.shape(m)[-3:] for m in mks if m is not None}
    if any(x.ndim != 4 for x in ins) or len(shapes) != 1:
        raise ShapeError(f"inputs, labels and masks must share one (Z, Y, X) shape; got {sorted(shapes)}")
    data = SampleData(sample_id, ins, where=f"sample {sample_id}")
    for label, pp, mask in zip(labels, pps, mks):
        voxel_mask = None if mask is None else np.asarray(mask) > 0
        _add_output(data, np.asarray(label), resolve_label_pp(pp, out_type), voxel_mask, dtype)
    return data


def _add_output(data: SampleData, label: Array, pp: str, voxel_mask: NDArray[np.bool_] | None,
                dtype: np.dtype[Any]) -> None:
    target = label_targets(label, pp, dtype)
    data.targets.append(target)
    data.masks.append(target_mask(voxel_mask, pp, target.shape[1:], dtype))
    data.labels.append(label)
    data.voxel_masks.append(voxel_mask)
    data.label_pp.append(pp)


def center_crop(array: Array, shape: tuple[int, ...]) -> Array:
    """Crop the trailing axes of ``array`` centrally to ``shape``; an odd excess drops its extra voxel first."""
    lead = array.ndim - len(shape)
    index: list[slice] = [slice(None)] * lead
    for size, want in zip(array.shape[lead:], shape):
        if want > size:
            raise ShapeError(f"cannot crop extent {size} to the larger {want}")
        start = (size - want + 1) // 2
        index.append(slice(start, start + want))
    return array[tuple(index)]


# --------------------------------------------------------------------------------------------------------------


def _read_section(vs: VolumeSet) -> list[_Raw]:
    vs.check_files()
    return [_read(vs, f) for f in vs.fnames]


def _read_masks(vs: VolumeSet) -> list[_Raw]:
    return [_read(vs, f, "fmasks") for f in vs.fmasks]


def _read(vs: VolumeSet, path: Path, key: str = "fnames") -> _Raw:
    try:
        arr = read_volume(path)
    except VolumeError as exc:
        raise SpecFileError(f"{vs.where} {key}: {exc}") from None
    _refuse_non_finite(arr, vs, path, key)
    if arr.ndim == 2:
        arr = arr[None, None]
    elif arr.ndim == 3:
        arr = arr[None]
    return _Raw(arr, vs.where, str(path), vs.is_auto_crop)


def _refuse_non_finite(arr: Array, vs: VolumeSet, path: Path, key: str) -> None:
    """NonFiniteError naming the section, the file and its first NaN or infinite voxel: an image's would spread
    over the prediction, a label's or mask's would train on NaN targets or test costs."""
    found = find_non_finite(arr)
    if found is not None:
        raise NonFiniteError(f"{vs.where} {key}: {path} holds {in_file(found, path).describe()}; replace them in "
                             "the file (e.g. with numpy.nan_to_num) or give another volume")


def _sample_masks(spec: SampleSpec, mask_ids: list[int | None], where: str, n_outputs: int) -> list[_Raw | None]:
    """The ``[maskN]`` volume for each output (None where the sample names none)."""
    if len(mask_ids) > n_outputs:
        raise SpecFileError(f"{where}: {len(mask_ids)} masks for {n_outputs} outputs; give at most one mask per "
                            "output (mask1 for output1, ...)")
    out: list[_Raw | None] = []
    for k in range(n_outputs):
        mask_id = mask_ids[k] if k < len(mask_ids) else None
        if mask_id is None:
            out.append(None)
            continue
        raws = _read_section(spec.masks[mask_id])
        if len(raws) != 1 or raws[0].array.shape[0] != 1:
            raise SpecFileError(f"{spec.masks[mask_id].where} fnames: a mask section holds one "
                                "single-channel volume")
        out.append(raws[0])
    return out


def _combine_masks(fmasks: list[Array], extra: _Raw | None, crop: Any) -> NDArray[np.bool_] | None:
    parts = [m > 0 for m in fmasks]
    if extra is not None:
        parts.append(crop(extra) > 0)
    if not parts:
        return None
    valid = np.logical_and.reduce([p.all(axis=0) for p in parts])
    return np.asarray(valid)


def _label_pp(vs: VolumeSet, out_type: str) -> str:
    kinds = {resolve_label_pp(pp, out_type) for pp in vs.pp_types}
    if len(kinds) != 1:
        raise SpecFileError(f"{vs.where} pp_types: one label volume takes one transform, got "
                            f"{', '.join(sorted(kinds))}")
    return kinds.pop()


def _common_shape(raws: list[_Raw], where: str) -> Triple:
    """The shape every volume is cropped to; error if a volume that may not be cropped differs from it."""
    shapes = [r.array.shape[1:] for r in raws]
    z, y, x = (int(min(s[axis] for s in shapes)) for axis in range(3))
    target = (z, y, x)
    fixed = [r for r in raws if not r.auto_crop]
    if fixed:
        # volumes that may not be cropped must all have one shape, and that shape must fit into every other
        first = fixed[0].array.shape[1:]
        bad = [r for r in fixed if r.array.shape[1:] != first]
        bad += [r for r in raws if r.auto_crop and any(a < b for a, b in zip(r.array.shape[1:], first))]
        if bad or first != target:
            listing = "; ".join(f"{r.section} {r.file}: {r.array.shape[1:]}" for r in raws)
            raise SpecFileError(f"{where}: volume sizes differ and is_auto_crop = no forbids cropping ({listing}); "
                                "set is_auto_crop = yes in those sections or give volumes of one size")
        return first
    if min(target) < 1:
        raise SpecFileError(f"{where}: a volume is empty ({'; '.join(f'{r.file}: {r.array.shape}' for r in raws)})")
    return target
