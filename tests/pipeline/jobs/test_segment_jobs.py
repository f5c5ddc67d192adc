"""`znn evaluate` scoring a segmentation and segmenting a prediction by `znn segment`'s method (both reported), and
the workflow step ``segment`` feeding an ``evaluate`` step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.ops.test_segment import boundary_map, cells, edges
from znn.cli import main
from znn.errors import WorkflowError
from znn.io.volume import read_volume, write_volume
from znn.pipeline.jobs.evaluate import EvaluateRequest, evaluate_files
from znn.pipeline.jobs.run_workflow import run_workflow
from znn.pipeline.jobs.workflow import load_workflow


def volumes(folder: Path) -> tuple[Path, Path]:
    """A 2-channel boundary prediction of synthetic cells (ZNN's binary_class order) with gaps in its membranes,
    and the cells' labels (0 on their boundaries)."""
    labels = cells((3, 64, 64), 12, 5, flat=True)
    prob = boundary_map(labels, 5, True)
    prob[:, ::7, :] *= 0.3  # gaps: a threshold at 0.5 merges cells through them, the seeds do not
    folder.mkdir(parents=True, exist_ok=True)
    write_volume(folder / "pred.zarr", np.stack([1 - prob, prob]))
    write_volume(folder / "labels.tif", np.where(edges(labels, True), 0, labels).astype(np.uint16))
    return folder / "pred.zarr", folder / "labels.tif"


def test_evaluate_segments_by_watershed_beside_the_threshold_and_scores_segmentations(tmp_path, capsys):
    pred, labels = volumes(tmp_path)
    assert main(["evaluate", str(pred), str(labels), "--segment", "watershed", "--seed-threshold", "0.3",
                 "--json", str(tmp_path / "scores.json")]) == 0
    out = capsys.readouterr().out
    assert "threshold 0.5 / watershed (seed threshold 0.3, min size 30, sigma 1)" in out
    assert out.splitlines()[1].split() == ["metric", "threshold", "watershed"]
    record = json.loads((tmp_path / "scores.json").read_text())
    assert record["watershed"]["seed_threshold"] == 0.3 and record["watershed"]["dims"] == "2d"
    assert record["watershed"]["rand_error"] < 0.5 * record["rand_error"]  # the gaps merge thresholded cells
    assert main(["segment", str(pred), str(tmp_path / "seg.zarr"), "--seed-threshold", "0.3", "--block", "3,32,32",
                 "--halo", "0,24,24", "--quiet"]) == 0
    capsys.readouterr()
    report = evaluate_files(EvaluateRequest(str(tmp_path / "seg.zarr/labels"), str(labels), "segmentation"))
    assert "pixel_error" not in report.scores and report.heading.endswith("segmentation, 2d, 3x64x64 voxels")
    assert report.scores == pytest.approx({k: v for k, v in record["watershed"].items() if k in report.scores})


def test_evaluate_refuses_a_multichannel_segmentation_and_unknown_settings(tmp_path, capsys):
    pred, labels = volumes(tmp_path)
    assert main(["evaluate", str(pred), str(labels), "--type", "segmentation"]) == 2
    assert "a segmentation is one (Z, Y, X) volume of ids" in capsys.readouterr().err
    with pytest.raises(WorkflowError, match="unknown key 'seed_treshold' for a segment step; did you mean "
                                            "'seed_threshold'"):
        (tmp_path / "bad.yaml").write_text("steps:\n  s: {run: segment, pred: pred.zarr, out: seg.zarr, "
                                           "seed_treshold: 0.1}\n")
        load_workflow(tmp_path / "bad.yaml")


WORKFLOW = """\
steps:
  segment:
    run: segment
    pred: pred.zarr
    out: seg.zarr
    seed_threshold: 0.3
    block: 3,32,32
    halo: [0, 24, 24]
  evaluate:
    run: evaluate
    needs: [segment]
    pred: seg.zarr/labels
    type: segmentation
    labels: labels.tif
    out: scores.json
  compare:
    run: evaluate
    pred: pred.zarr
    labels: labels.tif
    segment: watershed
    seed_threshold: 0.3
    out: compare.json
"""


def test_a_segment_step_feeds_an_evaluate_step_and_a_rerun_skips_it(tmp_path):
    volumes(tmp_path)
    (tmp_path / "workflow.yaml").write_text(WORKFLOW)
    summary = run_workflow(tmp_path / "workflow.yaml", progress=False, log=lambda _: None)
    assert summary.ok and summary.done == ["segment", "compare", "evaluate"]
    assert read_volume(tmp_path / "seg.zarr/labels").dtype == np.uint64
    scores = json.loads((tmp_path / "scores.json").read_text())
    compare = json.loads((tmp_path / "compare.json").read_text())
    assert scores["rand_error"] == pytest.approx(compare["watershed"]["rand_error"])
    again = run_workflow(tmp_path / "workflow.yaml", progress=False, log=lambda _: None)
    assert again.skipped == ["segment", "compare", "evaluate"]


def test_a_segment_step_writing_over_its_prediction_is_refused_on_loading(tmp_path):
    (tmp_path / "workflow.yaml").write_text("steps:\n  s: {run: segment, pred: pred.zarr/output, out: pred.zarr}\n")
    with pytest.raises(Exception, match="would write over pred"):
        load_workflow(tmp_path / "workflow.yaml")


def test_the_label_volume_is_an_ome_zarr_label_image_with_the_predictions_voxel_size(tmp_path, capsys):
    """`znn segment` writes an NGFF 0.5 label image (official image and label schemas), with the prediction's voxel
    size and the method and prediction that made it; ome-zarr-py reads it."""
    from tests.io.test_ngff import group_attrs, validate
    from znn.io.ngff import ImageMeta, Resolution, create_image
    from znn.io.stores import write_region

    pred, _ = volumes(tmp_path)
    values = read_volume(str(pred))
    image = create_image(tmp_path / "res.zarr", "output", values.shape, values.shape, "float32",
                         ImageMeta(Resolution((40.0, 4.0, 4.0), "nanometer")))
    write_region(tmp_path / "res.zarr", "output", (slice(None),) * 4, values)
    assert main(["segment", image, str(tmp_path / "seg.zarr"), "--block", "3,32,32", "--halo", "0,24,24",
                 "--quiet"]) == 0
    capsys.readouterr()
    attrs = group_attrs(tmp_path / "seg.zarr" / "labels" / "segmentation")
    validate(attrs)
    validate(attrs, model="label", strict=False)  # strict asks for a colour per id, which a segmentation has not
    validate(group_attrs(tmp_path / "seg.zarr"))  # the store is an image, whose levels are the label image's
    scale = attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == [40.0, 4.0, 4.0] and "image-label" in attrs["ome"]
    assert attrs["znn"]["prediction"].endswith("res.zarr/output") and "seed_threshold" in attrs["znn"]["method"]
    reader = pytest.importorskip("ome_zarr.reader")
    from ome_zarr.io import parse_url

    nodes = list(reader.Reader(parse_url(str(tmp_path / "seg.zarr" / "labels" / "segmentation")))())
    assert nodes and nodes[0].data[0].shape == values.shape[1:] and nodes[0].data[0].dtype == np.uint64


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """The same segments (ids may differ): every id of one meets exactly one id of the other."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))


def test_evaluate_and_segment_give_one_segmentation_of_an_affinity_map(tmp_path, capsys):
    """`znn evaluate --type affinity --segment watershed` and `znn segment --type affinity` (one block or several)
    run one method with one set of defaults: the same partition, the same scores."""
    from tests.ops.test_segment import affinity_map
    from znn.ops.segment import Method, segment

    labels = cells((12, 48, 48), 10, 3, flat=False)
    aff = affinity_map(labels, 3)
    write_volume(tmp_path / "pred.zarr", aff)
    write_volume(tmp_path / "labels.tif", labels.astype(np.uint16))
    whole = segment(aff, Method.of("affinity"))
    evaluated = evaluate_files(EvaluateRequest(str(tmp_path / "pred.zarr"), str(tmp_path / "labels.tif"), "affinity",
                                               segment="watershed"))
    for block in ("12,48,48", "6,48,48", "12,24,24"):
        store = tmp_path / f"seg-{block}.zarr"
        assert main(["segment", str(tmp_path / "pred.zarr"), str(store), "--type", "affinity", "--block", block,
                     "--quiet"]) == 0
        assert _same_partition(read_volume(store / "labels"), whole), block
        scored = evaluate_files(EvaluateRequest(str(store / "labels"), str(tmp_path / "labels.tif"), "segmentation",
                                                dims="3d"))
        assert evaluated.segmented is not None
        assert scored.scores == pytest.approx({k: evaluated.segmented[k] for k in scored.scores}), block
    capsys.readouterr()


def test_segment_chooses_the_seed_and_merge_thresholds_on_labels(tmp_path, capsys):
    """--choose-on LABELS --choose-pred PART: each seed threshold of the grid with each merge threshold of the
    boundary grid (no merging included) segments PART, the lowest adapted Rand error wins (its table printed), and
    the whole prediction is segmented with it."""
    from znn.ops.segment import Method, segment
    from znn.pipeline.jobs.choose import BOUNDARY_MERGE_GRID, SEED_GRID

    pred, labels = volumes(tmp_path)
    store = tmp_path / "seg.zarr"
    assert main(["segment", str(pred), str(store), "--choose-on", f"{labels}[0:2]", "--choose-pred", f"{pred}[0:2]",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if len(line.split()) >= 5 and line.split()[0] in
            map(str, SEED_GRID) and line.split()[1] in map(lambda m: f"{m:g}", BOUNDARY_MERGE_GRID)]
    assert sorted((float(r[0]), float(r[1])) for r in rows) == sorted(
        (s, m) for s in SEED_GRID for m in BOUNDARY_MERGE_GRID)
    chosen = [r for r in rows if r[-1] == "chosen"]
    assert len(chosen) == 1 and float(chosen[0][2]) == min(float(r[2]) for r in rows)
    seed, merge = float(chosen[0][0]), float(chosen[0][1])
    assert f"seed threshold chosen on {labels}[0:2]" in out
    want = segment(read_volume(pred), Method.of("boundary", seed_threshold=seed, merge_threshold=merge))
    assert _same_partition(read_volume(store / "labels"), want)
    # the labels must cover the part given
    assert main(["segment", str(pred), str(tmp_path / "b.zarr"), "--choose-on", f"{labels}[0:2]"]) == 2
    err = capsys.readouterr().err
    assert "has spatial shape (3, 64, 64)" in err and "give --choose-pred the part of the prediction" in err
    assert not (tmp_path / "b.zarr").exists()
    assert main(["segment", str(pred), str(tmp_path / "c.zarr"), "--choose-pred", str(pred)]) == 2
    assert "add --choose-on LABELS" in capsys.readouterr().err


def test_segment_chooses_seed_and_merge_thresholds_of_affinities_on_labels(tmp_path, capsys):
    """For affinities (whose fragments are agglomerated) --choose-on tries every seed threshold with every merge
    threshold of its grid; the pair of the lowest adapted Rand error segments the prediction."""
    from tests.ops.test_segment import affinity_map
    from znn.ops.segment import Method, segment
    from znn.pipeline.jobs.choose import MERGE_GRID, SEED_GRID

    labels = cells((6, 32, 32), 10, 3, flat=False)
    aff = affinity_map(labels, 3)
    write_volume(tmp_path / "pred.zarr", aff)
    write_volume(tmp_path / "labels.tif", labels.astype(np.uint16))
    store = tmp_path / "seg.zarr"
    assert main(["segment", str(tmp_path / "pred.zarr"), str(store), "--type", "affinity", "--choose-on",
                 str(tmp_path / "labels.tif"), "--quiet"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if len(line.split()) >= 5 and line.split()[0] in
            map(str, SEED_GRID) and line.split()[1] in map(str, MERGE_GRID)]
    assert sorted((float(r[0]), float(r[1])) for r in rows) == sorted(
        (s, m) for s in SEED_GRID for m in MERGE_GRID)
    chosen = [r for r in rows if r[-1] == "chosen"]
    assert len(chosen) == 1 and float(chosen[0][2]) == min(float(r[2]) for r in rows)
    seed, merge = float(chosen[0][0]), float(chosen[0][1])
    assert f"merge threshold {merge:g}" in out
    want = segment(aff, Method.of("affinity", seed_threshold=seed, merge_threshold=merge))
    assert _same_partition(read_volume(store / "labels"), want)
