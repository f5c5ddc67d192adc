"""Conv mode ``optimize``: time each conv layer in both modes on its real shapes, keep the faster, remember it.

For every conv edge group whose mode is ``optimize``, :func:`resolve_modes` times one training pass of the
whole layer (forward, kernel gradient, and the input gradient unless the input is a network input) in FFT
and in direct mode, single-threaded as the pipeline's tasks run. The whole layer, not one map block: the
graph runs the same kernels on blocks of maps spread over the workers, so the layer's single-threaded time is
the work the graph does for it (a block's time would not scale to the layer: the FFTs grow with in + out
maps, the products with in x out).

Choices are kept in a JSON file (``cache_path``, else ``$ZNN_CACHE_DIR/autotune.json``, else
``~/.cache/znn/autotune.json``), keyed by the layer's shape, dilation, dtype, FFTW planner effort and the
machine (:func:`machine_id`), and written atomically; a later run reads them instead of measuring. A corrupt
or unreadable file is remeasured (with a warning) and rewritten.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from znn.ops import conv as convops
from znn.ops import conv_fft
from znn.ops import fft as fftops
from znn.pipeline.plan import CONV_MODES, make_plan
from znn.pipeline.schedulers import single_threaded_kernels
from znn.spec import NetworkSpec

__all__ = ["LayerProblem", "resolve_modes", "machine_id", "cache_file", "time_layer"]

log = logging.getLogger("znn.autotune")

Triple = tuple[int, int, int]
Timer = Callable[["LayerProblem", str], float]
CACHE_VERSION = 1
# After one timed run per mode, a mode this many times slower has lost: no need for more repetitions.
_CLEAR_WIN = 2.0


@dataclass(frozen=True)
class LayerProblem:
    """What one conv layer computes in a training step: the shapes that decide fft against direct."""

    maps_in: int
    maps_out: int
    in_extent: Triple  # the part of the input node the edge reads
    kernel: Triple
    dilation: Triple
    dtype: str
    grad_input: bool  # False when the input is a network input: no input gradient is computed

    @property
    def out_extent(self) -> Triple:
        o = [n - (k - 1) * d for n, k, d in zip(self.in_extent, self.kernel, self.dilation)]
        return (o[0], o[1], o[2])

    def key(self, machine: str) -> str:
        fields = [f"maps={self.maps_in},{self.maps_out}", "in=" + ",".join(map(str, self.in_extent)),
                  "kernel=" + ",".join(map(str, self.kernel)), "dilation=" + ",".join(map(str, self.dilation)),
                  f"dtype={self.dtype}", f"grad_input={int(self.grad_input)}",
                  f"planner={fftops.planner_effort()}", f"machine={machine}"]
        return "|".join(fields)


def resolve_modes(spec: NetworkSpec, output_patch: Sequence[int], modes: str | Mapping[str, str],
                  dtype: Any = np.float32, *, cache_path: str | Path | None = None, repeat: int = 3,
                  timer: Timer | None = None) -> dict[str, str]:
    """The conv mode of every conv edge group, with ``optimize`` replaced by the faster of fft and direct.

    ``modes`` is one mode for all conv edges or a dict per edge (missing edges are ``fft``, as in
    :func:`~znn.pipeline.plan.make_plan`). Layers whose choice is in the cache are not measured; the others
    are timed ``repeat`` times per mode (median; fewer when one mode is clearly slower) and written back.
    ``timer(problem, mode)`` returns the seconds of one run and replaces the real measurement (tests).
    """
    wanted = {e: (modes if isinstance(modes, str) else modes.get(e, "fft")) for e in spec.conv_edges()}
    for edge, mode in wanted.items():
        if mode not in (*CONV_MODES, "optimize"):
            from znn.errors import ConfigError

            raise ConfigError(f"conv mode {mode!r} for edge {edge!r} is not valid; use fft, direct or optimize")
    todo = [e for e, m in wanted.items() if m == "optimize"]
    if not todo:
        return wanted
    problems = _problems(spec, output_patch, todo, np.dtype(dtype))
    path = cache_file(cache_path)
    machine = machine_id()
    stored = _read(path)
    measure = timer or time_layer
    measured: dict[str, dict[str, Any]] = {}
    for edge in todo:
        key = problems[edge].key(machine)
        entry = measured.get(key) or stored.get(key)
        if entry is not None and entry.get("mode") in CONV_MODES:
            wanted[edge] = entry["mode"]
            how = "measured" if key in measured else "cached"
            log.info("autotune %s: %s (%s; fft %s, direct %s)", edge, entry["mode"], how,
                     _fmt(entry.get("fft_s")), _fmt(entry.get("direct_s")))
            continue
        entry = _measure(problems[edge], measure, repeat)
        measured[key] = entry
        wanted[edge] = entry["mode"]
        log.info("autotune %s: %s (measured; fft %s, direct %s)", edge, entry["mode"], _fmt(entry["fft_s"]),
                 _fmt(entry["direct_s"]))
    if measured:
        _write(path, measured)
    return wanted


def _fmt(seconds: Any) -> str:
    return f"{1e3 * seconds:.1f} ms" if isinstance(seconds, (int, float)) else "?"


def _problems(spec: NetworkSpec, output_patch: Sequence[int], edges: Sequence[str],
              dtype: np.dtype[Any]) -> dict[str, LayerProblem]:
    plan = make_plan(spec, output_patch, "fft")
    out = {}
    for name in edges:
        edge, ep = spec.edges[name], plan.edges[name]
        n_in, n_out = spec.kernel_shape(name)[:2]
        out[name] = LayerProblem(n_in, n_out, ep.need, edge.size, ep.dilation, dtype.name,
                                 spec.nodes[edge.input].type != "input")
    return out


def _measure(problem: LayerProblem, timer: Timer, repeat: int) -> dict[str, Any]:
    """Time both modes, interleaved; stop early when one mode is clearly slower after one timed run each."""
    runs: dict[str, list[float]] = {m: [] for m in CONV_MODES}
    for mode in CONV_MODES:
        timer(problem, mode)  # warm-up: FFT plans, DFT matrices, page faults
    for rep in range(max(1, repeat)):
        for mode in CONV_MODES:
            runs[mode].append(timer(problem, mode))
        fft, direct = runs["fft"][-1], runs["direct"][-1]
        if rep == 0 and max(fft, direct) > _CLEAR_WIN * min(fft, direct):
            break
    med = {m: float(statistics.median(v)) for m, v in runs.items()}
    best = min(CONV_MODES, key=lambda m: med[m])
    return {"mode": best, "fft_s": med["fft"], "direct_s": med["direct"], "runs": len(runs["fft"]),
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}


# ---------------------------------------------------------------------------------------------- measurement


def time_layer(problem: LayerProblem, mode: str, seed: int = 0) -> float:
    """Seconds of one training pass of the layer in ``mode`` with single-threaded kernels (as in tasks)."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(problem.dtype)
    x = rng.standard_normal((problem.maps_in, *problem.in_extent)).astype(dt)
    w = (rng.standard_normal((problem.maps_in, problem.maps_out, *problem.kernel)) * 0.1).astype(dt)
    gy = rng.standard_normal((problem.maps_out, *problem.out_extent)).astype(dt)
    run = _fft_pass if mode == "fft" else _direct_pass
    with single_threaded_kernels():
        t0 = time.perf_counter()
        run(problem, x, w, gy)
        return time.perf_counter() - t0


