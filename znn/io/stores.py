"""Output stores of dense inference and segmentation: OME-Zarr images written block by block, and their export to h5.

The output of a dense run is one zarr directory with one OME-Zarr image (:mod:`znn.io.ngff`) per network output node
group: ``<store>/<node>`` holds the full-resolution array ``0``, whose chunks are the output blocks (no two block
tasks write one chunk), NGFF 0.5 metadata (axes c, z, y, x, voxel size) and the run's provenance, and, on request,
downsampled levels ``1``, ``2``, ... Blocks are written through :class:`~znn.io.atomic_store.AtomicLocalStore` (each
chunk a temporary file renamed into place), so a writer killed mid-write never leaves a half-written chunk. This
module is the one place dense inference creates, opens and writes those images, and the one place it writes h5
exports. The label volume of `znn segment` is created here too (:func:`create_label_array`: an OME-Zarr label
image at ``labels/segmentation`` of an image-shaped group, as NGFF readers look for it; :func:`write_label_pyramid`),
with the small side files a blockwise segmentation keeps (:func:`write_side_arrays`).
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from znn.errors import OutputError
from znn.io.atomic_store import AtomicLocalStore, atomic_write_bytes, clear_partial
from znn.io.ngff import (
    ImageMeta,
    create_image,
    drop_pyramid,
    h5_attributes,
    labels_attributes,
    level_zero,
    parent_attributes,
    write_pyramid,
)
from znn.io.paths import check_writable

__all__ = ["ArrayLayout", "arrays_match", "check_output_store", "check_h5_export", "create_arrays", "write_region",
           "read_region", "create_label_array", "label_image_path", "refresh_label_parent", "write_label_pyramid",
           "drop_label_pyramid", "LABELS_GROUP", "LABEL_IMAGE", "write_side_arrays", "read_side_arrays",
           "export_volume", "clear_partial", "ImageMeta", "update_metadata", "drop_pyramid", "write_pyramid",
           "LABEL_DTYPE"]

LEVEL0 = "0"  # the full-resolution array inside each output image
#: the dtype of every label volume written (segment ids; 0 = no segment)
LABEL_DTYPE = "uint64"
LABELS_GROUP = "labels"  # NGFF: an image's label images are the members of its group "labels"
LABEL_IMAGE = "segmentation"  # the name of the label image a segmentation writes there


@dataclass(frozen=True)
class ArrayLayout:
    """The shape and chunk shape of one array of a store."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]


def arrays_match(store: str | Path, layouts: Mapping[str, ArrayLayout]) -> bool:
    """Whether ``store`` holds an OME-Zarr image per name of ``layouts`` whose level 0 is readable, with that shape
    and those chunks (a store of an older layout, with plain arrays, does not match: it is recreated)."""
    import zarr
    from zarr.storage import LocalStore

    try:
        for name, layout in layouts.items():
            group = zarr.open_group(LocalStore(str(store), read_only=True), path=name, mode="r")
            if level_zero(group.attrs.asdict()) != LEVEL0:
                return False
            array = zarr.open_array(LocalStore(str(store), read_only=True), path=f"{name}/{LEVEL0}", mode="r")
            if tuple(array.shape) != layout.shape or tuple(array.chunks) != layout.chunks:
                return False
    except Exception:  # noqa: BLE001 - any unreadable group or array means: it does not match
        return False
    return True


def check_output_store(store: str | Path, what: str = "output store", fix: str = "") -> Path:
    """``store`` as a Path when dense inference can write its arrays there: a writable folder (or a place one can be
    made) that is not itself a zarr array (the outputs are arrays inside a group); :class:`OutputError` otherwise."""
    store = check_writable(store, what, folder=True, fix=fix)
    advice = f"; {fix}" if fix else "; name another store or remove it"
    if (store / ".zarray").is_file() or _node_type(store / "zarr.json") == "array":
        raise OutputError(f"{what} {store}: is a zarr array; the outputs are arrays inside a zarr group (one per "
                          f"output node), so the store cannot be an array itself{advice}")
    return store


def _node_type(meta: Path) -> str | None:
    """The ``node_type`` of a zarr v3 ``zarr.json`` (None when there is none or it is unreadable)."""
    try:
        node_type = json.loads(meta.read_text()).get("node_type")
    except (OSError, ValueError, AttributeError):
        return None
    return str(node_type) if node_type is not None else None


