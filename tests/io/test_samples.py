"""Loading `.spec` samples: channels, preprocessing, label targets, masks, auto crop, errors; real data if present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.shared import DATA, need
from znn.errors import ShapeError, SpecFileError, ZnnFileNotFoundError
from znn.io.samples import center_crop, load_sample, make_sample
from znn.io.specfile import load_spec
from znn.io.volume import write_volume
from znn.ops.preprocess import affinity, affinity_mask, binary_class, preprocess_image


def spec_file(tmp: Path, text: str) -> Path:
    path = tmp / "data.spec"
    path.write_text(text)
    return path


@pytest.fixture
def volumes(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (3, 10, 12)).astype(np.uint8)
    raw2 = rng.integers(0, 100, (3, 10, 12)).astype(np.uint16)
    seg = rng.integers(0, 4, (3, 10, 12)).astype(np.int32)
    write_volume(tmp_path / "raw.tif", raw)
    write_volume(tmp_path / "raw2.h5", raw2)
    write_volume(tmp_path / "seg.tif", seg)
    return tmp_path, raw, raw2, seg


def test_boundary_sample(volumes):
    tmp, raw, _, seg = volumes
    spec = load_spec(spec_file(tmp, """
[image1]
fnames = raw.tif
pp_types = standard2D
[label1]
fnames = seg.tif
pp_types = auto
[sample1]
input = 1
output = 1
"""))
    data = load_sample(spec, 1, "boundary")
    assert data.shape == (3, 10, 12) and data.has_outputs
    assert data.inputs[0].shape == (1, 3, 10, 12) and data.inputs[0].dtype == np.float32
    np.testing.assert_allclose(data.inputs[0][0], preprocess_image(raw, "standard2D"), rtol=1e-6)
    np.testing.assert_array_equal(data.targets[0], binary_class(seg))
    assert data.masks[0].shape == (1, 3, 10, 12) and np.all(data.masks[0] == 1)
    np.testing.assert_array_equal(data.labels[0], seg)
    assert data.voxel_masks == [None] and data.label_pp == ["binary_class"]
    assert load_sample(spec, 1, "boundary", "float64").targets[0].dtype == np.float64


def test_several_files_are_channels_in_order(volumes):
    tmp, raw, raw2, seg = volumes
    spec = load_spec(spec_file(tmp, """
[image1]
fnames = raw.tif,
         raw2.h5
pp_types = none, symetric_rescale
[image2]
fnames = raw2.h5
[label1]
fnames = seg.tif
pp_types = affinity
[sample1]
input1 = 2
input2 = 1
output = 1
"""))
    data = load_sample(spec, 1, "boundary")
    assert [x.shape[0] for x in data.inputs] == [1, 2]
    np.testing.assert_array_equal(data.inputs[0][0], raw2)
    np.testing.assert_array_equal(data.inputs[1][0], raw)
    np.testing.assert_allclose(data.inputs[1][1], preprocess_image(raw2, "symetric_rescale"))
    np.testing.assert_array_equal(data.targets[0], affinity(seg))
    np.testing.assert_array_equal(data.masks[0], affinity_mask(np.ones(seg.shape)))


def test_masks_combine_fmasks_and_mask_sections(volumes):
    tmp, raw, _, seg = volumes
    rng = np.random.default_rng(5)
    m1, m2 = rng.random(seg.shape) > 0.3, rng.random(seg.shape) > 0.3
    write_volume(tmp / "m1.tif", m1.astype(np.uint8) * 7)
    write_volume(tmp / "m2.h5", m2.astype(np.uint8))
    spec = load_spec(spec_file(tmp, """
