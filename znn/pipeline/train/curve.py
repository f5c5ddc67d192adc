"""The learning curve: cost, pixel error and Rand error for training and validation, with iteration and elapsed
time; stored in checkpoints (ZNN's ``statistics`` group) and drawn as a PNG."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SERIES = ("it", "err", "cls", "re", "elapsed")  # ZNN's names: err = cost, cls = pixel error; re = Rand error


@dataclass
class LearningCurve:
    """``train`` and ``test`` series, each a dict of lists keyed by :data:`SERIES`."""

    train: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in SERIES})
    test: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in SERIES})

    def add(self, phase: str, it: int, cost: float, pixel_error: float, rand_error: float, elapsed: float) -> None:
        series = getattr(self, phase)
        for key, value in zip(SERIES, (it, cost, pixel_error, rand_error, elapsed)):
            series[key].append(float(value))

    def truncate(self, iteration: int) -> None:
        """Drop entries after ``iteration`` (a resumed run continues from there: no gap, no duplicate)."""
        for series in (self.train, self.test):
            keep = sum(1 for it in series["it"] if it <= iteration)
            for key in SERIES:
                del series[key][keep:]

    def to_statistics(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for phase in ("train", "test"):
            for key, values in getattr(self, phase).items():
                out[f"{phase}/{key}"] = np.asarray(values, dtype=np.int64 if key == "it" else np.float64)
        return out

    @classmethod
    def from_statistics(cls, stats: Mapping[str, np.ndarray]) -> "LearningCurve":
        curve = cls()
        for phase in ("train", "test"):
            n = len(stats.get(f"{phase}/it", []))
            for key in SERIES:
                values = stats.get(f"{phase}/{key}")
                getattr(curve, phase)[key] = [float(v) for v in values] if values is not None else [float("nan")] * n
        return curve

    def plot(self, path: str | Path, title: str = "") -> Path:
        """Draw cost and pixel/Rand error against iteration for both phases; returns the PNG path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax_cost, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
        for phase, style in (("train", "-"), ("test", "o-")):
            s = getattr(self, phase)
            if s["it"]:
                ax_cost.plot(s["it"], s["err"], style, label=phase, markersize=3)
                ax_err.plot(s["it"], s["cls"], style, label=f"{phase} pixel error", markersize=3)
                if np.isfinite(s["re"]).any():
                    ax_err.plot(s["it"], s["re"], style, label=f"{phase} Rand error", markersize=3, alpha=0.6)
        ax_cost.set(xlabel="iteration", ylabel="cost per output voxel", title="cost")
        ax_err.set(xlabel="iteration", ylabel="error", title="errors", ylim=(0, None))
        for ax in (ax_cost, ax_err):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(title)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path
