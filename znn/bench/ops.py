"""Benchmark of one conv layer (forward + backward) per ZNN benchmark network: direct, FFT and PyTorch.

Each row is a 40 -> 40 map conv layer of one of ZNN's benchmark networks at a given output patch. For each
layer it times, interleaved repetition by repetition so machine noise hits every method alike:

* ``direct``: :func:`conv_forward_direct` then :func:`conv_backward_direct` (grad x and grad w);
* ``fft``: :func:`conv_forward_fft` (keeping spectra) then :func:`conv_backward_fft` reusing them; as in a
  training step the kernel spectra are recomputed every run (the weights changed), into the buffer of the
  previous run's spectra;
* ``torch`` (when importable): ``torch.nn.functional.conv3d`` forward and ``backward`` for x and w.

All sides get the same number of threads (threadpoolctl for BLAS and OpenMP, FFTW ``threads``,
``torch.set_num_threads``). Medians over ``repeat`` runs after one warm-up (which builds FFTW plans).

Run ``znn bench ops --help``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from znn.bench.common import Column, Row, import_torch, rows_table, write_rows
from znn.ops.conv import MODES as CONV_MODES
from znn.ops.conv import conv_backward_direct, conv_forward_direct
from znn.ops.conv_fft import Spectra, conv_backward_fft, conv_forward_fft
from znn.ops.fft import check_conv_shapes, fft_shape, load_wisdom, save_wisdom
from znn.types import Triple

__all__ = ["Layer", "LAYERS", "OpsRequest", "run_ops_bench", "format_table", "write_json"]


@dataclass(frozen=True)
class Layer:
    """A conv layer of a ZNN benchmark network (the 40 -> 40 map layers conv2..conv5 of each file)."""

    name: str
    source: str
    kernel: Triple
    maps_in: int = 40
    maps_out: int = 40
    target: float = 1.0  # our best time may be at most target * PyTorch's

    @property
    def is_2d(self) -> bool:
        return self.kernel[0] == 1


# Derived by hand from shared/znn-reference/benchmark/*.znn (every conv there is `size` below, 40 maps wide,
# stride 1); not parsed, so the benchmark does not depend on the network parser.
LAYERS: tuple[Layer, ...] = (
    Layer("2d_10", "benchmark/2d_10.znn", (1, 10, 10)),
    Layer("2d_20", "benchmark/2d_20.znn", (1, 20, 20)),
    Layer("2d_30", "benchmark/2d_30.znn", (1, 30, 30)),
    Layer("2d_40", "benchmark/2d_40.znn", (1, 40, 40)),
    Layer("3d_3", "benchmark/3d_3.znn", (3, 3, 3), target=1.5),
    Layer("3d_5", "benchmark/3d_5.znn", (5, 5, 5)),
    Layer("3d_7", "benchmark/3d_7.znn", (7, 7, 7)),
)

DEFAULT_OUTSZ_2D: Triple = (1, 128, 128)
DEFAULT_OUTSZ_3D: Triple = (24, 24, 24)
# Direct convolution of big 2D kernels takes many seconds per run and never wins; skip it above this cost.
DEFAULT_MAX_DIRECT_GFLOP = 60.0


def _conv_flops(layer: Layer, outsz: Triple) -> float:
    """Multiply-adds x 2 of forward + both gradients of a direct convolution."""
    return 3 * 2.0 * layer.maps_in * layer.maps_out * math.prod(layer.kernel) * math.prod(outsz)


def _ours_direct(x: np.ndarray, w: np.ndarray, gy: np.ndarray, threads: int) -> Callable[[], tuple[float, float]]:
    def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        conv_forward_direct(x, w, threads=threads)
        t1 = time.perf_counter()
        conv_backward_direct(x, w, gy, threads=threads)
        return t1 - t0, time.perf_counter() - t0
    return run


def _ours_fft(x: np.ndarray, w: np.ndarray, gy: np.ndarray, threads: int) -> Callable[[], tuple[float, float]]:
    previous: list[Spectra] = []

    def run() -> tuple[float, float]:
        # as in training: the kernels changed since the last step, so their spectra are recomputed (into the
        # previous step's buffer), the input's are new; the backward pass reuses both
        stale = previous.pop() if previous else None
        t0 = time.perf_counter()
        _, spectra = conv_forward_fft(x, w, spectra=stale, keep=True, threads=threads, kernels_changed=True)
        t1 = time.perf_counter()
        conv_backward_fft(x, w, gy, spectra=spectra, threads=threads)
        t2 = time.perf_counter()
        previous.append(spectra)
        return t1 - t0, t2 - t0
    return run


def _torch_run(torch: Any, x: np.ndarray, w: np.ndarray, gy: np.ndarray) -> Callable[[], tuple[float, float]]:
    # conv3d is a cross-correlation; flipping the kernel would only cost a copy, so time it as is
    tx = torch.from_numpy(x[None].copy()).requires_grad_(True)
    tw = torch.from_numpy(np.ascontiguousarray(w.transpose(1, 0, 2, 3, 4))).requires_grad_(True)
    tgy = torch.from_numpy(gy[None].copy())

    def run() -> tuple[float, float]:
        tx.grad = None
        tw.grad = None
        t0 = time.perf_counter()
        y = torch.nn.functional.conv3d(tx, tw)
        t1 = time.perf_counter()
        y.backward(tgy)
        return t1 - t0, time.perf_counter() - t0
    return run


@dataclass(frozen=True)
class OpsRequest:
    """What to time. ``layers``: names from :data:`LAYERS` (None: all). ``outsz_2d``/``outsz_3d``: output patch
    (z, y, x) of the 2D and 3D layers. ``torch``: also time PyTorch when it is importable. ``max_direct_gflop``:
    skip direct mode above this cost. ``wisdom``: FFTW wisdom file loaded before and saved after (planning then
    happens once per machine)."""

    layers: Sequence[str] | None = None
    outsz_2d: Triple = DEFAULT_OUTSZ_2D
    outsz_3d: Triple = DEFAULT_OUTSZ_3D
    threads: int = 2
    repeat: int = 5
    dtype: str = "float32"
    modes: Sequence[str] = CONV_MODES
    torch: bool = True
    max_direct_gflop: float = DEFAULT_MAX_DIRECT_GFLOP
    wisdom: str | Path | None = None
    seed: int = 0

    def chosen_layers(self) -> list[Layer]:
        unknown = set(self.layers or ()) - {lay.name for lay in LAYERS}
        if unknown:
            raise ValueError(f"unknown layers {sorted(unknown)}; valid: {[lay.name for lay in LAYERS]}")
        return [lay for lay in LAYERS if self.layers is None or lay.name in self.layers]


Runs = dict[str, Callable[[], tuple[float, float]]]


def _runners(layer: Layer, outsz: Triple, request: OpsRequest, torch: Any | None) -> tuple[Runs, Triple, float]:
    """The timed runs of one layer (direct, fft, torch), its input patch and its direct GFLOP."""
    insz = (outsz[0] + layer.kernel[0] - 1, outsz[1] + layer.kernel[1] - 1, outsz[2] + layer.kernel[2] - 1)
    dtype = np.dtype(request.dtype)
    rng = np.random.default_rng(request.seed)
    x = rng.standard_normal((layer.maps_in, *insz)).astype(dtype)
    w = (rng.standard_normal((layer.maps_in, layer.maps_out, *layer.kernel)) * 0.05).astype(dtype)
    gy = rng.standard_normal((layer.maps_out, *outsz)).astype(dtype)
    check_conv_shapes(x.shape, w.shape, (1, 1, 1), gy.shape)
    gflop = _conv_flops(layer, outsz) / 1e9
    runners: Runs = {}
    if "direct" in request.modes and gflop <= request.max_direct_gflop:
        runners["direct"] = _ours_direct(x, w, gy, request.threads)
    if "fft" in request.modes:
        runners["fft"] = _ours_fft(x, w, gy, request.threads)
    if torch is not None:
        runners["torch"] = _torch_run(torch, x, w, gy)
    return runners, insz, gflop


def _interleaved(runners: Runs, repeat: int) -> dict[str, list[tuple[float, float]]]:
    """``repeat`` timings of each run, interleaved so machine noise hits every method alike."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    for rep in range(repeat + 1):  # repetition 0 warms up (plans, allocator) and is dropped
        for name, run in runners.items():
            result = run()
            if rep > 0:
                times[name].append(result)
    return times


