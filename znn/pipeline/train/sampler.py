"""Training and validation patches drawn from loaded samples: location, mirroring, augmentation, rebalancing.

Geometry (ZNN's ``python/utils.py`` ``boundary_mirror`` and ``zdataset.py``): the output voxel at ``p`` is
computed from the input window ``[p - (F - 1) // 2, p + F // 2]`` per axis, F = the input's margin + 1
(input patch - output patch + 1, the FOV for ordinary networks); for an even F the window has one voxel more
after ``p`` than before. An output patch at ``o`` (its first voxel) therefore reads the input patch starting at
``o - (I - O) // 2``.

- ``is_bd_mirror``: inputs are padded by mirroring (``numpy.pad`` mode ``symmetric``: the edge voxel repeats,
  as in ZNN's ``_mirror2d``) by ``ceil((I - O) / 2)`` on both sides, so every labelled voxel can be an output
  voxel: ``o`` ranges over ``[0, S - O]``. Labels are never mirrored.
- Without mirroring ``o`` is restricted so that the whole input window lies inside the volume.
- Locations are uniform over the valid ones; a sample is picked uniformly first (ZNN). Where every output of a
  sample has a mask, only locations whose output patch holds a valid voxel count (ZNN likewise restricts its
  candidate locations to the mask).

Augmentation (``is_data_aug``), identical for inputs, targets, masks and weights: a flip of each axis with
probability 1/2, then a random permutation of the axes whose extents are equal in every patch (input and
output), which covers ZNN's x/y flips and in-plane transpose (so the 8 in-plane rotations/reflections) and, for
isotropic patches, z/y/x transposes. A patch shape never changes. Two details keep inputs and targets aligned:

- For an even F along a flipped axis the window's asymmetry flips too, so the input patch is read one voxel
  later (``o - ceil((I - O) / 2)``); after the flip it sits where the network expects it.
- Affinity targets are *computed after* augmenting the label patch (with a one-voxel margin all round, padded
  with id 0 and mask 0 outside the volume), never flipped as affinities: a flip along axis c turns the edge to
  the predecessor into the edge to the successor, and a transpose swaps channels, and recomputing does both.

Rebalancing (``rebalance``, ZNN's ``zsample.py``): ``global`` weighs each class (target > 0 / == 0) by counts
over the whole sample per channel (boundary labels: ``half`` normalisation, ``_get_balance_weight``; affinity:
``fraction``, ``_get_balance_weight_v1``); ``patch`` recomputes them per patch (``fraction``, as ZNN); ``none``
gives ones. Counts include only valid (mask > 0) voxels and masked voxels get weight 0. After a transpose an
affinity channel takes the weights of the original axis it came from.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from znn.errors import ConfigError, ShapeError, closest
from znn.io.samples import SampleData
from znn.ops.loss import rebalance_weights
from znn.ops.preprocess import affinity, affinity_mask
from znn.types import Triple

__all__ = ["Transform", "Patch", "PatchSampler", "SamplerOptions", "REBALANCE_MODES", "IDENTITY"]

Array = NDArray[Any]
REBALANCE_MODES = ("none", "global", "patch")


@dataclass(frozen=True)
class Transform:
    """Flip the axes marked in ``flips`` (z, y, x), then permute: new axis k is old axis ``perm[k]``."""

    flips: tuple[bool, bool, bool] = (False, False, False)
    perm: Triple = (0, 1, 2)

    def apply(self, arr: Array) -> Array:
        """Apply to the last three axes of ``arr`` (leading axes, e.g. channels, are kept)."""
        lead = arr.ndim - 3
        axes = tuple(lead + a for a in range(3) if self.flips[a])
        out = np.flip(arr, axis=axes) if axes else arr
        if self.perm != (0, 1, 2):
            out = out.transpose(*range(lead), *(lead + a for a in self.perm))
        return np.ascontiguousarray(out)

    @property
    def is_identity(self) -> bool:
        return self == IDENTITY


IDENTITY = Transform()


@dataclass
class Patch:
    """One training example. Arrays are ``(C, z, y, x)``; targets, masks and weights share a shape.

    ``labels[node]`` is the (augmented) raw label patch ``(z, y, x)`` of that output, for MALIS or Rand error.
    ``position`` is the first output voxel in the sample's label coordinates (before augmentation).
    """

    inputs: dict[str, Array]
    targets: dict[str, Array]
    masks: dict[str, Array]
    weights: dict[str, Array]
    labels: dict[str, Array] = field(default_factory=dict)
    sample_id: int = 0
    position: Triple = (0, 0, 0)
    transform: Transform = IDENTITY

    @property
    def segmentation(self) -> dict[str, Array]:
        """The label patches as MALIS wants them (the same arrays as ``labels``)."""
        return self.labels


@dataclass(frozen=True)
class SamplerOptions:
    """How patches are drawn (the job keys of the same names): mirrored borders (``is_bd_mirror``), augmentation
    (``is_data_aug``), class rebalancing (``rebalance``, one of :data:`REBALANCE_MODES`) and the random seed."""

    is_bd_mirror: bool = True
    is_data_aug: bool = False
    rebalance: str = "none"
    rng_seed: int | None = 0


class PatchSampler:
    """Draws matching input/target patches from a list of :class:`SampleData`.

    ``input_patches`` maps each network input node, in the network's input order, to its input patch (z, y, x);
    ``output_patch`` is the output patch; ``fov`` the network's FOV (checked against the input patches, may be
    None). ``output_nodes`` names the network outputs in order (default ``output``, or ``output1``, ... ).
    Deterministic for ``rng_seed``.
    """

    def __init__(
        self,
        sample_datas: Sequence[SampleData],
        input_patches: Mapping[str, Sequence[int]],
        output_patch: Sequence[int],
        fov: Sequence[int] | None = None,
        options: SamplerOptions = SamplerOptions(),
        *,
        output_nodes: Sequence[str] | None = None,
    ) -> None:
        rebalance = options.rebalance
        if rebalance not in REBALANCE_MODES:
            raise ConfigError(f"rebalance_mode {rebalance!r} is not valid; {closest(rebalance, REBALANCE_MODES)}")
        if not sample_datas:
            raise ConfigError("no samples to draw patches from; check train_range/test_range")
        self.samples = list(sample_datas)
        self.output_patch: Triple = _triple(output_patch, "output patch")
        self.input_patches: dict[str, Triple] = {
            k: _triple(v, f"input patch of {k!r}") for k, v in input_patches.items()}
        self.is_bd_mirror = bool(options.is_bd_mirror)
        self.is_data_aug = bool(options.is_data_aug)
        self.rebalance = rebalance
        self.rng = np.random.default_rng(options.rng_seed)
        n_out = len(self.samples[0].targets)
        self.output_nodes = list(output_nodes) if output_nodes is not None else (
            ["output"] if n_out == 1 else [f"output{k + 1}" for k in range(n_out)])
        self._margins = self._check_patches(fov)
        for s in self.samples:
            self._check_sample(s)
        self._pad = tuple(max((m + 1) // 2 for m in axis) for axis in zip(*self._margins.values()))
        self._offset: Triple = self._pad if self.is_bd_mirror else (0, 0, 0)
        self._inputs = [self._padded_inputs(s) for s in self.samples]
        self._ranges = [self._position_range(s) for s in self.samples]
        self._tables = [self._global_tables(s) for s in self.samples] if rebalance == "global" else None
        self._groups = self._isotropic_groups()
        self._valid = [self._valid_positions(i) for i in range(len(self.samples))]

    # ----------------------------------------------------------------------------------------------------------
    # public

    def sample(self, n: int = 1) -> list[Patch]:
        """``n`` random patches (random sample, location and, with ``is_data_aug``, transform)."""
        return [self._random_patch(self.rng, self.is_data_aug) for _ in range(n)]

    def validation_patches(self, n: int, seed: int = 0) -> list[Patch]:
        """``n`` patches at random locations drawn from ``seed`` alone, never augmented: the same set each call."""
        rng = np.random.default_rng(seed)
        return [self._random_patch(rng, False) for _ in range(n)]

    def grid_positions(self, sample_index: int = 0) -> list[Triple]:
        """Output patch positions tiling sample ``sample_index``'s valid region (the last tile flush with the end)."""
        axes = []
        for low, high, size in zip(*self._ranges[sample_index], self.output_patch):
            starts = list(range(low, high + 1, size))
            if starts[-1] != high:
                starts.append(high)
            axes.append(starts)
        return [(z, y, x) for z in axes[0] for y in axes[1] for x in axes[2]]

    def grid_patches(self, sample_index: int = 0) -> Iterator[Patch]:
        """The patches at :meth:`grid_positions`, unaugmented."""
        for pos in self.grid_positions(sample_index):
            yield self.patch_at(sample_index, pos)

    def patch_at(self, sample_index: int, position: Sequence[int], transform: Transform = IDENTITY) -> Patch:
        """The patch whose output patch starts at ``position`` of sample ``sample_index``, then ``transform``."""
        pos = _triple(position, "position", low=0)
        low, high = self._ranges[sample_index]
        if any(p < lo or p > hi for p, lo, hi in zip(pos, low, high)):
            raise ShapeError(f"output patch position {pos} is outside the valid range {low}..{high} of sample "
                             f"{self.samples[sample_index].id}")
        return self._extract(sample_index, pos, transform)

    def position_range(self, sample_index: int = 0) -> tuple[Triple, Triple]:
        """Lowest and highest valid output patch position (inclusive) of a sample."""
        return self._ranges[sample_index]

    def random_transform(self, rng: np.random.Generator) -> Transform:
        """A random flip/permutation that keeps every patch shape (see the module notes)."""
        flips = tuple(bool(f) for f in rng.random(3) < 0.5)
        perm = [0, 1, 2]
        for group in self._groups:
            if len(group) > 1:
                shuffled = rng.permutation(group)
                for a, b in zip(group, shuffled):
                    perm[a] = int(b)
        return Transform(flips, tuple(perm))  # type: ignore[arg-type]

    # ----------------------------------------------------------------------------------------------------------
    # set-up

    def _check_patches(self, fov: Sequence[int] | None) -> dict[str, Triple]:
        margins: dict[str, Triple] = {}
        for node, patch in self.input_patches.items():
            m = tuple(i - o for i, o in zip(patch, self.output_patch))
            if min(m) < 0:
                raise ShapeError(f"input patch {patch} of {node!r} is smaller than the output patch "
                                 f"{self.output_patch}")
            if fov is not None and any(a > f - 1 for a, f in zip(m, fov)):
                raise ShapeError(f"input patch {patch} of {node!r} exceeds output patch {self.output_patch} + "
                                 f"FOV {tuple(fov)} - 1")
            margins[node] = m  # type: ignore[assignment]
        if not margins:
            raise ShapeError("the network has no input nodes")
        return margins

    def _check_sample(self, s: SampleData) -> None:
        if len(s.inputs) != len(self.input_patches):
            raise ConfigError(f"{s.where}: the sample gives {len(s.inputs)} input(s) but the network has "
                              f"{len(self.input_patches)} input node(s) ({', '.join(self.input_patches)}); "
                              "list one input per node (input1, input2, ...)")
        if len(s.targets) != len(self.output_nodes):
            what = "no output" if not s.targets else f"{len(s.targets)} output(s)"
            raise ConfigError(f"{s.where}: the sample has {what} but training needs one per network output "
                              f"({', '.join(self.output_nodes)}); add output = N to the sample or leave it out "
                              "of train_range/test_range")
        if any(sz < o for sz, o in zip(s.shape, self.output_patch)):
            raise ShapeError(f"{s.where}: volume {s.shape} is smaller than the output patch {self.output_patch}; "
                             "use a smaller train_outsz")

    def _padded_inputs(self, s: SampleData) -> list[Array]:
        if not any(self._offset):
            return s.inputs
        widths = [(0, 0)] + [(p, p) for p in self._pad]
        return [np.pad(x, widths, mode="symmetric") for x in s.inputs]

    def _position_range(self, s: SampleData) -> tuple[Triple, Triple]:
        low, high = [], []
        for a, (size, out) in enumerate(zip(s.shape, self.output_patch)):
            if self.is_bd_mirror:
                lo, hi = 0, size - out
            else:
                # room for the input window whichever way the axis may be flipped
                before = max(_before(m[a], self.is_data_aug) for m in self._margins.values())
                after = max(m[a] - _before(m[a], False) for m in self._margins.values())
                lo, hi = before, size - out - after
            if hi < lo:
                worst = max(self.input_patches.values(), key=lambda p: p[a])
                raise ShapeError(f"{s.where}: volume {s.shape} is too small for input patch {worst} along axis "
                                 f"{'zyx'[a]} without boundary mirroring; set is_bd_mirror = yes or use a "
                                 "smaller train_outsz")
            low.append(lo)
            high.append(hi)
        return tuple(low), tuple(high)  # type: ignore[return-value]

    def _global_tables(self, s: SampleData) -> list[Array]:
        """Per output, (C, 2) class weights [weight of target == 0, weight of target > 0] over the whole sample."""
        tables = []
        for target, mask, pp in zip(s.targets, s.masks, s.label_pp):
            norm: Literal["half", "fraction"] = "fraction" if pp == "affinity" else "half"
            weights = rebalance_weights(target, mask, norm=norm)
            valid = np.broadcast_to(mask > 0, target.shape)
            table = np.ones((target.shape[0], 2))
            for c in range(target.shape[0]):
                for cls, sel in enumerate((target[c] <= 0, target[c] > 0)):
                    picked = weights[c][sel & valid[c]]
                    if picked.size:
                        table[c, cls] = picked.flat[0]
            tables.append(table)
        return tables

    def _isotropic_groups(self) -> list[list[int]]:
        """Axes that may be permuted: equal extents in the output patch and in every input patch."""
        shapes = [self.output_patch, *self.input_patches.values()]
        groups: list[list[int]] = []
        for a in range(3):
            for g in groups:
                if all(sh[a] == sh[g[0]] for sh in shapes):
                    g.append(a)
                    break
            else:
                groups.append([a])
        return groups

    # ----------------------------------------------------------------------------------------------------------
    # drawing and cutting

    def _random_patch(self, rng: np.random.Generator, augment: bool) -> Patch:
        i = int(rng.integers(len(self.samples)))
        low, high = self._ranges[i]
        valid = self._valid[i]
        if valid is None:
            pos = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in zip(low, high))
        else:
            box = tuple(hi - lo + 1 for lo, hi in zip(low, high))
            flat = int(valid[rng.integers(valid.size)])
            pos = tuple(int(p) + lo for p, lo in zip(np.unravel_index(flat, box), low))
        transform = self.random_transform(rng) if augment else IDENTITY
        return self._extract(i, pos, transform)  # type: ignore[arg-type]

    def _valid_positions(self, i: int) -> NDArray[np.int64] | None:
        """Flat indices (in the position box) of output patches holding a valid voxel; None: every position."""
        s = self.samples[i]
        result = None
        if all(m is not None for m in s.voxel_masks) and s.voxel_masks:
            low, high = self._ranges[i]
            hit = np.zeros(tuple(hi - lo + 1 for lo, hi in zip(low, high)), dtype=bool)
            for m in s.voxel_masks:
                hit |= _window_any(m, self.output_patch, low, high)  # type: ignore[arg-type]
            result = np.flatnonzero(hit)
            if result.size == 0:
                raise ShapeError(f"{s.where}: the mask leaves no output patch {self.output_patch} with a valid "
                                 "voxel; check the mask files or use another sample")
        return result

    def _extract(self, i: int, pos: Triple, transform: Transform) -> Patch:
        s = self.samples[i]
        inputs = {}
        offset = self._offset
        for (node, size), vol in zip(self.input_patches.items(), self._inputs[i]):
            start = [pos[a] + offset[a] - _before(self._margins[node][a], transform.flips[a]) for a in range(3)]
            inputs[node] = transform.apply(vol[(slice(None), *_region(start, size))])
        patch = Patch(inputs, {}, {}, {}, sample_id=s.id, position=pos, transform=transform)
        for k, node in enumerate(self.output_nodes):
            if s.label_pp[k] == "affinity":
                target, mask, label = self._affinity_patch(s, k, pos, transform)
            else:
                target, mask, label = self._voxel_patch(s, k, pos, transform)
            patch.targets[node] = target
            patch.masks[node] = mask
            patch.weights[node] = self._weights(i, k, target, mask, transform)
            patch.labels[node] = label
        return patch

    def _voxel_patch(self, s: SampleData, k: int, pos: Triple, t: Transform) -> tuple[Array, Array, Array]:
        region = (slice(None), *_region(pos, self.output_patch))
        target = t.apply(s.targets[k][region])
        mask = np.broadcast_to(t.apply(s.masks[k][region]), target.shape).copy()
        label = s.labels[k]
        label_patch = t.apply(label[region] if label.ndim == 4 else label[region[1:]])
        return target, mask, label_patch

    def _affinity_patch(self, s: SampleData, k: int, pos: Triple, t: Transform) -> tuple[Array, Array, Array]:
        """Affinities recomputed from the augmented label patch with a one-voxel margin (see the module notes)."""
        dtype = s.targets[k].dtype
        grown = tuple(p - 1 for p in pos)
        shape = tuple(o + 2 for o in self.output_patch)
        label = t.apply(_cut_padded(s.labels[k], grown, shape, 0))
        vmask = s.voxel_masks[k]
        valid = np.ones(s.shape, dtype=bool) if vmask is None else vmask
        valid_patch = t.apply(_cut_padded(valid, grown, shape, False))
        inner = (slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
        target = affinity(label, dtype)[inner]
        mask = affinity_mask(valid_patch, dtype)[inner]
        return np.ascontiguousarray(target), np.ascontiguousarray(mask), label[inner[1:]].copy()

    def _weights(self, i: int, k: int, target: Array, mask: Array, t: Transform) -> Array:
        if self.rebalance == "none":
            return np.ones_like(target)
        if self.rebalance == "patch":
            return rebalance_weights(target, mask, norm="fraction")
        assert self._tables is not None
        table = self._tables[i][k]
        if self.samples[i].label_pp[k] == "affinity":
            table = table[list(t.perm)]  # augmented channel c is the original axis perm[c]
        w = np.where(target > 0, table[:, 1, None, None, None], table[:, 0, None, None, None])
        return np.where(mask > 0, w, 0).astype(target.dtype)


# --------------------------------------------------------------------------------------------------------------


def _window_any(mask: NDArray[np.bool_], size: Triple, low: Triple, high: Triple) -> NDArray[np.bool_]:
    """For each window start in ``low..high``: does ``mask[start : start + size]`` hold a True voxel?"""
    table = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1).cumsum(2), ((1, 0), (1, 0), (1, 0)))
    lo = [np.arange(a, b + 1) for a, b in zip(low, high)]
    total = np.zeros(tuple(len(r) for r in lo), dtype=np.int64)
    for corner in itertools.product((0, 1), repeat=3):
        idx = np.ix_(*(r + size[a] * c for a, (r, c) in enumerate(zip(lo, corner))))
        total += (-1) ** (3 - sum(corner)) * table[idx]
    return total > 0


def _before(margin: int, flipped: bool) -> int:
    """Input voxels before the output patch: (I - O) // 2, or its complement along a flipped axis."""
    return margin - margin // 2 if flipped else margin // 2


def _region(start: Sequence[int], size: Sequence[int]) -> tuple[slice, slice, slice]:
    return tuple(slice(a, a + n) for a, n in zip(start, size))  # type: ignore[return-value]


def _cut_padded(vol: Array, start: Sequence[int], shape: Sequence[int], fill: Any) -> Array:
    """``vol[start : start + shape]`` where parts outside ``vol`` read ``fill``."""
    out = np.full(tuple(shape), fill, dtype=vol.dtype)
    src, dst = [], []
    for a, (st, n, size) in enumerate(zip(start, shape, vol.shape)):
        lo, hi = max(st, 0), min(st + n, size)
        src.append(slice(lo, hi))
        dst.append(slice(lo - st, hi - st))
    out[tuple(dst)] = vol[tuple(src)]
    return out


def _triple(values: Sequence[int], what: str, low: int = 1) -> Triple:
    t = tuple(int(v) for v in values)
    if len(t) != 3 or min(t) < low:
        raise ShapeError(f"{what} {tuple(values)} must be three integers z,y,x >= {low}")
    return t
