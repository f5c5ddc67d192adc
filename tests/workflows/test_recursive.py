"""Smoke test of workflows/recursive (ZNN's recursive 2D-3D recipe): the workflow as shipped, on a tiny synthetic
stand-in for ISBI 2012 (20 slices of 96 x 96), a few iterations per stage and small patches; every step runs,
stage 2 reads stage 1's prediction as its second input, and the scores are written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from tests.shared import ROOT
from znn.io.volume import read_volume, write_volume
from znn.pipeline.jobs.run_workflow import run_workflow
from znn.pipeline.jobs.synthetic import EMStyle, boundary_labels, synthetic_em

SHIPPED = ROOT / "workflows"


def _tiny_checkout(root: Path) -> Path:
    """workflows/recursive and the ISBI network beside it, as in the checkout; data/ a synthetic stack."""
    shutil.copytree(SHIPPED / "recursive", root / "workflows" / "recursive")
    isbi = root / "workflows" / "isbi2012"
    (isbi / "data").mkdir(parents=True)
    shutil.copy(SHIPPED / "isbi2012" / "N4_lite.znn", isbi)
    raw, seg = synthetic_em((20, 96, 96), 5, EMStyle(cell_size=10.0, cells="columns"))
    write_volume(isbi / "data" / "train-volume.tif", raw)
    write_volume(isbi / "data" / "train-labels.tif", boundary_labels(seg))
    folder = root / "workflows" / "recursive"
    for cfg in folder.glob("*.cfg"):  # small patches: the shipped 1,100,100 and 3,100,100 need 194 pixels
        text = cfg.read_text().replace("1,100,100", "1,8,8").replace("3,100,100", "3,8,8")
        cfg.write_text(text.replace("forward_outsz = auto", "forward_outsz = 1,32,32"))
    for plan in folder.glob("*.yaml"):
        plan.write_text(plan.read_text().replace("minutes: 12", "max_iter: 3").replace("minutes: 18", "max_iter: 3")
                        .replace("minutes: 30", "max_iter: 3"))
    return folder / "workflow.yaml"


def test_the_recursive_workflow_runs_both_stages_and_scores_the_reported_slices(tmp_path):
    plan = _tiny_checkout(tmp_path)
    lines: list[str] = []
    summary = run_workflow(plan, progress=False, log=lines.append)
    print("\n".join(lines))  # pytest -s shows the steps
    assert summary.ok, "\n".join(lines)
    out = tmp_path / "out" / "recursive"
    stage1 = read_volume(out / "isbi1_pred_sample3_output.zarr" / "output")
    assert stage1.shape == (2, 20, 96, 96)  # the whole stack: stage 2's input-r
    for sample, slices in ((2, 5), (3, 5)):
        assert read_volume(out / f"isbi2_pred_sample{sample}_output.zarr" / "output").shape == (2, slices, 96, 96)
    assert read_volume(out / "isbi2_seg.zarr" / "labels").shape == (5, 96, 96)
    for name in ("scores_stage1", "scores_stage2", "scores_stage2_map"):
        scores = json.loads((out / f"{name}.json").read_text())
        assert 0.0 <= scores["rand_error"] <= 1.0, name
    assert "pixel_error" in json.loads((out / "scores_stage2_map.json").read_text())
    assert np.isfinite(stage1).all()


def test_the_one_stage_baseline_runs_and_scores_the_same_slices(tmp_path, monkeypatch):
    """one_stage.yaml: stage 1 alone for the whole budget, seed chosen on 10-14, 15-19 scored, in its own folder;
    named by a relative path, as `znn run workflows/recursive/one_stage.yaml` does (its `set:` paths are relative
    to the workflow's folder, not applied twice)."""
    _tiny_checkout(tmp_path)
    monkeypatch.chdir(tmp_path)
    lines: list[str] = []
    summary = run_workflow(Path("workflows/recursive/one_stage.yaml"), progress=False, log=lines.append)
    assert summary.ok, "\n".join(lines)
    out = tmp_path / "out" / "one-stage"
    assert read_volume(out / "isbi1_seg.zarr" / "labels").shape == (5, 96, 96)
    assert 0.0 <= json.loads((out / "scores_segmentation.json").read_text())["rand_error"] <= 1.0
    assert "pixel_error" in json.loads((out / "scores_map.json").read_text())
    assert (out / "isbi1_net_current.h5").exists()
    assert not (tmp_path / "out" / "recursive").exists()  # the recursive run's checkpoints are not touched
    assert not (tmp_path / "workflows" / "recursive" / "out").exists()