def _best(row: Row, layer: Layer) -> None:
    """Add the fastest of our modes and how it compares with PyTorch's time to ``row``."""
    ours = {m: row[f"{m}_ms"] for m in CONV_MODES if row[f"{m}_ms"] is not None}
    best = min(ours, key=lambda m: ours[m]) if ours else None
    row["best_mode"] = best
    row["best_ms"] = ours[best] if best else None
    row["target"] = layer.target
    if best and row["torch_ms"]:
        row["best_vs_torch"] = round(row["best_ms"] / row["torch_ms"], 2)
        row["meets_target"] = bool(row["best_vs_torch"] <= layer.target)
    else:
        row["best_vs_torch"] = None
        row["meets_target"] = None


def _bench_layer(layer: Layer, request: OpsRequest, torch: Any | None) -> Row:
    outsz = request.outsz_2d if layer.is_2d else request.outsz_3d
    runners, insz, gflop = _runners(layer, outsz, request, torch)
    times = _interleaved(runners, request.repeat)
    row: Row = {
        "layer": layer.name, "source": layer.source, "kernel": list(layer.kernel),
        "maps": [layer.maps_in, layer.maps_out], "outsz": list(outsz), "insz": list(insz),
        "fft_shape": list(fft_shape(insz, layer.kernel, (1, 1, 1))), "threads": request.threads,
        "dtype": np.dtype(request.dtype).name, "repeat": request.repeat, "gflop_direct": round(gflop, 2),
    }
    for name in (*CONV_MODES, "torch"):
        runs = times.get(name)
        row[f"{name}_fwd_ms"] = round(1e3 * statistics.median(r[0] for r in runs), 1) if runs else None
        row[f"{name}_ms"] = round(1e3 * statistics.median(r[1] for r in runs), 1) if runs else None
    _best(row, layer)
    return row


