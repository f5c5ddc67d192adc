"""`znn quickstart`: the whole workflow on data the project makes itself, in a few minutes.

1. A synthetic EM-like volume (:func:`znn.pipeline.jobs.synthetic.synthetic_em`: cells separated by dark membranes,
   blur, noise) is written as tif files: a training part and a held-out part made from another seed.
2. The job of ``workflows/quickstart`` (a small 2D boundary network, its ``.spec`` and ``.cfg``) is copied next to
   the data and trained with ``znn train``'s code under a time limit.
3. The trained network predicts the held-out volume densely (``znn forward``'s code), the prediction is segmented
   (``znn segment``'s code: a seeded watershed per slice) and both are evaluated against the truth: the pixel error
   beside the baseline that predicts "no boundary" everywhere, the adapted Rand error and VOI of the watershed
   segmentation beside those of the thresholded map (connected components, as ``znn evaluate`` segments it).
4. PNG previews (raw, prediction, truth) and the learning curve are written into the output folder.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from znn.io.bundled import bundled_file
from znn.io.config import load_job
from znn.io.paths import check_writable
from znn.io.volume import read_volume, write_volume
from znn.ops import metrics
from znn.pipeline.jobs.synthetic import boundary_labels, synthetic_em

__all__ = ["quickstart", "QuickstartReport", "JOB_FILES", "job_folder"]

JOB_FILES = ("net.znn", "data.spec", "train.cfg")
TRAIN_SHAPE, TEST_SHAPE = (6, 256, 256), (3, 256, 256)
TRAIN_SEED, TEST_SEED = 1, 2


@dataclass
class QuickstartReport:
    """What the quickstart measured on the held-out volume."""

    out: Path
    iterations: int
    train_seconds: float
    scores: dict[str, float]
    baseline: dict[str, float]
    segmented: dict[str, float]
    files: list[Path] = field(default_factory=list)

    def text(self) -> str:
        s, b, w = self.scores, self.baseline, self.segmented
        lines = [
            f"trained {self.iterations} iterations in {self.train_seconds:.0f} s",
            "files: " + ", ".join(str(f) for f in self.files),
            f"held-out pixel error {s['pixel_error']:.4f} (predicting 'no boundary' everywhere: "
            f"{b['pixel_error']:.4f}, {b['pixel_error'] / max(s['pixel_error'], 1e-9):.1f}x worse)",
            f"held-out adapted Rand error: watershed segmentation {w['rand_error']:.4f}, thresholded map "
            f"{s['rand_error']:.4f} (no boundary: {b['rand_error']:.4f})",
            f"held-out VOI split/merge: watershed segmentation {w['voi_split']:.3f}/{w['voi_merge']:.3f}, "
            f"thresholded map {s['voi_split']:.3f}/{s['voi_merge']:.3f}",
        ]
        return "\n".join(lines)


def job_folder() -> Path:
    """The bundled quickstart job (``workflows/quickstart``, installed with the package)."""
    for name in JOB_FILES:
        bundled_file("quickstart", name)
    return bundled_file("quickstart")


def make_data(data: Path) -> None:
    """Write the synthetic training and held-out volumes with their ISBI-style labels (0 = membrane)."""
    data.mkdir(parents=True, exist_ok=True)
    for name, shape, seed in (("train", TRAIN_SHAPE, TRAIN_SEED), ("test", TEST_SHAPE, TEST_SEED)):
        raw, seg = synthetic_em(shape, seed)
        write_volume(data / f"{name}-raw.tif", raw, overwrite=True)
        write_volume(data / f"{name}-labels.tif", boundary_labels(seg), overwrite=True)


def quickstart(out: Path, minutes: float = 4.0, max_iter: int | None = None, scheduler: str | None = None,
               progress: bool = True, log: Callable[[str], None] = print) -> QuickstartReport:
    from znn.pipeline.jobs.forward import forward_job
    from znn.pipeline.jobs.segment import SegmentJob, segment_job
    from znn.pipeline.jobs.train import train_job

    check_writable(out, "quickstart --out", folder=True, fix="name a folder (it is made when missing)")
    out.mkdir(parents=True, exist_ok=True)
    for name in JOB_FILES:
        shutil.copyfile(job_folder() / name, out / name)
    log(f"writing synthetic EM volumes into {out / 'data'}")
    make_data(out / "data")
    job = load_job(out / "train.cfg")
    trainer = train_job(job, scheduler=scheduler, max_iter=max_iter, time_limit=60 * minutes, progress=progress,
                        log=log)
    log("predicting the held-out volume")
    result = forward_job(job, progress=progress, fresh=True, scheduler=scheduler)[0]
    pred = next(iter(result.arrays.values()))
    log("segmenting it")
    labels = segment_job(SegmentJob(pred, str(result.store.parent / "seg_sample2.zarr"), scheduler=scheduler,
                                    fresh=True, progress=progress))
    prob = metrics.boundary_probability(read_volume(pred))
    truth = read_volume(out / "data" / "test-labels.tif")
    scores = metrics.evaluate(prob, truth, "boundary")
    baseline = metrics.evaluate(np.zeros_like(prob), truth, "boundary")
    segmented = metrics.evaluate_segmentation(read_volume(labels.array), truth, "2d")
    raw = read_volume(out / "data" / "test-raw.tif")
    files = [preview(out / "preview.png", raw, prob, truth), Path(f"{trainer.prefix}_curve.png"),
             Path(f"{trainer.prefix}_current.h5"), result.store, labels.store]
    elapsed = trainer.curve.train["elapsed"][-1] if trainer.curve.train["elapsed"] else 0.0
    return QuickstartReport(out, trainer.iteration, elapsed, scores, baseline, segmented, files)


def preview(path: Path, raw: np.ndarray, prob: np.ndarray, truth: np.ndarray) -> Path:
    """A PNG of the middle section: raw image, boundary probability and true boundaries side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = raw.shape[0] // 2
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, image, title in zip(axes, (raw[z], prob[z], truth[z] == 0),
                                ("raw (held out)", "predicted boundary probability", "true boundaries")):
        ax.imshow(image, cmap="gray" if title.startswith("raw") else "magma", vmin=0, vmax=None if
                  title.startswith("raw") else 1)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