_OPEN: dict[tuple[str, str], Any] = {}
_OPEN_LOCK = threading.Lock()


def create_arrays(store: str | Path, layouts: Mapping[str, ArrayLayout], dtype: str,
                  meta: ImageMeta | None = None) -> dict[str, str]:
    """Create (or replace) one OME-Zarr image per name of ``layouts`` in ``store``, level 0 filled with 0, with the
    metadata of ``meta`` (voxel size, origin, provenance); returns name -> volume path (``store/name``)."""
    with _OPEN_LOCK:  # arrays opened before were replaced: their shape and chunks may differ now
        for name in layouts:
            _OPEN.pop((str(Path(store).absolute()), name), None)
    return {name: create_image(store, name, layout.shape, layout.chunks, dtype, meta or ImageMeta())
            for name, layout in layouts.items()}


def update_metadata(store: str | Path, names: Sequence[str], meta: ImageMeta) -> None:
    """Rewrite the metadata of the images ``names`` of ``store`` (a resumed run: same arrays, this run's voxel size
    and provenance); their downsampled levels are dropped, since level 0 may change under them."""
    import zarr

    from znn.io.ngff import write_image_metadata

    for name in names:
        drop_pyramid(store, name)
        group = zarr.open_group(AtomicLocalStore(str(store)), path=name, mode="r+")
        level0 = group[LEVEL0]
        assert isinstance(level0, zarr.Array)  # arrays_match said so before this run kept the store
        write_image_metadata(group, meta, level0.ndim)


def _opened_for_writing(store: str, name: str) -> Any:
    """Level 0 of image ``name`` of ``store`` opened for atomic chunk writes, once per process (every block task
    reuses it)."""
    import zarr

    key = (str(Path(store).absolute()), name)
    with _OPEN_LOCK:
        if key not in _OPEN:
            _OPEN[key] = zarr.open_array(AtomicLocalStore(store), path=f"{name}/{LEVEL0}", mode="r+")
        return _OPEN[key]


def write_region(store: str | Path, name: str, region: tuple[slice, ...], values: np.ndarray) -> None:
    """Write ``values`` into ``region`` of image ``name``'s level 0 in ``store`` (whole chunks written atomically)."""
    _opened_for_writing(str(store), name)[region] = np.ascontiguousarray(values)


def read_region(store: str | Path, name: str, region: tuple[slice, ...]) -> np.ndarray:
    """The values of ``region`` of array ``name`` of ``store`` (an array this process writes too)."""
    return np.asarray(_opened_for_writing(str(store), name)[region])


def label_image_path(group: str) -> str:
    """The path inside the store of the label image of the segmentation at ``group`` (``""``: the store's root)."""
    return "/".join(part for part in (group, LABELS_GROUP, LABEL_IMAGE) if part)


def create_label_array(store: str | Path, group: str, shape: tuple[int, int, int],
                       chunks: tuple[int, int, int], meta: ImageMeta | None = None) -> str:
    """Create (or replace) the ``(z, y, x)`` uint64 label volume of the segmentation at ``group`` of ``store``
    (``""``: the store itself), filled with 0 (no segment), whose chunks are the blocks that write it: an OME-Zarr
    label image with the voxel size, origin and provenance of ``meta``, laid out where NGFF readers look for labels
    (``group/labels/segmentation``, listed by ``group/labels``, inside the image ``group``: :mod:`znn.io.ngff`).
    Whatever ``group`` held is replaced (an older layout too, whose ``group/labels`` was the label image itself).
    Returns the label image's volume path. Every label volume is made here."""
    labels = ImageMeta(meta.resolution, meta.origin, meta.provenance, labels=True) if meta else ImageMeta(labels=True)
    _empty_group(store, group)
    path = create_arrays(store, {label_image_path(group): ArrayLayout(tuple(shape), tuple(chunks))}, LABEL_DTYPE,
                         labels)[label_image_path(group)]
    _put_attrs(store, "/".join(part for part in (group, LABELS_GROUP) if part), labels_attributes([LABEL_IMAGE]))
    refresh_label_parent(store, group)
    return path


def _empty_group(store: str | Path, group: str) -> None:
    """``group`` of ``store`` made an empty group; the store's root keeps its other members (other images)."""
    import zarr

    root = zarr.open_group(AtomicLocalStore(str(store)), mode="a")
    if group:
        root.create_group(group, overwrite=True)
    elif LABELS_GROUP in root:
        del root[LABELS_GROUP]