def run_ops_bench(request: OpsRequest = OpsRequest(), progress: Callable[[Row], None] | None = None) -> list[Row]:
    """Time every selected layer; one dict per layer (keys as in :func:`format_table` and the JSON)."""
    chosen = request.chosen_layers()
    tmod = import_torch() if request.torch else None
    if request.wisdom is not None:
        load_wisdom(request.wisdom)
    rows = []
    with threadpool_limits(limits=request.threads):
        if tmod is not None:
            tmod.set_num_threads(request.threads)
        for lay in chosen:
            row = _bench_layer(lay, request, tmod)
            rows.append(row)
            if progress is not None:
                progress(row)
    if request.wisdom is not None:
        save_wisdom(request.wisdom)
    return rows


_COLUMNS = (Column("layer", "layer"), Column("kernel", "kernel"), Column("outsz", "output"),
            Column("fft_shape", "fft shape"), Column("direct_ms", "direct ms", "{:.1f}"),
            Column("fft_ms", "fft ms", "{:.1f}"), Column("best_mode", "best"), Column("torch_ms", "torch ms", "{:.1f}"),
            Column("best_vs_torch", "best/torch", "{:.2f}"), Column("target", "target", "<={:.1f}"),
            Column("meets_target", "ok"))


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table of the rows (times are forward + backward medians in milliseconds)."""
    lines = [rows_table(_COLUMNS, rows)]
    if rows:
        r0 = rows[0]
        lines.append(f"forward + backward (grad x, grad w), median of {r0['repeat']}, {r0['threads']} threads, "
                     f"{r0['dtype']}, 40 -> 40 maps; best/torch <= target is the goal")
    return "\n".join(lines)


def write_json(rows: Sequence[Row], path: str | Path) -> None:
    """Write the rows (plus the machine's numpy/torch versions) as JSON."""
    tmod = import_torch()
    write_rows(path, rows, meta={"numpy": np.__version__, "torch": getattr(tmod, "__version__", None)})
