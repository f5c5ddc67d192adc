"""`znn forward` writes OME-Zarr (NGFF 0.5 on zarr v3), end to end through the command: the metadata validates
against the official JSON schema, ome-zarr-py's reader opens the output with its axes and voxel size, the voxel
size comes from the sample file, the job file or the input's own metadata (in that order), the pyramid is made on
request and dropped when level 0 changes, provenance names the files that made the output, and a bad ``resolution``
is one line naming the file and key."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from tests.io.test_ngff import group_attrs, validate
from tests.pipeline.jobs.test_outputs import FORWARD_SPEC, forward_job, refused
from znn.cli import main
from znn.io.ngff import ImageMeta, Resolution, create_image
from znn.io.volume import read_volume, volume_resolution, volume_shape_dtype
from znn.ops.downsample import downsample_mean

STORE = Path("out") / "pred_sample1_output.zarr"


def _forward(folder: Path, *flags: str, spec_resolution: str | None = None, **keys: str) -> Path:
    """Run `znn forward` on the tiny job of ``folder`` (train-raw.tif, 2 x 24 x 24); returns its output image."""
    job = forward_job(folder, **keys)
    if spec_resolution is not None:
        spec = FORWARD_SPEC.format(raw=keys.get("raw", "train-raw.tif"))
        (folder / "forward.spec").write_text(spec.replace("[sample1]", f"resolution = {spec_resolution}\n\n[sample1]"))
    assert main(["forward", str(job), "--quiet", *flags]) == 0
    return folder / STORE / "output"


def _scales(image: Path) -> list[list[float]]:
    datasets = group_attrs(image)["ome"]["multiscales"][0]["datasets"]
    return [d["coordinateTransformations"][0]["scale"] for d in datasets]


@pytest.fixture(scope="module")
def pyramid_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One forward run with ``resolution = 40,4,4 nm`` and ``--pyramid 2``, shared by the tests that only read it."""
    return _forward(tmp_path_factory.mktemp("forward"), "--pyramid", "2", resolution="40,4,4 nm")


