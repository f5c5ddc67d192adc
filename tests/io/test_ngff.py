"""OME-Zarr (NGFF 0.5) images: their metadata validates against the official JSON schemas, pyramids are made block
by block and equal the whole-array kernel, the voxel size is read back from OME-Zarr and h5 inputs, readers open an
image at level 0, and a bad ``resolution`` says what is valid.

The schemas are the ones the OME-NGFF specification publishes (``0.5/schemas/*.schema``), as the ngff-zarr package
bundles them; ngff-zarr's ``validate`` runs them with jsonschema (both in the ``test`` extra)."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import zarr

from znn.errors import VolumeError
from znn.io import ngff
from znn.io.ngff import ImageMeta, Resolution, create_image, parse_resolution, write_pyramid
from znn.io.volume import open_volume, read_volume, volume_resolution, write_volume
from znn.ops.downsample import downsample


def validate(attrs: dict[str, Any], model: str = "image", strict: bool = True) -> None:
    """Validate zarr attributes against the official NGFF 0.5 JSON schema ``model`` (image or label)."""
    from ngff_zarr.validate import validate as against_schema

    against_schema(json.loads(json.dumps(attrs)), version="0.5", model=model, strict=strict)


def group_attrs(path: Path) -> dict[str, Any]:
    return dict(json.loads((path / "zarr.json").read_text())["attributes"])


# ---------------------------------------------------------------------------------------------------- metadata
@pytest.mark.parametrize("ndim", [2, 3, 4])
@pytest.mark.parametrize("resolution", [None, Resolution((40.0, 4.0, 4.0), "nanometer")])
def test_image_attributes_validate_against_the_ngff_schema(ndim, resolution):
    meta = ImageMeta(resolution, origin=(2.0, 3.0, 3.0), provenance={"job": "a.cfg"})
    attrs = ngff.image_attributes("output", ndim, meta, factors=[(1, 2, 2)[-min(ndim, 3):]] * 2)
    validate(attrs)
    scales = attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in scales["axes"]] == ["c", "z", "y", "x"][-ndim:]
    assert [d["path"] for d in scales["datasets"]] == ["0", "1", "2"]
    assert attrs["znn"] == {"job": "a.cfg"}


def test_label_attributes_validate_as_an_image_and_a_label_image():
    attrs = ngff.image_attributes("seg", 4, ImageMeta(Resolution((8.0, 8.0, 8.0)), labels=True), [(2, 2, 2)])
    validate(attrs, "image")
    validate(attrs, "label", strict=False)  # strict asks for a colour per id, which a segmentation has not
    assert attrs["ome"]["multiscales"][0]["type"] == "mode"
    with pytest.raises(VolumeError, match="label image is downsampled with mode or stride"):
        ngff.image_attributes("seg", 4, ImageMeta(labels=True, method="mean"))


def test_the_image_around_a_label_image_names_its_arrays_and_validates():
    label = ngff.image_attributes("segmentation", 3, ImageMeta(Resolution((40.0, 4.0, 4.0)), (1.0, 2.0, 3.0),
                                                               {"made": "here"}, labels=True), [(1, 2, 2)])
    assert label["ome"]["image-label"] == {"source": {"image": "../../"}}  # its image holds its labels group
    parent = ngff.parent_attributes(label, "labels/segmentation")
    validate(parent)
    assert [d["path"] for d in parent["ome"]["multiscales"][0]["datasets"]] == ["labels/segmentation/0",
                                                                                "labels/segmentation/1"]
    assert "image-label" not in parent["ome"] and parent["znn"] == {"made": "here"}
    assert ngff.label_names(ngff.labels_attributes(["segmentation"])) == ["segmentation"]
    assert ngff.label_names(parent) is None
    assert ngff.origin_of(parent) == (1.0, 2.0, 3.0)


def test_scale_and_translation_of_each_level():
    meta = ImageMeta(Resolution((40.0, 4.0, 4.0), "nanometer"), origin=(5.0, 10.0, 10.0))
    datasets = ngff.image_attributes("o", 4, meta, [(1, 2, 2), (1, 2, 2)])["ome"]["multiscales"][0]["datasets"]
    scales = [d["coordinateTransformations"][0]["scale"] for d in datasets]
    shifts = [d["coordinateTransformations"][1]["translation"] for d in datasets]
    assert scales == [[1, 40, 4, 4], [1, 40, 8, 8], [1, 40, 16, 16]]
    # voxel 0 of level k is the mean of a 2^k window: its centre is (2^k - 1) / 2 level-0 voxels further
    assert shifts == [[0, 200, 40, 40], [0, 200, 42, 42], [0, 200, 46, 46]]
    strided = ngff.image_attributes("o", 4, ImageMeta(meta.resolution, meta.origin, labels=True, method="stride"),
                                    [(1, 2, 2)])["ome"]["multiscales"][0]["datasets"]
    assert strided[1]["coordinateTransformations"][1]["translation"] == [0, 200, 40, 40]


@pytest.mark.parametrize("text, want", [
    ("40,4,4 nm", Resolution((40.0, 4.0, 4.0), "nanometer")),
    ("40, 4, 4", Resolution((40.0, 4.0, 4.0), "nanometer")),
    ("0.05,0.004,0.004 um", Resolution((0.05, 0.004, 0.004), "micrometer")),
    ("1,1,1 Angstrom", Resolution((1.0, 1.0, 1.0), "angstrom")),
    ("30,6,6nm", Resolution((30.0, 6.0, 6.0), "nanometer")),
    ("4e1,4,4e-0 nm", Resolution((40.0, 4.0, 4.0), "nanometer")),
])
def test_resolution_forms(text, want):
    assert parse_resolution(text) == want
    assert parse_resolution(str(want)) == want


@pytest.mark.parametrize("text, message", [
    ("40,4 nm", "three positive finite sizes"), ("40,0,4 nm", "three positive finite sizes"),
    ("40,4,nan", "three positive finite sizes"), ("a,b,c", "not a voxel size"),
    ("40,4,4 furlong", "unknown unit 'furlong'"),
])
def test_resolution_mistakes_say_what_is_valid(text, message):
    with pytest.raises(ValueError, match=message):
        parse_resolution(text)


# ---------------------------------------------------------------------------------------------------- pyramids
def test_pyramid_factors_make_anisotropic_voxels_rounder_first():
    em = ngff.pyramid_factors((1, 64, 4096, 4096), (40.0, 4.0, 4.0), None)
    # y, x halve while their voxels stay at most z's 40 nm (8, 16, 32 nm); at 32 nm (2 x 32 > 40) everything halves
    assert em == [(1, 2, 2)] * 3 + [(2, 2, 2)]
    extent = np.array([64, 4096, 4096])
    for factors in em[:-1]:
        extent = -(-extent // np.array(factors))
    assert extent.max() > 256 >= (-(-extent // np.array(em[-1]))).max()  # auto: up to the first level <= 256
    assert ngff.pyramid_factors((2, 1, 100, 100), (1.0, 1.0, 1.0), 3) == [(1, 2, 2)] * 3  # one slice stays one
    assert ngff.pyramid_factors((3, 300, 300), (1.0, 1.0, 1.0), None) == [(2, 2, 2)]  # auto: until <= 256 voxels
    assert ngff.pyramid_factors((1, 1, 2), (1.0, 1.0, 1.0), 5) == [(1, 1, 2)]  # stops when nothing can halve


def _image(store: Path, shape=(2, 5, 37, 30), chunks=(2, 2, 16, 16), labels=False) -> np.ndarray:
    rng = np.random.default_rng(0)
    data = (rng.integers(0, 5, shape).astype(np.uint64) if labels else rng.random(shape).astype(np.float32))
    meta = ImageMeta(Resolution((40.0, 4.0, 4.0)), provenance={"made": "here"}, labels=labels)
    path = create_image(store, "output", shape, chunks, data.dtype, meta)
    zarr.open_array(str(store / "output" / "0"), mode="r+")[...] = data
    assert path == f"{store}/output"
    return data


@pytest.mark.parametrize("labels", [False, True])
def test_pyramid_levels_equal_the_whole_array_kernel_and_validate(tmp_path, labels):
    store = tmp_path / "out.zarr"
    data = _image(store, labels=labels)
    paths = write_pyramid(store, "output", 2)
    method = "mode" if labels else "mean"
    want = downsample(data, (1, 1, 2, 2), method)
    np.testing.assert_array_equal(read_volume(paths[0]), want)
    np.testing.assert_array_equal(read_volume(paths[1]), downsample(want, (1, 1, 2, 2), method))
    assert zarr.open_array(paths[1]).chunks == (2, 2, 10, 8)  # level 0's chunks, clipped to the level
    attrs = group_attrs(store / "output")
    validate(attrs)
    assert attrs["znn"] == {"made": "here"}
    assert attrs["ome"]["multiscales"][0]["type"] == method
    assert volume_resolution(paths[1]) == Resolution((40.0, 16.0, 16.0))
    np.testing.assert_array_equal(read_volume(store / "output"), data)  # the image means its level 0
    np.testing.assert_array_equal(read_volume(store), data)  # the store's only image
    for level in (1, 2):
        assert json.loads((store / "output" / str(level) / "zarr.json").read_text())["dimension_names"] == \
            ["c", "z", "y", "x"]


def test_pyramid_runs_on_any_scheduler_and_is_replaced_by_a_smaller_one(tmp_path):
    from dask.local import get_sync

    store = tmp_path / "out.zarr"
    data = _image(store)
    graphs = []

    def run(dsk, keys):
        graphs.append(pickle.loads(pickle.dumps(dsk)))  # tasks travel to dask.distributed workers
        get_sync(dsk, keys)

    assert len(write_pyramid(store, "output", 3, run=run)) == 3
    # one task per chunk of each level: (5, 19, 15) in chunks of (2, 16, 16) is 3 x 2 x 1, then 3 x 1 x 1
    assert [len(g) for g in graphs] == [6, 3, 3]
    write_pyramid(store, "output", 1)
    assert not (store / "output" / "2").exists()
    assert [d["path"] for d in group_attrs(store / "output")["ome"]["multiscales"][0]["datasets"]] == ["0", "1"]
    ngff.drop_pyramid(store, "output")
    assert not (store / "output" / "1").exists()
    validate(group_attrs(store / "output"))
    np.testing.assert_array_equal(read_volume(store / "output"), data)


def test_a_label_pyramid_is_never_averaged(tmp_path):
    store = tmp_path / "seg.zarr"
    _image(store, labels=True)
    with pytest.raises(VolumeError, match="label image is downsampled with mode or stride, not 'mean'"):
        write_pyramid(store, "output", 1, method="mean")
    with pytest.raises(VolumeError, match="'median' is not known"):
        write_pyramid(store, "output", 1, method="median")
    write_pyramid(store, "output", 1, method="stride")
    assert group_attrs(store / "output")["ome"]["multiscales"][0]["type"] == "stride"
    np.testing.assert_array_equal(read_volume(store / "output" / "1"), read_volume(store / "output")[:, :, ::2, ::2])


def test_pyramid_of_something_that_is_no_image_says_how_to_make_one(tmp_path):
    zarr.create_array(str(tmp_path / "plain.zarr"), shape=(4, 4), dtype="f4", chunks=(2, 2))
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w").create_group("output")
    with pytest.raises(VolumeError, match="not an OME-Zarr image.*create_image"):
        write_pyramid(tmp_path / "g.zarr", "output", 1)


# ---------------------------------------------------------------------------------------------------- reading
def test_written_volumes_are_ome_zarr_images(tmp_path):
    data = np.arange(3 * 8 * 8, dtype=np.uint16).reshape(3, 8, 8)
    write_volume(tmp_path / "a.zarr" / "raw", data, chunks=(1, 8, 8))
    validate(group_attrs(tmp_path / "a.zarr" / "raw"))
    np.testing.assert_array_equal(read_volume(tmp_path / "a.zarr" / "raw"), data)
    assert open_volume(tmp_path / "a.zarr" / "raw").chunks == ((1, 1, 1), (8,), (8,))
    assert volume_resolution(tmp_path / "a.zarr" / "raw") == Resolution((1.0, 1.0, 1.0), None)


def test_older_stores_of_plain_arrays_still_read(tmp_path):
    data = np.arange(2 * 4 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 4)
    zarr.open_group(str(tmp_path / "old.zarr"), mode="w").create_array("output", data=data, chunks=(2, 2, 4, 4))
    np.testing.assert_array_equal(read_volume(tmp_path / "old.zarr" / "output"), data)
    np.testing.assert_array_equal(read_volume(tmp_path / "old.zarr"), data)
    assert volume_resolution(tmp_path / "old.zarr" / "output") is None


def test_voxel_size_of_an_ngff_04_image_written_by_another_tool(tmp_path):
    """zarr v2 with ``multiscales`` at the top of ``.zattrs`` (NGFF 0.4), in micrometers, level 1 by its path."""
    root = zarr.open_group(str(tmp_path / "em.zarr"), mode="w", zarr_format=2)
    for level, size in ((0, 8), (1, 4)):
        root.create_array(str(level), data=np.zeros((size, size, size), np.uint8))
    root.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"], "datasets": [
        {"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": [0.03 * 2**level] * 3}]}
        for level in (0, 1)]}]
    assert volume_resolution(tmp_path / "em.zarr") == Resolution((0.03, 0.03, 0.03), "micrometer")
    assert volume_resolution(tmp_path / "em.zarr" / "1") == Resolution((0.06, 0.06, 0.06), "micrometer")
    assert read_volume(tmp_path / "em.zarr").shape == (8, 8, 8)  # level 0, not "a group holding 2 arrays"


@pytest.mark.parametrize("key, value, want", [
    ("resolution", [40.0, 4.0, 4.0], Resolution((40.0, 4.0, 4.0), "nanometer")),
    ("element_size_um", [0.05, 0.004, 0.004], Resolution((0.05, 0.004, 0.004), "micrometer")),
    ("resolution", [4.0, 4.0], None), ("resolution", "forty", None), ("offset", [1.0, 2.0, 3.0], None),
])
def test_voxel_size_of_an_h5_dataset(tmp_path, key, value, want):
    with h5py.File(tmp_path / "raw.h5", "w") as f:
        f.create_dataset("volumes/raw", data=np.zeros((2, 4, 4), np.uint8)).attrs[key] = value
    assert volume_resolution(f"{tmp_path / 'raw.h5'}:/volumes/raw") == want
    assert volume_resolution(f"{tmp_path / 'raw.h5'}[0:1]") == want  # the only dataset, a z range of it


def test_tif_gives_no_voxel_size(tmp_path):
    write_volume(tmp_path / "a.tif", np.zeros((2, 4, 4), np.uint8))
    assert volume_resolution(tmp_path / "a.tif") is None


def test_provenance_records_digests_and_version(tmp_path):
    (tmp_path / "net.znn").write_text("nodes")
    made = ngff.provenance(network=tmp_path / "net.znn", checkpoint=None, job=tmp_path / "j.cfg", transform="none")
    assert made["network"] == {"path": str(tmp_path / "net.znn"), "sha256": hashlib.sha256(b"nodes").hexdigest()}
    assert made["checkpoint"] is None and made["job"] == str(tmp_path / "j.cfg") and made["transform"] == "none"
    assert made["version"] == ngff.znn_version() != ""
