"""One engine at one output patch in a fresh process, so that the process's peak resident memory (VmHWM, which starts
afresh at exec) is that engine's alone: `znn bench forward` runs every (engine, patch) as
``python -m znn.bench.engines JOB.json``.

The child (:func:`run_job`) loads the benchmark network with the seeded weights, makes the seeded input patch
(:func:`bench_inputs`: the same in every process), runs the engine once untimed (FFTW plans, kernel spectra,
allocator, ONNX Runtime's and PyTorch's first-run work) and ``repeat`` times timed, saves the first output node's
result of one block to ``output`` (.npy) for the parent to compare, and prints one JSON line: the median seconds of
a run, the untimed one, the peak resident memory at the end and, for znn, the configuration it ran.

Engines: ``znn`` (:class:`~znn.pipeline.dense.plan.BlockPlan`'s evaluator, as a dense run makes it: ``threads //
block_threads`` blocks at once, each on ``block_threads`` threads; with ``memory`` set, the dense planner first picks
the output block, threads per block and spectra cache for that budget, as ``znn forward --memory`` does), ``torch``
(:mod:`znn.bench.torchnet`, ``torch.set_num_threads(threads)``) and ``ort`` (:mod:`znn.bench.onnxnet`, the model at
``onnx``).

The parent side (:func:`run_engine`) watches the child: it kills it when its resident memory passes
``Limits.rss`` or it runs longer than ``Limits.seconds``, and says so in the row it returns.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from znn.bench.common import Row
from znn.bench.networks import bench_network
from znn.environment import proc_bytes
from znn.io.netfile import load_network
from znn.network import Network
from znn.spec import NetworkSpec
from znn.types import Triple

__all__ = ["EngineJob", "Limits", "bench_net", "bench_inputs", "time_runs", "run_job", "run_engine", "rss_of"]

ENGINES = ("znn", "torch", "ort")
# A run this long is its own measurement: planning and warm-up are a small part of it.
LONG_RUN_S = 60.0
POLL_S = 0.2


@dataclass(frozen=True)
class EngineJob:
    """What one child process runs: ``engine`` on benchmark network ``net`` at output cube ``outsz`` with
    ``threads`` threads (znn: ``threads // block_threads`` blocks at once), ``repeat`` timed runs, weights and input
    from ``seed``; ``output``: where to save the result of one block (.npy; None: not saved). ``onnx``: the model
    file (``ort``). znn only: ``modes`` (``optimize`` is resolved in the child by timing the layers for this
    threading, as the dense planner does), ``spectra_cache``, and with a ``memory`` budget, ``choose``: ``plan``
    (the dense planner picks block, threads per block and spectra cache: ``outsz`` and ``block_threads`` are
    ignored) or ``fit`` (:func:`fit_block` picks threads per block and spectra cache at ``outsz``; the job does not
    run when nothing fits)."""

    engine: str
    net: str
    outsz: Triple
    threads: int
    repeat: int
    seed: int = 0
    output: str | None = None
    onnx: str | None = None
    block_threads: int = 1
    modes: str | dict[str, str] = "fft"
    spectra_cache: bool = True
    memory: int | None = None
    choose: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "EngineJob":
        data = json.loads(text)
        data["outsz"] = tuple(data["outsz"])
        return cls(**data)


@dataclass(frozen=True)
class Limits:
    """When the parent kills a child: after ``seconds`` of wall time, or once its resident memory passes ``rss``."""

    seconds: float
    rss: int


def bench_net(name: str, seed: int) -> Network:
    """Benchmark network ``name`` with the weights of ``seed``, as dense inference runs it (sliding window)."""
    return Network.initialise(load_network(bench_network(name)), seed=seed).sliding_window()


def bench_inputs(spec: NetworkSpec, outsz: Triple, seed: int) -> dict[str, np.ndarray]:
    """The seeded float32 input patch of every input node for output patch ``outsz``."""
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal((spec.nodes[n].size, *p)).astype(np.float32)
            for n, p in spec.layout(outsz).input_patch.items()}


def time_runs(fn: Callable[[], Any], repeat: int, long: float = LONG_RUN_S) -> tuple[float, float]:
    """(median seconds of ``repeat`` timed calls of ``fn``, seconds of the untimed first call). A first call longer
    than ``long`` is its own measurement (then both are that call)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > long:
        return first, first
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first


# ---------------------------------------------------------------------------------------------- in the child


@dataclass(frozen=True)
class BlockFit:
    """How a znn block of one output patch runs within a budget: threads per block, spectra cached or not, the
    modes the memory model assumed, the predicted peak of the process and whether it fits."""

    block_threads: int
    spectra_cache: bool
    modes: str | dict[str, str]
    predicted: int
    fits: bool


def fit_block(spec: NetworkSpec, outsz: Triple, job: EngineJob, baseline: int,
              in_flight: int | None = None) -> BlockFit:
    """One block per thread if that fits ``job.memory``, else every thread on one block (``job.block_threads``,
    when not 0, forces it); cached kernel spectra first. ``in_flight``: blocks per process (None: ``threads //
    block_threads``); ``baseline``: the process's memory before any block. When nothing fits, the last one tried,
    marked as not fitting."""
    from znn.pipeline.dense import memplan

    assert job.memory is not None
    tries = [job.block_threads] if job.block_threads > 0 else [1, job.threads]
    for bt in tries:
        for cache in (True, False):
            modes = memplan.choose_modes(spec, outsz, cache) if job.modes == "optimize" else job.modes
            est = memplan.block_estimate(spec, outsz, modes, cache)
            peak = est.total(in_flight or max(1, job.threads // bt), baseline)
            if peak <= job.memory:
                return BlockFit(bt, cache, est.modes, peak, True)
    return BlockFit(bt, cache, est.modes, peak, False)


def _chosen(job: EngineJob, net: Network) -> tuple[EngineJob, Row]:
    """The job with the configuration ``job.choose`` picks for ``job.memory`` (see :class:`EngineJob`), and what was
    predicted (``fits`` False: do not run)."""
    from znn.pipeline.dense.memplan import PatchSearch, process_rss
    from znn.pipeline.dense.plan import MemoryBudget, memory_plan

    budget = job.memory
    assert budget is not None
    if job.choose == "fit":
        fit = fit_block(net.spec, job.outsz, job, process_rss())
        job = replace(job, block_threads=fit.block_threads, spectra_cache=fit.spectra_cache)
        return job, {"predicted_bytes": fit.predicted, "fits": fit.fits, "block_threads": fit.block_threads,
                     "spectra_cache": fit.spectra_cache, "modes": fit.modes}
    plan = memory_plan(net.spec, MemoryBudget(budget, job.threads, True), job.modes,
                       PatchSearch(itemsize=net.dtype.itemsize))
    assert plan.chosen is not None
    threads = max(1, job.threads // plan.in_flight)
    job = replace(job, outsz=plan.chosen.outsz, block_threads=threads, spectra_cache=plan.chosen.spectra_cache)
    return job, {"predicted_bytes": plan.predicted_peak, "fits": True}


def _znn(job: EngineJob, net: Network, x: dict[str, np.ndarray]) -> tuple[float, float, np.ndarray, Row]:
    from znn.pipeline.dense.plan import BlockPlan
    from znn.pipeline.forward.autotune import inference_modes
    from znn.pipeline.run.schedulers import single_threaded_kernels

    modes = inference_modes(net.spec, job.outsz, job.modes, net.dtype, job.spectra_cache, job.block_threads)
    engine = BlockPlan(net, job.outsz, modes, job.spectra_cache, job.block_threads).make_evaluator()
    blocks = max(1, job.threads // job.block_threads)
    t0 = time.perf_counter()
    engine.warm()  # kernel spectra: made once per process in a dense run, so not timed
    spectra_s = time.perf_counter() - t0
    out: list[np.ndarray] = []
    with ThreadPoolExecutor(max_workers=blocks) as pool, single_threaded_kernels():
        def run() -> None:
            results = list(pool.map(lambda _: engine.forward(x), range(blocks)))
            out[:] = [results[0][net.spec.outputs[0]]]

        seconds, first = time_runs(run, job.repeat, long=math.inf)
    info = {"block_threads": job.block_threads, "blocks": blocks, "modes": modes, "spectra_cache": job.spectra_cache,
            "spectra_s": round(spectra_s, 2)}
    return seconds, first, out[0], info


def _torch(job: EngineJob, net: Network, x: dict[str, np.ndarray]) -> tuple[float, float, np.ndarray, Row]:
    import torch

    from znn.bench.torchnet import build_torch_net, to_tensors

    torch.set_num_threads(job.threads)
    model = build_torch_net(net, job.outsz)
    tx = to_tensors(x)
    out: list[Any] = []

    def run() -> None:
        with torch.no_grad():
            out[:] = [model(tx)[net.spec.outputs[0]]]

    seconds, first = time_runs(run, job.repeat)
    return seconds, first, out[0][0].numpy(), {"blocks": 1}


def _ort(job: EngineJob, net: Network, x: dict[str, np.ndarray]) -> tuple[float, float, np.ndarray, Row]:
    from znn.bench.onnxnet import run_session, session

    assert job.onnx is not None
    sess = session(job.onnx, job.threads)
    out: list[np.ndarray] = []

    def run() -> None:
        out[:] = [run_session(sess, x)[net.spec.outputs[0]]]

    seconds, first = time_runs(run, job.repeat)
    return seconds, first, out[0], {"blocks": 1}


_RUNS = {"znn": _znn, "torch": _torch, "ort": _ort}


def run_job(job: EngineJob) -> Row:
    """Run ``job`` in this process (meant to be a fresh one, see the module docstring); the result as a row."""
    from znn.pipeline.dense.memplan import peak_rss, process_rss

    net = bench_net(job.net, job.seed)
    planned: Row = {}
    if job.engine == "znn" and job.choose is not None:
        job, planned = _chosen(job, net)
        if not planned["fits"]:
            return {"engine": job.engine, "outsz": list(job.outsz), **planned}
    x = bench_inputs(net.spec, job.outsz, job.seed)
    start_rss = process_rss()
    seconds, first, out, info = _RUNS[job.engine](job, net, x)
    if job.output is not None:
        np.save(job.output, out)
    vox = info["blocks"] * math.prod(job.outsz)
    return {"engine": job.engine, "outsz": list(job.outsz), "seconds": round(seconds, 6), "first_s": round(first, 2),
            "vox_s": round(vox / seconds), "peak_rss": peak_rss(), "start_rss": start_rss, **planned, **info}


def main(argv: list[str] | None = None) -> int:
    """``python -m znn.bench.engines JOB.json``: run the job, print its row as the last line of stdout."""
    args = sys.argv[1:] if argv is None else argv
    row = run_job(EngineJob.from_json(Path(args[0]).read_text()))
    print(json.dumps(row), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- in the parent


def rss_of(pid: int) -> int:
    """Resident memory of process ``pid`` now, in bytes (Linux VmRSS; 0 where unknown or gone)."""
    return proc_bytes(f"/proc/{pid}/status", "VmRSS")


def _child_env() -> dict[str, str]:
    """This environment, with the folder holding this znn first on PYTHONPATH (the child imports the same znn)."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


def _watch(proc: subprocess.Popen[Any], limits: Limits) -> str | None:
    """Wait for ``proc``; kill it over ``limits``. Why it was killed, or None."""
    t0 = time.perf_counter()
    while proc.poll() is None:
        if time.perf_counter() - t0 > limits.seconds:
            proc.kill()
            proc.wait()
            return f"killed after {limits.seconds:.0f} s (time cap)"
        if rss_of(proc.pid) > limits.rss:
            proc.kill()
            proc.wait()
            return f"killed at {limits.rss / 2**30:.1f} GiB resident (the machine's memory)"
        time.sleep(POLL_S)
    return None


def run_engine(job: EngineJob, limits: Limits, workdir: Path) -> Row:
    """Run ``job`` in a fresh ``python -m znn.bench.engines`` process under ``limits``; its row, or a row with
    ``note`` saying why there is no measurement (killed, or failed with the last line of its error)."""
    workdir.mkdir(parents=True, exist_ok=True)
    tag = f"{job.engine}-{job.net}-{'x'.join(map(str, job.outsz))}-{time.monotonic_ns()}"
    job_file, out_file, err_file = (workdir / f"{tag}.{ext}" for ext in ("json", "out", "err"))
    job_file.write_text(job.to_json())
    with open(out_file, "w") as out, open(err_file, "w") as err:  # files, not pipes: a chatty child never blocks
        proc = subprocess.Popen([sys.executable, "-m", "znn.bench.engines", str(job_file)], stdout=out, stderr=err,
                                text=True, env=_child_env())
        killed = _watch(proc, limits)
    if killed is not None:
        return {"engine": job.engine, "outsz": list(job.outsz), "note": killed}
    lines = out_file.read_text().strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = err_file.read_text().strip().splitlines()
        return {"engine": job.engine, "outsz": list(job.outsz),
                "note": f"failed (exit {proc.returncode}): {tail[-1] if tail else 'no output'}"}
    row: Row = json.loads(lines[-1])
    return row


def relative_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max |ours - theirs| / max |theirs|."""
    return float(np.abs(ours - theirs).max() / max(1e-30, float(np.abs(theirs).max())))


def load_output(job: EngineJob) -> np.ndarray | None:
    """The output the child of ``job`` saved, or None."""
    if job.output is None or not Path(job.output).exists():
        return None
    out: np.ndarray = np.load(job.output)
    return out


if __name__ == "__main__":
    sys.exit(main())