[image1]
fnames = raw.tif
[label1]
fnames = seg.tif
pp_types = auto
fmasks = m1.tif
[mask1]
fnames = m2.h5
[sample1]
input = 1
output = 1
mask = 1
"""))
    data = load_sample(spec, 1, "affinity")
    np.testing.assert_array_equal(data.voxel_masks[0], m1 & m2)
    np.testing.assert_array_equal(data.masks[0], affinity_mask(m1 & m2))
    boundary = load_sample(spec, 1, "boundary")
    np.testing.assert_array_equal(boundary.masks[0][0], m1 & m2)


def test_2d_images_are_one_slice(tmp_path):
    img = np.arange(20, dtype=np.uint8).reshape(4, 5)
    write_volume(tmp_path / "img.tif", img)
    write_volume(tmp_path / "lbl.tif", (img % 3 == 0).astype(np.uint8) * 255)
    spec = load_spec(spec_file(tmp_path, "[image1]\nfnames = img.tif\n[label1]\nfnames = lbl.tif\npp_types = "
                                         "binary_class\n[sample1]\ninput = 1\noutput = 1\n"))
    data = load_sample(spec, 1)
    assert data.inputs[0].shape == (1, 1, 4, 5) and data.targets[0].shape == (2, 1, 4, 5)
    assert data.labels[0].shape == (1, 4, 5)


def test_auto_crop_is_central_like_znn(tmp_path):
    big = np.arange(5 * 10 * 12).reshape(5, 10, 12).astype(np.float32)
    write_volume(tmp_path / "big.tif", big)
    write_volume(tmp_path / "small.tif", np.ones((4, 8, 9), dtype=np.uint8))
    spec = load_spec(spec_file(tmp_path, "[image1]\nfnames = big.tif\n[label1]\nfnames = small.tif\n"
                                         "[sample1]\ninput = 1\noutput = 1\n"))
    data = load_sample(spec, 1)
    assert data.shape == (4, 8, 9)
    # excess 1, 2, 3: the odd voxel goes at the start (ZNN's _center_crop)
    np.testing.assert_array_equal(data.inputs[0][0], big[1:5, 1:9, 2:11])
    np.testing.assert_array_equal(center_crop(np.arange(5), (2,)), [2, 3])


def test_auto_crop_no_reports_sections(tmp_path):
    write_volume(tmp_path / "a.tif", np.zeros((2, 6, 6), dtype=np.uint8))
    write_volume(tmp_path / "b.tif", np.zeros((2, 5, 6), dtype=np.uint8))
    spec = load_spec(spec_file(tmp_path, "[image1]\nfnames = a.tif\nis_auto_crop = no\n[label1]\nfnames = b.tif\n"
                                         "[sample1]\ninput = 1\noutput = 1\n"))
    with pytest.raises(SpecFileError, match=r"\[sample1\].*is_auto_crop.*\[image1\].*\(2, 6, 6\).*\[label1\]"):
        load_sample(spec, 1)


def test_missing_file_names_the_section(tmp_path):
    write_volume(tmp_path / "a.tif", np.zeros((2, 6, 6), dtype=np.uint8))
    spec = load_spec(spec_file(tmp_path, "[image1]\nfnames = a.tif\n[label3]\nfnames = gone.tif\n"
                                         "[sample1]\ninput = 1\noutput = 3\n"))
    with pytest.raises(ZnnFileNotFoundError, match=r"\[label3\] fnames: .*gone.tif does not exist"):
        load_sample(spec, 1)


def test_label_errors(volumes):
    tmp, _, _, seg = volumes
    write_volume(tmp / "frac.tif", seg.astype(np.float32) + 0.5)
    spec = load_spec(spec_file(tmp, """
[image1]
fnames = raw.tif
[label1]
fnames = seg.tif, seg.tif
pp_types = binary_class
[label2]
fnames = frac.tif
pp_types = affinity
[label3]
fnames = seg.tif, seg.tif
pp_types = none
[sample1]
input = 1
output = 1
[sample2]
input = 1
output = 2
[sample3]
input = 1
output = 3
[sample4]
input = 1
"""))
    with pytest.raises(SpecFileError, match=r"\[label1\] fnames: pp_types binary_class needs one"):
        load_sample(spec, 1)
    with pytest.raises(SpecFileError, match=r"\[label2\] fnames: .*whole-number"):
        load_sample(spec, 2)
    assert load_sample(spec, 3).targets[0].shape == (2, 3, 10, 12)
    inference_only = load_sample(spec, 4)
    assert not inference_only.has_outputs and inference_only.targets == []


def test_make_sample():
    seg = np.random.default_rng(0).integers(0, 3, (2, 5, 6))
    data = make_sample([seg.astype(np.float32)], [seg], out_type="affinity", masks=[seg > 0])
    assert data.inputs[0].shape == (1, 2, 5, 6) and data.label_pp == ["affinity"]
    np.testing.assert_array_equal(data.masks[0], affinity_mask(seg > 0))
    with pytest.raises(ShapeError, match="share one"):
        make_sample([np.zeros((2, 5, 6))], [np.zeros((2, 5, 5))])


def test_isbi_sample_if_present(tmp_path):
    isbi = need(DATA / "isbi2012")
    spec = load_spec(spec_file(tmp_path, f"""
[image1]
fnames = {isbi / 'train-volume.tif'}
pp_types = standard2D
[label1]
fnames = {isbi / 'train-labels.tif'}
pp_types = auto
[sample1]
input = 1
output = 1
"""))
    data = load_sample(spec, 1, "boundary")
    assert data.shape == (20, 512, 512)
    np.testing.assert_allclose(data.inputs[0][0].mean(axis=(1, 2)), 0, atol=1e-4)
    boundary = data.targets[0][1]
    assert 0.1 < boundary.mean() < 0.4  # membranes are a minority


def test_fib_affinity_sample_if_present(tmp_path):
    fib = need(DATA / "gala-fib")
    spec = load_spec(spec_file(tmp_path, f"""
[image1]
fnames = {fib / 'train-image.h5'}:/stack
pp_types = standard3D
[label1]
fnames = {fib / 'train-gt.lzf.h5'}:/stack
pp_types = auto
[sample1]
input = 1
output = 1
"""))
    data = load_sample(spec, 1, "affinity")
    assert data.shape == (50, 100, 200) and data.targets[0].shape == (3, 50, 100, 200)
    assert 0.5 < data.targets[0][:, 1:, 1:, 1:].mean() < 1
