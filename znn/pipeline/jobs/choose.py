"""Choosing the segmentation's thresholds on labelled data: `znn segment --choose-on LABELS`.

The defaults of :data:`znn.ops.segment.DEFAULTS` were chosen on one dataset and do not carry over to another (a
FIB-SEM crop scored seven times worse than the volume they were chosen on). Given ground truth for part of the
prediction (a validation split, never the part a score is reported on), every pair of a seed threshold of a grid
and a merge threshold of a second grid (the threshold of the fragments' agglomeration) segments
that part by `znn segment`'s method (the whole part at once, as ``znn evaluate --segment watershed``), and the one
of the lowest adapted Rand error (ties: the lowest VOI split + merge) is chosen; every row is kept for the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from znn.ops.metrics import evaluate_segmentation
from znn.ops.segment import NO_MERGE, Method, merge_fragments, watershed_fragments
from znn.pipeline.jobs.evaluate import EvaluateRequest, read_inputs
from znn.text import format_table

__all__ = ["SEED_GRID", "MERGE_GRID", "BOUNDARY_MERGE_GRID", "merge_grid", "Choice", "choose_seed_threshold"]

# Seeds are the voxels whose height (boundary probability, or 1 - mean affinity) is below the threshold: from
# sparse seeds (merges) to dense ones (splits); both types' defaults (0.03, 0.01) are on it.
SEED_GRID = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
# Affinity fragments are merged while their mean affinity is above the merge threshold: from many merges to few
# (the affinity default, 0.3, is on it).
# On the FIB-SEM volume's validation sections it moved the adapted Rand error as much as the seed did (0.0557 at the
# default 0.5, 0.0480 at 0.3, 0.335 at 0.1; 30-minute network, seed 0.01).
MERGE_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
# Boundary maps merge nothing by default (their seeds were chosen without agglomeration), so their grid keeps that
# candidate. On ISBI 2012's validation slices 10-14 (recursive workflow's stage 2) merging moved the adapted Rand error
# from 0.0265 (seed 0.5, no merges) to 0.0162 (seed 0.3, merge 0.2).
BOUNDARY_MERGE_GRID = (*MERGE_GRID, NO_MERGE)


def merge_grid(out_type: str) -> tuple[float, ...]:
    """The merge thresholds `znn segment --choose-on` tries for ``out_type`` maps."""
    return BOUNDARY_MERGE_GRID if out_type == "boundary" else MERGE_GRID


@dataclass(frozen=True)
class Choice:
    """The method with the chosen thresholds, and each candidate's method and scores on the labels."""

    method: Method
    rows: tuple[tuple[Method, dict[str, float]], ...]
    pred: str
    labels: str

    @property
    def merges(self) -> bool:
        """Whether the merge threshold was chosen too (more than one was tried)."""
        return len({m.merge_threshold for m, _ in self.rows}) > 1

    def text(self) -> str:
        header = ["seed threshold", *(["merge threshold"] if self.merges else []), "rand_error", "voi_split",
                  "voi_merge", ""]
        table = [[f"{m.seed_threshold:g}", *([f"{m.merge_threshold:g}"] if self.merges else []),
                  f"{s['rand_error']:.4f}", f"{s['voi_split']:.4f}", f"{s['voi_merge']:.4f}",
                  "chosen" if m == self.method else ""] for m, s in self.rows]
        merge = self.method.merge_threshold
        chosen = f"{self.method.seed_threshold:g}" + (
            f", merge threshold {merge:g}{' (no merges)' if merge >= NO_MERGE else ''}" if self.merges else "")
        return f"seed threshold chosen on {self.labels} ({self.pred}): {chosen}\n" + format_table(header, table)


def choose_seed_threshold(method: Method, pred: str, labels: str, grid: tuple[float, ...] = SEED_GRID,
                          mask: str | None = None, merges: tuple[float, ...] | None = None) -> Choice:
    """The seed threshold of ``grid`` with the merge threshold of ``merges`` (None: :func:`merge_grid` of the
    method's map type) whose segmentation of ``pred`` (a prediction path, e.g. with a z range) scores best against
    ``labels`` (same shape); ``method``'s other settings are kept."""
    req = EvaluateRequest(pred, labels, method.out_type, dims=method.resolved_dims, mask=mask,
                          nonboundary=method.nonboundary)
    prediction, truth, valid = read_inputs(req, shape_fix="give --choose-pred the part of the prediction the labels "
                                           "cover, e.g. pred.zarr/output[10:15] for labels.tif[10:15]")
    dims = method.resolved_dims
    merges = merge_grid(method.out_type) if merges is None else merges
    rows = []
    for threshold in grid:
        seeded = replace(method, seed_threshold=float(threshold))
        fragments, height = watershed_fragments(prediction, seeded)  # one watershed per seed, merged many ways
        for merge in merges:
            candidate = replace(seeded, merge_threshold=float(merge))
            found = merge_fragments(fragments, prediction, height, candidate)
            rows.append((candidate, evaluate_segmentation(found, truth, dims, valid)))
    best = min(rows, key=lambda row: (_finite(row[1]["rand_error"]),
                                      _finite(row[1]["voi_split"] + row[1]["voi_merge"])))
    return Choice(best[0], tuple(rows), pred, labels)


def _finite(value: float) -> float:
    return math.inf if math.isnan(value) else value