def _fft_pass(p: LayerProblem, x: np.ndarray, w: np.ndarray, gy: np.ndarray) -> None:
    """What the FFT-mode graph does for the layer: the same pieces, on all maps at once."""
    shape = fftops.fft_shape(p.in_extent, p.kernel, p.dilation)
    ws = conv_fft.kernel_spectra(w, p.dilation, shape)
    xs = conv_fft.input_spectra(x, shape)
    conv_fft.inverse_valid(conv_fft.multiply_accumulate(xs, ws), shape, p.out_extent,
                           conv_fft.output_offset(p.kernel, p.dilation))
    gs = conv_fft.grad_output_spectra(gy, shape, p.kernel, p.dilation)
    if p.grad_input:
        conv_fft.inverse_valid(conv_fft.grad_input_spectra(gs, ws), shape, p.in_extent)
    conv_fft.grad_kernel(xs, gs, shape, p.kernel, p.dilation)


def _direct_pass(p: LayerProblem, x: np.ndarray, w: np.ndarray, gy: np.ndarray) -> None:
    convops.conv_forward_direct(x, w, p.dilation)
    if p.grad_input:
        convops.conv_backward_direct(x, w, gy, p.dilation)
    else:
        # the graph's direct tasks skip the input gradient of a network input the same way
        convops._grad_kernel_direct(x, gy, w.shape, p.dilation, 1)


# ---------------------------------------------------------------------------------------------- the cache


@lru_cache(maxsize=None)
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown-cpu"


def machine_id() -> str:
    """What a timing depends on besides the layer: architecture, CPU model, NumPy (its BLAS) and pyfftw."""
    import pyfftw

    return f"{platform.machine()};{_cpu_model()};numpy {np.__version__};pyfftw {pyfftw.__version__}"


def cache_file(path: str | Path | None = None) -> Path:
    """The autotune file: ``path`` if given, else ``$ZNN_CACHE_DIR/autotune.json``, else
    ``~/.cache/znn/autotune.json``."""
    if path is not None:
        return Path(path)
    root = os.environ.get("ZNN_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "znn") / "autotune.json"


def _read(path: Path) -> dict[str, dict[str, Any]]:
    """The stored entries; a missing file is empty, a corrupt one is empty with a warning."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        warnings.warn(f"{path}: cannot read the autotune cache ({exc}); measuring again", RuntimeWarning,
                      stacklevel=3)
        return {}
    try:
        data = json.loads(text)
        entries = data["entries"]
        if data.get("version") != CACHE_VERSION or not isinstance(entries, dict):
            raise ValueError(f"version {data.get('version')!r}, expected {CACHE_VERSION}")
        return {k: v for k, v in entries.items() if isinstance(v, dict)}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        warnings.warn(f"{path}: the autotune cache is corrupt ({exc}); measuring again and rewriting it "
                      "(delete the file to silence this)", RuntimeWarning, stacklevel=3)
        return {}


def _write(path: Path, new: Mapping[str, dict[str, Any]]) -> None:
    """Merge ``new`` into the file (re-read just before, so concurrent runs keep each other's entries) and
    replace it atomically. A cache that cannot be written only costs a remeasurement next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            entries = _read(path)
        entries.update(new)
        fd, tmp = tempfile.mkstemp(prefix=".autotune-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        warnings.warn(f"{path}: cannot write the autotune cache ({exc}); set ZNN_CACHE_DIR to a writable folder",
                      RuntimeWarning, stacklevel=3)
