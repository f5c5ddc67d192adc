"""The store `znn segment` writes: an OME-Zarr image holding its label image where NGFF readers look for labels
(ome-zarr-py's reader, the one napari uses, finds it as the label layer of its image), with the prediction's
voxel size and translation, on request a pyramid of most frequent ids, nothing in it that zarr does not know, older
stores still read, and a failure's message as the only line on stderr."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from tests.ops.test_segment import boundary_map, cells
from znn.cli import main
from znn.io.ngff import ImageMeta, Resolution, create_image
from znn.io.stores import write_region
from znn.io.volume import read_volume, volume_resolution
from znn.ops.downsample import downsample
from znn.pipeline.dense.manifest import MANIFEST_DIR

SEGMENT = ["--block", "1,16,16", "--halo", "0,8,8", "--seed-threshold", "0.3", "--scheduler", "synchronous"]


def attrs_of(path: Path) -> dict[str, Any]:
    return dict(json.loads((path / "zarr.json").read_text())["attributes"])


def prediction(tmp_path: Path, origin: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> str:
    """A (1, 2, 32, 32) boundary map of synthetic cells as an OME-Zarr image of voxel size 40,4,4 nm whose voxel 0
    lies at ``origin`` (voxels), as a valid-only `znn forward` writes it; returns its volume path."""
    values = boundary_map(cells((2, 32, 32), 8, 0, flat=True), 0, True)[None]
    store = tmp_path / "pred.zarr"
    path = create_image(store, "output", values.shape, values.shape, "float32",
                        ImageMeta(Resolution((40.0, 4.0, 4.0), "nanometer"), origin))
    write_region(store, "output", (slice(None),) * 4, values)
    return path


def segmented(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str, pred: str | None = None) -> Path:
    store = tmp_path / "seg.zarr"
    assert main(["segment", pred or prediction(tmp_path), str(store), *SEGMENT, "--quiet", *extra]) == 0
    capsys.readouterr()
    return store


def test_ome_zarr_reads_the_segmentation_as_the_label_layer_of_its_image(tmp_path, capsys):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Labels, Multiscales, Reader

    store = segmented(tmp_path, capsys)
    image, labels, label = list(Reader(parse_url(str(store)))())
    assert image.load(Multiscales) and not image.load(Label)
    assert labels.load(Labels) and labels.root is image  # image/labels, found from the image
    assert label.load(Label) and label.root is labels and label.zarr.path.endswith("seg.zarr/labels/segmentation")
    ids = read_volume(store / "labels" / "segmentation")
    assert ids.dtype == np.uint64 and len(np.unique(ids)) > 4
    np.testing.assert_array_equal(np.asarray(label.data[0]), ids)
    assert attrs_of(store / "labels")["ome"]["labels"] == ["segmentation"]
    for path in (store, store / "labels"):  # every path a reader may be given means the label volume
        np.testing.assert_array_equal(read_volume(path), ids)


def test_the_label_image_takes_the_predictions_translation(tmp_path, capsys):
    pred = prediction(tmp_path, origin=(2.0, 3.0, 3.0))
    shift = attrs_of(Path(pred))["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][1]
    assert shift["translation"] == [0.0, 80.0, 12.0, 12.0]  # (c, z, y, x)
    for given, want in ((pred, [80.0, 12.0, 12.0]), (pred + "[1:2]", [120.0, 12.0, 12.0])):  # a z range starts later
        store = segmented(tmp_path, capsys, pred=given)
        for image in (store / "labels" / "segmentation", store):
            level0 = attrs_of(image)["ome"]["multiscales"][0]["datasets"][0]
            assert level0["coordinateTransformations"] == [{"type": "scale", "scale": [40.0, 4.0, 4.0]},
                                                           {"type": "translation", "translation": want}]


def test_pyramid_levels_are_the_most_frequent_id_of_each_window(tmp_path, capsys):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    store = segmented(tmp_path, capsys, "--pyramid", "1")
    label = store / "labels" / "segmentation"
    ids = read_volume(label / "0")
    # 40x4x4 nm voxels: y and x are halved, z stays
    np.testing.assert_array_equal(read_volume(label / "1"), downsample(ids, (1, 2, 2), "mode"))
    scales = attrs_of(label)["ome"]["multiscales"][0]
    assert scales["type"] == "mode" and [d["path"] for d in scales["datasets"]] == ["0", "1"]
    assert [d["path"] for d in attrs_of(store)["ome"]["multiscales"][0]["datasets"]] == \
        ["labels/segmentation/0", "labels/segmentation/1"]
    found = next(n for n in Reader(parse_url(str(store)))() if n.load(Label))
    assert [tuple(d.shape) for d in found.data] == [(2, 32, 32), (2, 16, 16)]
    assert main(["segment", prediction(tmp_path), str(store), *SEGMENT, "--quiet"]) == 0  # a rerun without it
    assert not (label / "1").exists() and len(attrs_of(store)["ome"]["multiscales"][0]["datasets"]) == 1


def test_opening_the_store_meets_nothing_zarr_does_not_know(tmp_path, capsys):
    store = segmented(tmp_path, capsys)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zarr: "Object at znn-manifest is not recognized as a component ..."
        members = dict(zarr.open_group(str(store), mode="r").members(max_depth=None))
        assert sorted(members) == ["labels", "labels/segmentation", "labels/segmentation/0"]
        assert read_volume(store).shape == (2, 32, 32)
        assert volume_resolution(store) == Resolution((40.0, 4.0, 4.0), "nanometer")
    assert (tmp_path / "seg.zarr.resume" / MANIFEST_DIR / "run.json").is_file()  # the resume state, beside it


def test_a_store_of_the_older_layout_still_reads_and_is_rewritten(tmp_path, capsys):
    """Before: ``seg.zarr/labels`` was the label image itself, the manifest inside the store."""
    old = tmp_path / "seg.zarr"
    ids = np.arange(2 * 32 * 32, dtype=np.uint64).reshape(2, 32, 32)
    create_image(old, "labels", ids.shape, (1, 16, 16), "uint64", ImageMeta(labels=True))
    write_region(old, "labels", (slice(None),) * 3, ids)
    (old / MANIFEST_DIR / "slabs").mkdir(parents=True)
    for path in (old, old / "labels"):
        np.testing.assert_array_equal(read_volume(path), ids)
    store = segmented(tmp_path, capsys)
    assert not (store / MANIFEST_DIR).exists() and sorted(p.name for p in (store / "labels").iterdir()) == \
        ["segmentation", "zarr.json"]
    assert main(["segment", str(tmp_path / "pred.zarr"), str(tmp_path / "new.zarr"), *SEGMENT, "--quiet"]) == 0
    np.testing.assert_array_equal(read_volume(store), read_volume(tmp_path / "new.zarr"))


@pytest.mark.parametrize("quiet", [False, True])
def test_a_failure_is_the_only_line_on_stderr(tmp_path, capsys, quiet):
    """Progress and notes go to stdout (none with --quiet): the error is stderr's one line, exit status 2."""
    pred = prediction(tmp_path)
    values = read_volume(pred)
    values[0, 1, 30, 30] = np.nan  # in the last block: blocks before it report progress first
    write_region(tmp_path / "pred.zarr", "output", (slice(None),) * 4, values)
    assert main(["segment", pred, str(tmp_path / "seg.zarr"), *SEGMENT, *(["--quiet"] if quiet else [])]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("znn segment: error: ") and "NaN" in lines[0], err
    assert "check the run that wrote it" in lines[0]
    assert (out == "") if quiet else ("blocks" in out), out
