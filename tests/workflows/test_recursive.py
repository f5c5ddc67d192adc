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
        # fixed conv modes: timing the layers of 8x8 patches for optimize would cost more than the steps
        text = text.replace("train_conv_mode = optimize", "train_conv_mode = fft")
        cfg.write_text(text.replace("forward_outsz = auto", "forward_outsz = 1,32,32"))
    for plan in folder.glob("*.yaml"):
        plan.write_text(plan.read_text().replace("minutes: 12", "max_iter: 3").replace("minutes: 18", "max_iter: 3")
                        .replace("minutes: 30", "max_iter: 3").replace("minutes: 6", "max_iter: 3"))
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


def _check_cross_prediction(folder: Path, plan: str, out: Path, prefix: str, spec: str, halves: tuple[str, str],
                            shape: tuple[int, ...], scores: tuple[str, ...], seg_shape: tuple[int, ...]) -> None:
    """Run a cross-prediction workflow: two stage-1 networks (``prefix`` 1a and 1b) predict the whole volume, and
    stage 2 trains on both halves (samples 1 and 4), each read with the other network's prediction (``halves``:
    b's of the first half, a's of the second, as ``spec`` names them); its segmentation and scores are written."""
    lines: list[str] = []
    summary = run_workflow(folder / plan, progress=False, log=lines.append)
    assert summary.ok, "\n".join(lines)
    a = read_volume(out / f"{prefix}1a_pred_sample3_output.zarr" / "output")
    b = read_volume(out / f"{prefix}1b_pred_sample3_output.zarr" / "output")
    assert a.shape == b.shape == shape and not np.array_equal(a, b)  # two networks
    text = (folder / spec).read_text()
    assert f"{prefix}1b_pred_sample3_output.zarr/output[{halves[0]}]" in text
    assert f"{prefix}1a_pred_sample3_output.zarr/output[{halves[1]}]" in text
    assert any("samples: train 1, 4 (" in line for line in lines), "\n".join(lines)  # both halves
    assert read_volume(out / f"{prefix}2_seg.zarr" / "labels").shape == seg_shape
    for name in scores:
        assert 0.0 <= json.loads((out / f"{name}.json").read_text())["rand_error"] <= 1.0, name
    assert not (folder / "out").exists()


def test_cross_prediction_trains_stage_two_on_predictions_of_slices_stage_one_never_saw(tmp_path):
    """cross.yaml: two stage-1 networks, on slices 0-4 and 5-9, predict the stack; stage 2 trains on both
    halves, each read with the other network's prediction; 15-19 segmented and scored."""
    folder = _tiny_checkout(tmp_path).parent
    _check_cross_prediction(folder, "cross.yaml", tmp_path / "out" / "cross", "isbi", "isbi_cross2.spec",
                            ("0:5", "5:10"), (2, 20, 96, 96), ("scores_stage1a", "scores_stage2", "scores_stage2_map"),
                            (5, 96, 96))


def _tiny_fib_checkout(root: Path) -> Path:
    """workflows/recursive and ../fib-affinity's network, as in the checkout; fib-affinity/data/ a synthetic
    stand-in for gala-fib (50 sections, as the shipped section ranges need, of 24 x 24)."""
    folder = root / "workflows" / "recursive"
    shutil.copytree(SHIPPED / "recursive", folder)
    fib = root / "workflows" / "fib-affinity"
    (fib / "data").mkdir(parents=True)
    shutil.copy(SHIPPED / "fib-affinity" / "fib_affinity.znn", fib)
    raw, seg = synthetic_em((50, 24, 24), 3, EMStyle(cell_size=8.0, cells="3d"))
    write_volume(fib / "data" / "train-image.h5", raw)
    write_volume(fib / "data" / "train-gt.lzf.h5", seg.astype(np.int32))
    for cfg in folder.glob("fib_*.cfg"):  # small patches: the net's FOV is 17, a section range is 12 to 25 deep
        cfg.write_text(cfg.read_text().replace("8,32,32", "2,2,2").replace("forward_outsz = auto",
                                                                           "forward_outsz = 4,8,8"))
    for plan in folder.glob("fib_*.yaml"):
        plan.write_text(plan.read_text().replace("minutes: 12", "max_iter: 2").replace("minutes: 18", "max_iter: 2")
                        .replace("minutes: 30", "max_iter: 2").replace("minutes: 6", "max_iter: 2"))
    return folder