def _put_attrs(store: str | Path, path: str, attrs: Mapping[str, Any]) -> None:
    import zarr

    zarr.open_group(AtomicLocalStore(str(store)), path=path, mode="a").attrs.put(dict(attrs))


def refresh_label_parent(store: str | Path, group: str) -> None:
    """(Re)write the image attributes of the segmentation's group from those of its label image (its levels)."""
    import zarr
    from zarr.storage import LocalStore

    label = zarr.open_group(LocalStore(str(store), read_only=True), path=label_image_path(group), mode="r")
    _put_attrs(store, group, parent_attributes(label.attrs.asdict(), f"{LABELS_GROUP}/{LABEL_IMAGE}"))


def write_label_pyramid(store: str | Path, group: str, levels: int | None,
                        run: Callable[[dict[Any, Any], list[Any]], Any] | None = None) -> list[str]:
    """The downsampled levels of the segmentation at ``group`` (:func:`znn.io.ngff.write_pyramid` with the label
    image's method, ``mode``: each voxel the most frequent id of its window, never an average), recorded in both
    the label image and its group; returns their volume paths."""
    made = write_pyramid(store, label_image_path(group), levels, run=run)
    refresh_label_parent(store, group)
    return made


def drop_label_pyramid(store: str | Path, group: str) -> None:
    """Remove the downsampled levels of the segmentation at ``group`` (its level 0 is about to change)."""
    drop_pyramid(store, label_image_path(group))
    refresh_label_parent(store, group)


def write_side_arrays(store: str | Path, name: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Keep ``arrays`` in the file ``name`` (a path inside ``store``, e.g. ``znn-manifest/slabs/0_1_2.npz``), written
    atomically (all of it or nothing)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, allow_pickle=False, **dict(arrays))
    root = Path(store)
    atomic_write_bytes(root, root / name, buffer.getvalue())


# NumPy parses each .npy header with ast.literal_eval, and CPython 3.11's AST constructor is not thread-safe: parsed
# in two threads at once it can fail with "SystemError: AST constructor recursion depth mismatch" (CPython
# gh-106905; the segmentation's face tasks read their slabs side by side on the threaded scheduler).
_NPY_READ_LOCK = threading.Lock()


def read_side_arrays(store: str | Path, name: str) -> dict[str, np.ndarray]:
    """The arrays :func:`write_side_arrays` kept in ``name`` of ``store`` (one thread at a time: see above)."""
    with _NPY_READ_LOCK, np.load(Path(store) / name, allow_pickle=False) as found:
        return {key: np.asarray(found[key]) for key in found.files}


def export_volume(source: str, target: str, default_key: str) -> None:
    """Copy the volume at ``source`` to ``target`` (any volume path): block by block into h5 (dataset
    ``default_key`` when ``target`` names none), never the whole volume at once; whole for the other formats."""
    from znn.io.volume import open_volume, parse_volume_path, volume_resolution, write_volume

    vp = parse_volume_path(target)
    array = open_volume(source)
    if vp.format == "h5":  # with the voxel size as h5 readers spell it (CREMI's resolution, Fiji's element_size_um)
        _export_h5(array, vp.file, vp.key or default_key, h5_attributes(volume_resolution(source)))
    else:
        write_volume(target, array, overwrite=True)


def check_h5_export(path: str | Path, what: str, fix: str) -> None:
    """Before any work: an h5 export adds its dataset to an existing ``path``, which must then be an HDF5 file (h5py
    cannot open another file, and replacing it would lose whatever it is)."""
    import h5py

    if Path(path).is_file() and not h5py.is_hdf5(path):
        raise OutputError(f"{what} {path}: exists and is not an HDF5 file; {fix or 'remove it or name another'}")


def _export_h5(array: Any, path: Path, key: str, attrs: Mapping[str, Any]) -> None:
    import h5py

    from znn.io.volume import iter_blocks

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "a") as f:
        if key in f:
            del f[key]
        chunks = tuple(min(c, s) for c, s in zip(array.chunksize, array.shape))
        dset = f.create_dataset(key, shape=array.shape, dtype=array.dtype, chunks=chunks)
        dset.attrs.update(attrs)
        for region, block in iter_blocks(array, batch=1):
            dset[region] = block