def test_forward_output_validates_against_the_ngff_05_schema(pyramid_output):
    attrs = group_attrs(pyramid_output)
    validate(attrs)  # the official image schema, strict (name, type and metadata of the multiscales too)
    scales = attrs["ome"]["multiscales"][0]
    assert scales["axes"] == [{"name": "c", "type": "channel"}] + [
        {"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
    assert _scales(pyramid_output) == [[1, 40, 4, 4], [1, 40, 8, 8], [1, 40, 16, 16]]
    for level, shape in enumerate([(2, 2, 24, 24), (2, 2, 12, 12), (2, 2, 6, 6)]):
        meta = json.loads((pyramid_output / str(level) / "zarr.json").read_text())
        assert (meta["zarr_format"], meta["node_type"], tuple(meta["shape"])) == (3, "array", shape)
        assert meta["dimension_names"] == ["c", "z", "y", "x"]
    from ome_zarr_models.v05.image import Image  # pydantic models of NGFF 0.5: arrays checked against the axes

    assert len(Image.from_zarr(zarr.open_group(str(pyramid_output), mode="r")).datasets[0]) == 3


def test_pyramid_levels_are_the_mean_of_level_zero(pyramid_output):
    level0 = read_volume(pyramid_output)  # the image path reads level 0: znn evaluate and exports keep working
    assert level0.shape == (2, 2, 24, 24)
    np.testing.assert_array_equal(level0, read_volume(pyramid_output / "0"))
    level1 = downsample_mean(level0, (1, 1, 2, 2))
    np.testing.assert_allclose(read_volume(pyramid_output / "1"), level1, rtol=1e-6)
    np.testing.assert_allclose(read_volume(pyramid_output / "2"), downsample_mean(level1, (1, 1, 2, 2)), rtol=1e-6)


def test_provenance_names_the_files_that_made_the_output(pyramid_output):
    folder = pyramid_output.parents[2]
    made = group_attrs(pyramid_output)["znn"]
    for key, name in (("network", "net.znn"), ("checkpoint", "net/net_current.h5")):
        assert made[key] == {"path": str((folder / name).resolve()),
                             "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest()}
    assert made["job"] == str((folder / "forward.cfg").resolve())
    assert (made["sample"], made["transform"], made["dtype"]) == (1, "softmax", "float32")
    assert made["inputs"] == {"input": [str((folder / "train-raw.tif").resolve())]}
    assert made["version"]


def test_ome_zarr_py_reads_the_axes_and_voxel_size(pyramid_output):
    """ome-zarr-py's reader (what napari-ome-zarr uses) opens the output as a multiscale image."""
    reader = pytest.importorskip("ome_zarr.reader")
    from ome_zarr.io import parse_url

    nodes = list(reader.Reader(parse_url(str(pyramid_output)))())
    assert len(nodes) == 1 and nodes[0].specs and type(nodes[0].specs[0]).__name__ == "Multiscales"
    node = nodes[0]
    assert [(a["name"], a["type"], a.get("unit")) for a in node.metadata["axes"]] == [
        ("c", "channel", None), ("z", "space", "nanometer"), ("y", "space", "nanometer"), ("x", "space", "nanometer")]
    assert [t[0]["scale"] for t in node.metadata["coordinateTransformations"]] == _scales(pyramid_output)
    assert [d.shape for d in node.data] == [(2, 2, 24, 24), (2, 2, 12, 12), (2, 2, 6, 6)]
    np.testing.assert_array_equal(np.asarray(node.data[0]), read_volume(pyramid_output))


# ---------------------------------------------------------------------------------------------------- voxel size
def test_sample_file_resolution_beats_the_job_files(tmp_path):
    image = _forward(tmp_path, resolution="40,4,4 nm", spec_resolution="0.03,0.006,0.006 um")
    assert _scales(image) == [[1, 0.03, 0.006, 0.006]]
    assert group_attrs(image)["ome"]["multiscales"][0]["axes"][1]["unit"] == "micrometer"


def _ome_zarr_input(folder: Path) -> str:
    raw = read_volume(folder / "train-raw.tif")
    path = create_image(folder / "raw.zarr", "raw", raw.shape, raw.shape, raw.dtype,
                        ImageMeta(Resolution((50.0, 5.0, 5.0), "nanometer")))
    zarr.open_array(f"{path}/0", mode="r+")[...] = raw
    return "raw.zarr/raw"


def _h5_input(folder: Path, key: str, value: list[float]) -> str:
    with h5py.File(folder / "raw.h5", "w") as f:
        f.create_dataset("volumes/raw", data=read_volume(folder / "train-raw.tif")).attrs[key] = value
    return "raw.h5:/volumes/raw"


INPUTS = {  # input kind -> (make it, the scale and unit the output gets)
    "OME-Zarr scale": (_ome_zarr_input, ([1, 50, 5, 5], "nanometer")),
    "h5 resolution (CREMI)": (lambda f: _h5_input(f, "resolution", [40.0, 4.0, 4.0]), ([1, 40, 4, 4], "nanometer")),
    "h5 element_size_um": (lambda f: _h5_input(f, "element_size_um", [0.04, 0.004, 0.004]),
                           ([1, 0.04, 0.004, 0.004], "micrometer")),
}


@pytest.mark.parametrize("kind", INPUTS)
def test_voxel_size_of_the_input_when_no_file_gives_one(tmp_path, kind):
    make, (scale, unit) = INPUTS[kind]
    forward_job(tmp_path)  # the training volume to copy
    image = _forward(tmp_path, raw=make(tmp_path))
    assert _scales(image) == [scale]
    assert group_attrs(image)["ome"]["multiscales"][0]["axes"][3]["unit"] == unit
    validate(group_attrs(image))


def test_without_any_voxel_size_the_scale_is_one_and_valid_only_outputs_are_placed_in_their_input(tmp_path):
    image = _forward(tmp_path, is_bd_mirror="no")
    attrs = group_attrs(image)
    validate(attrs)
    assert "unit" not in attrs["ome"]["multiscales"][0]["axes"][3]
    shape, _ = volume_shape_dtype(image)
    half = [(a - b) // 2 for a, b in zip((2, 24, 24), shape[1:])]  # (fov - 1) // 2: the window's centre
    assert half[1] > 0
    transforms = attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert transforms == [{"type": "scale", "scale": [1, 1, 1, 1]},
                          {"type": "translation", "translation": [0, *half]}]


# ---------------------------------------------------------------------------------------------------- pyramid
def test_a_rerun_that_changes_level_zero_drops_the_pyramid_and_one_with_every_block_done_makes_it(tmp_path, capsys):
    image = _forward(tmp_path, "--pyramid", "1")
    assert (image / "1").is_dir() and len(_scales(image)) == 2
    assert main(["forward", str(tmp_path / "forward.cfg"), "--quiet", "--fresh"]) == 0  # level 0 rewritten
    assert not (image / "1").exists() and len(_scales(image)) == 1
    validate(group_attrs(image))
    job = tmp_path / "forward.cfg"
    job.write_text(job.read_text() + "pyramid = 2\nresolution = 40,4,4 nm\n")  # the job file's keys this time
    capsys.readouterr()
    assert main(["forward", str(job), "--quiet"]) == 0
    assert "18 skipped (already done), 0 run" in capsys.readouterr().out  # no block recomputed
    assert _scales(image) == [[1, 40, 4, 4], [1, 40, 8, 8], [1, 40, 16, 16]]  # this run's voxel size and levels
    validate(group_attrs(image))


# ---------------------------------------------------------------------------------------------------- mistakes
def test_a_bad_resolution_in_the_job_file_is_one_line(tmp_path, capsys):
    job = forward_job(tmp_path, resolution="40,4")
    refused(["forward", str(job)], capsys, "forward.cfg", "resolution", "40,4,4 nm")
    assert not (tmp_path / STORE).exists()


def test_a_bad_resolution_in_the_sample_file_is_one_line(tmp_path, capsys):
    job = forward_job(tmp_path)
    spec = tmp_path / "forward.spec"
    spec.write_text(spec.read_text().replace("[sample1]", "resolution = 4,4,4 parsecs\n\n[sample1]"))
    refused(["forward", str(job)], capsys, "forward.spec", "[image1]", "resolution", "unknown unit 'parsecs'")
    assert not (tmp_path / STORE).exists()


def test_an_h5_export_carries_the_voxel_size_as_h5_readers_spell_it(tmp_path):
    _forward(tmp_path, resolution="0.05,0.004,0.004 um", output_format="h5")
    with h5py.File(tmp_path / "out" / "pred_sample1_output.h5", "r") as f:
        attrs = dict(f["output"].attrs)
    np.testing.assert_allclose(attrs["resolution"], [50, 4, 4], rtol=1e-12)  # nanometers, as CREMI writes them
    np.testing.assert_allclose(attrs["element_size_um"], [0.05, 0.004, 0.004], rtol=1e-12)
    back = volume_resolution(f"{tmp_path / 'out' / 'pred_sample1_output.h5'}:/output")  # read back by znn itself
    assert back is not None and back.unit == "nanometer"
    np.testing.assert_allclose(back.zyx, (50, 4, 4), rtol=1e-12)


def test_a_store_of_the_older_layout_is_recreated_as_ome_zarr(tmp_path, capsys):
    """Stores written before outputs were OME-Zarr hold a plain array per node: a rerun recomputes it as an image."""
    image = _forward(tmp_path)
    level0 = read_volume(image)
    zarr.open_group(str(image.parent), mode="a").create_array("output", data=level0, chunks=(2, 1, 8, 8),
                                                              overwrite=True)
    assert json.loads((image / "zarr.json").read_text())["node_type"] == "array"
    np.testing.assert_array_equal(read_volume(image), level0)  # the plain array reads as before
    capsys.readouterr()
    assert main(["forward", str(tmp_path / "forward.cfg"), "--quiet"]) == 0
    assert "0 skipped (already done), 18 run" in capsys.readouterr().out
    validate(group_attrs(image))
    np.testing.assert_array_equal(read_volume(image), level0)