def test_the_fib_workflows_run_both_stages_and_the_baseline_and_score_the_reported_sections(tmp_path):
    """fib_workflow.yaml (stage 1 affinities of the whole volume as stage 2's input-r, seed chosen on sections
    25-37, 38-49 scored) and fib_one_stage.yaml (stage 1 alone, its own folder), as shipped, on a tiny volume."""
    folder = _tiny_fib_checkout(tmp_path)
    for plan in ("fib_workflow.yaml", "fib_one_stage.yaml"):
        lines: list[str] = []
        summary = run_workflow(folder / plan, progress=False, log=lines.append)
        assert summary.ok, "\n".join(lines)
        # each training step says what memory it will need (znn.pipeline.graph.memory)
        assert any("one step: about" in line and "of arrays at its peak (predicted" in line for line in lines)
    out = tmp_path / "out" / "recursive-fib"
    stage1 = read_volume(out / "fib1_pred_sample3_output.zarr" / "output")
    assert stage1.shape == (3, 50, 24, 24) and np.isfinite(stage1).all()  # the whole volume: stage 2's input-r
    assert read_volume(out / "fib2_pred_sample3_output.zarr" / "output").shape == (3, 50, 24, 24)
    assert read_volume(out / "fib2_seg.zarr" / "labels").shape == (12, 24, 24)  # sections 38-49
    for scores in ("recursive-fib/scores_stage1", "recursive-fib/scores_stage2", "recursive-fib/scores_stage2_defaults",
                   "one-stage-fib/scores_segmentation", "one-stage-fib/scores_defaults"):
        assert 0.0 <= json.loads((tmp_path / "out" / f"{scores}.json").read_text())["rand_error"] <= 1.0, scores
    assert read_volume(tmp_path / "out" / "one-stage-fib" / "fib1_seg.zarr" / "labels").shape == (12, 24, 24)
    assert (tmp_path / "out" / "one-stage-fib" / "fib1_net_current.h5").exists()  # its own checkpoints
    assert not (folder / "out").exists()


def test_fib_cross_prediction_trains_stage_two_on_affinities_of_sections_stage_one_never_saw(tmp_path):
    """fib_cross.yaml: two stage-1 networks, on sections 0-12 and 13-24, predict the volume; stage 2 trains on both
    halves, each read with the other network's affinities; 38-49 segmented and scored."""
    folder = _tiny_fib_checkout(tmp_path)
    _check_cross_prediction(folder, "fib_cross.yaml", tmp_path / "out" / "cross-fib", "fib", "fib_cross2.spec",
                            ("0:13", "13:25"), (3, 50, 24, 24),
                            ("scores_stage1a", "scores_stage2", "scores_stage2_defaults"), (12, 24, 24))


def test_every_shipped_workflow_file_loads(tmp_path):
    """Every workflow under workflows/ reads and checks (keys, fan-outs, job files and their `set:` keys), the
    ablation and MALIS workflows included, which no smoke test runs (their steps are the kinds the runs above take)."""
    from znn.pipeline.jobs.workflow import load_workflow

    plans = sorted(SHIPPED.rglob("*.yaml"))
    plans = [p for p in plans if "steps:" in p.read_text()]
    assert any(p.name == "ablations.yaml" for p in plans)
    for plan in plans:
        steps = load_workflow(plan).steps
        assert steps, plan
    ablations = load_workflow(SHIPPED / "recursive" / "ablations.yaml").steps
    variants = {ablations[f"train[{i}]"].options["set"]["train_net_prefix"].rsplit("/", 2)[1] for i in range(5)}
    assert len(variants) == 5  # each variant writes its own folder
    assert load_workflow(SHIPPED / "recursive" / "fib_malis.yaml").steps["train"].job.is_malis
