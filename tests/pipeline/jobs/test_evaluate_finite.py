"""`znn evaluate` refuses a prediction (or labels, or mask) holding NaN or infinity instead of scoring it."""

from __future__ import annotations

import numpy as np
import pytest

from znn.cli import main
from znn.errors import VolumeError
from znn.io.volume import write_volume
from znn.pipeline.jobs.evaluate import EvaluateRequest, evaluate_files


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    write_volume(tmp_path / "labels.tif", rng.integers(0, 4, (3, 10, 10)).astype(np.uint16))
    write_volume(tmp_path / "pred.tif", rng.random((3, 10, 10)).astype(np.float32))
    write_volume(tmp_path / "mask.h5", np.ones((3, 10, 10), np.float32))
    return tmp_path


@pytest.mark.parametrize("which", ["pred", "mask"])
def test_a_nan_volume_is_refused_naming_the_file_and_the_first_voxel(files, which):
    name = {"pred": "pred.tif", "mask": "mask.h5"}[which]
    request = EvaluateRequest(str(files / "pred.tif"), str(files / "labels.tif"), mask=str(files / "mask.h5"))
    evaluate_files(request)  # finite: scored
    bad = np.ones((3, 10, 10), np.float32) / 2
    bad[1, 2, 3] = np.nan
    write_volume(files / name, bad, overwrite=True)
    with pytest.raises(VolumeError, match=rf"{name}: the {'prediction' if which == 'pred' else 'mask'} holds 1 NaN "
                                          r"or infinite value, the first \(nan\) at z 1, y 2, x 3"):
        evaluate_files(request)


def test_an_all_nan_prediction_is_not_scored_by_the_cli(files, capsys):
    write_volume(files / "pred.tif", np.full((3, 10, 10), np.nan, np.float32), overwrite=True)
    assert main(["evaluate", str(files / "pred.tif"), str(files / "labels.tif"), "--json",
                 str(files / "out.json")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert "pred.tif" in captured.err and "300 NaN or infinite values" in captured.err
    assert not (files / "out.json").exists()
