"""Dense-inference throughput (output voxels per second) of ZNNi's 80-map networks, beside PyTorch and ONNX Runtime.

Networks (``workflows/inference/``): ``n337`` (7 convs of 3x3x3, three 2x2x2 max filters) and ``n726`` (6 convs of
7x7x7, two max filters), 80 maps, 3 outputs; the layer lists of ZNNi's ``networks/337.znni`` and ``276.znni``
(Zlateski, Lee, Seung 2016), written as ZNN sparse (max-filter) networks so they give dense output; ``tiny3d`` (8
maps) for a quick run.

Engines, each in a fresh process per output patch (:mod:`znn.bench.engines`) so that its peak resident memory
(VmHWM) is measured, not predicted; the same weights (``--seed``) and the same input patch everywhere:

* ``znn``: what `znn forward` does per block (the dense plan's block evaluator, kernel spectra made once per process
  so not timed), ``--threads / --block-threads`` blocks at once, each on ``--block-threads`` threads; throughput =
  blocks x output voxels / wall time. With ``--scheduler local`` or an address it is instead dense inference
  (:func:`~znn.pipeline.dense.volume.infer_volume`) of a synthetic volume of two blocks per worker on that dask
  cluster (`znn bench scaling` compares worker counts);
* ``torch``: the same network in PyTorch (:mod:`znn.bench.torchnet`), ``torch.set_num_threads(--threads)``;
* ``ort``: that PyTorch module exported to ONNX (:mod:`znn.bench.onnxnet`) and run by ONNX Runtime on the CPU
  execution provider, ``--threads`` intra-op threads, one inter-op thread.

Three tables:

1. each engine at each output cube of ``--outsz`` (ascending), with znn/peer ratios and the relative difference of
   the outputs. znn runs a cube when the memory plan predicts it fits ``--memory``; a peer runs every cube unless its
   measured growth predicts one pass over ``--time-cap`` seconds or a peak over the machine's available memory (a
   run is killed at either), or a smaller cube did not finish. Then each peer grows its cube past its largest run
   (:func:`~znn.bench.growth.next_side`: by up to 4/3 in side while its measured growth predicts the next peak
   within ``--memory`` and one pass within ``--time-cap``; a failed or killed run stops it; not with ``--no-grow``):
   those rows are marked ``(grown)``, with that peer's figures only;
2. each engine at the largest patch it fits into ``--memory``: for znn the dense planner's own choice for that
   budget (patch, blocks x threads per block, spectra cache, conv modes: what ``znn forward --memory`` runs); for a
   peer the largest cube of table 1 (listed or grown) whose measured peak fits. Each znn/peer ratio names the two
   patches it compares;
3. the plan's choice beside alternatives at the same patch (every core on one block, one block per core, all
   layers in FFT mode): which was fastest within ``--memory``, and plan / best.

Medians over ``--repeat`` runs after an untimed warm-up. Run ``znn bench forward --help``.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from znn.bench.common import Column, Row, installed, mode_names, plain_cell, rows_table
from znn.bench.engines import (
    EngineJob,
    Limits,
    bench_net,
    fit_block,
    load_output,
    relative_difference,
    run_engine,
)
from znn.bench.growth import MAX_GROWN, Point, largest_fit, next_side, skip_reason
from znn.bench.scaling import DenseWork, block_grid_shape, measure, synthetic_volume
from znn.environment import available_memory
from znn.network import Network
from znn.pipeline.dense import memplan
from znn.pipeline.run.schedulers import Runner, make_runner, resolve_scheduler
from znn.spec import NetworkSpec
from znn.text import format_bytes, parse_bytes
from znn.types import Triple

__all__ = ["NETWORKS", "CHOICES", "ForwardBenchRequest", "run_forward_bench", "format_table", "progress_line"]

NETWORKS = ("n337", "n726")  # the default networks (names in znn.bench.networks)
CHOICES = ("n337", "n726", "tiny3d")
TARGETS = {"n337": 1.5, "n726": 2.0}  # issue 14: znn / ONNX Runtime at each engine's largest patch in 16 GB
DEFAULT_SIDES = (16, 32, 48, 64, 96)  # output cube sides
PEERS = ("torch", "ort")
TITLES = {"znn": "znn", "torch": "PyTorch", "ort": "ONNX Runtime"}
STARTUP_S = 120.0  # a child's allowance beyond its passes: interpreter, imports, network, planning


@dataclass(frozen=True)
class ForwardBenchRequest:
    """What to time. ``sides``: output cube sides (None: :data:`DEFAULT_SIDES`). ``modes``: optimize (timed per
    layer, as the dense planner does), fft or direct. ``memory``: bytes an engine may use. ``block_threads``: threads
    per znn block in table 1 (None: 1 if one block per thread fits, else ``threads``). ``scheduler`` (resolved by
    :func:`~znn.pipeline.run.schedulers.resolve_scheduler`; default threads): ``threads`` times blocks in a child
    process, ``synchronous`` the same on one thread, ``local`` or an address dense inference on a dask cluster.
    ``torch``/``ort``: run these peers (when installed). ``time_cap``: seconds of one pass above which a patch is
    skipped (predicted) or killed. ``alternatives``: table 3. ``machine_memory``: where children are killed (None:
    the machine's available memory at the start). ``grow``: search each peer's largest patch in ``memory`` past
    ``sides`` (False: its largest listed cube that fits)."""

    nets: Sequence[str] = NETWORKS
    sides: Sequence[int] | None = None
    threads: int = 2
    repeat: int = 2
    modes: str = "optimize"
    memory: int = parse_bytes("16GB")
    torch: bool = True
    seed: int = 0
    block_threads: int | None = None
    scheduler: str | None = None
    ort: bool = True
    time_cap: float = 300.0
    alternatives: bool = True
    machine_memory: int | None = None
    grow: bool = True


@dataclass
class _Bench:
    """A request with where it runs (the resolved scheduler; the cluster's runner, None: in child processes), the
    peers that run, the folder of the children's files, the memory where children are killed, notes, and what runs
    one job in a child (``run``)."""

    request: ForwardBenchRequest
    where: str
    runner: Runner | None
    workdir: Path
    machine: int
    peers: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    run: Callable[[EngineJob, Limits, Path], Row] = run_engine

    def limits(self) -> Limits:
        return Limits(STARTUP_S + (self.request.repeat + 1) * self.request.time_cap, self.machine)


def run_forward_bench(request: ForwardBenchRequest = ForwardBenchRequest(),
                      progress: Callable[[Row], None] | None = None,
                      run: Callable[[EngineJob, Limits, Path], Row] = run_engine) -> list[Row]:
    """Rows of the three tables (``kind``: ``patch``, ``largest``, ``config``) and ``note`` rows. ``run``: runs one
    job in a child process under its limits (:func:`~znn.bench.engines.run_engine`; tests pass a fake)."""
    where = resolve_scheduler(request.scheduler, None)
    if where == "synchronous":
        request = replace(request, threads=1, block_threads=1)
    runner = None if where in ("threads", "synchronous") else make_runner(where, request.threads)
    if runner is not None:
        request = replace(request, block_threads=1)  # single-threaded worker processes, one block each
    try:
        with tempfile.TemporaryDirectory(prefix="znn-bench-forward-") as tmp:
            machine = request.machine_memory or available_memory()
            bench = _Bench(request, where, runner, Path(tmp), machine, run=run)
            bench.peers = _peers(request, bench.notes)
            rows = [row for name in request.nets for row in _net_rows(bench, name, progress)]
            return rows + [{"kind": "note", "text": text} for text in bench.notes]
    finally:
        if runner is not None:
            runner.close()


def _peers(request: ForwardBenchRequest, notes: list[str]) -> tuple[str, ...]:
    """The peers that run; a note for each that does not, saying why."""
    peers = []
    if not request.torch:
        notes.append("PyTorch not run (--no-torch)")
    elif not installed("torch"):
        notes.append("PyTorch not run: torch is not installed (pip install 'znn[bench]')")
    else:
        peers.append("torch")
    missing = [m for m in ("onnxruntime", "onnx", "torch") if not installed(m)]
    if not request.ort:
        notes.append("ONNX Runtime not run (--no-ort)")
    elif missing:
        notes.append(f"ONNX Runtime not run: {', '.join(missing)} not installed (the export needs torch and onnx; "
                     "pip install 'znn[bench]')")
    else:
        from znn.bench.onnxnet import EXPORTER

        notes.append(f"ONNX Runtime: the PyTorch module exported by {EXPORTER}; CPUExecutionProvider, "
                     f"{request.threads} intra-op thread(s), 1 inter-op")
        peers.append("ort")
    return tuple(peers)


def _net_rows(bench: _Bench, name: str, progress: Callable[[Row], None] | None) -> list[Row]:
    net = bench_net(name, bench.request.seed)
    sides = sorted({int(s) for s in (bench.request.sides or DEFAULT_SIDES)})
    onnx = _export(bench, name, net, sides) if "ort" in bench.peers else None
    history: dict[str, list[Point]] = {e: [] for e in ("znn", *PEERS)}
    measured: dict[str, list[Row]] = {e: [] for e in PEERS}
    rows = []
    for side in sides:
        row = _patch_row(bench, name, net, (side, side, side), history, onnx, measured)
        rows.append(row)
        _report(progress, row)
    if bench.request.grow:
        grown: dict[int, Row] = {}
        for peer in bench.peers:
            if peer != "ort" or onnx is not None:
                _grow(bench, name, net, peer, history[peer], onnx, measured[peer], grown, progress)
        rows = sorted(rows + list(grown.values()), key=lambda r: r["outsz"][0])
    for row in _largest_and_configs(bench, name, net, measured):
        rows.append(row)
        if progress is not None and row.get("vox_s") is not None:
            progress(row)
    return rows


def _report(progress: Callable[[Row], None] | None, row: Row) -> None:
    """A table-1 row to ``progress`` once some engine has a measurement in it."""
    if progress is not None and any(row.get(f"{e}_vox_s") is not None for e in ("znn", *PEERS)):
        progress(row)


def _export(bench: _Bench, name: str, net: Network, sides: Sequence[int]) -> Path | None:
    """The network's ONNX model (spatial axes dynamic), or None with a note when the export fails."""
    from znn.bench.onnxnet import export_onnx

    try:
        return export_onnx(net, bench.workdir / f"{name}.onnx", [(s, s, s) for s in sides])
    except Exception as exc:  # noqa: BLE001 -- any exporter failure only drops the ONNX Runtime column
        bench.notes.append(f"{name}: ONNX export failed ({type(exc).__name__}: {exc}); ONNX Runtime not run")
        return None


def _voxels(spec: NetworkSpec, outsz: Sequence[int]) -> int:
    return math.prod(spec.layout(tuple(outsz)).input_patch[spec.inputs[0]])


def _measure(bench: _Bench, history: list[Point], job: EngineJob, spec: NetworkSpec) -> Row:
    """``job`` in a child unless the engine's growth says skip; its row (``note`` when there is no measurement)."""
    voxels = _voxels(spec, job.outsz)
    reason = skip_reason(history, voxels, bench.request.time_cap, bench.machine)
    if reason is not None:
        return {"engine": job.engine, "outsz": list(job.outsz), "note": reason}
    row = bench.run(job, bench.limits(), bench.workdir)
    if row.get("vox_s") is None:
        history.append(Point(voxels, failed=True))
    else:
        history.append(Point(voxels, float(row["seconds"]), int(row["peak_rss"])))
    return row


# ---------------------------------------------------------------------------------------------- table 1


def _patch_head(bench: _Bench, name: str, outsz: Triple) -> Row:
    """A table-1 row before any engine's figures."""
    return {"kind": "patch", "net": name, "outsz": list(outsz), "threads": bench.request.threads,
            "repeat": bench.request.repeat, "scheduler": bench.where}


def _base_job(bench: _Bench, name: str, outsz: Triple) -> EngineJob:
    """znn's job at ``outsz`` as table 1 runs it; a peer's is this with its engine, output and model."""
    request = bench.request
    return EngineJob("znn", name, outsz, request.threads, request.repeat, request.seed, modes=request.modes,
                     memory=request.memory, block_threads=request.block_threads or 0)


def _peer_job(bench: _Bench, base: EngineJob, peer: str, onnx: Path | None, spec: NetworkSpec,
              output: Path | None) -> EngineJob:
    """``peer``'s job at the patch of ``base`` (``onnx``: the dynamic model, for ``ort``), saving to ``output``."""
    model = _static(onnx, spec, base.outsz, bench.workdir) if peer == "ort" and onnx else None
    return replace(base, engine=peer, output=None if output is None else str(output),
                   onnx=None if model is None else str(model))


def _patch_row(bench: _Bench, name: str, net: Network, outsz: Triple, history: dict[str, list[Point]],
               onnx: Path | None, measured: dict[str, list[Row]]) -> Row:
    spec = net.spec
    row = _patch_head(bench, name, outsz)
    tag = f"{name}-{outsz[0]}"
    base = _base_job(bench, name, outsz)
    ours = None
    if bench.runner is not None:
        _time_znn_cluster(bench, net, outsz, row)
    else:
        job = replace(base, output=str(bench.workdir / f"znn-{tag}.npy"), choose="fit")
        result = _measure(bench, history["znn"], job, spec)
        row.update({k: result[k] for k in ("block_threads", "spectra_cache", "predicted_bytes", "fits") if k in result})
        row["modes"] = mode_names(result["modes"]) if "modes" in result else None
        _fill(row, "znn", result)
        ours = load_output(job)
    for peer in bench.peers:
        if peer == "ort" and onnx is None:
            continue
        job = _peer_job(bench, base, peer, onnx, spec, bench.workdir / f"{peer}-{tag}.npy")
        result = _measure(bench, history[peer], job, spec)
        _fill(row, peer, result)
        if result.get("vox_s") is not None:
            measured[peer].append(result)
        theirs = load_output(job)
        if ours is not None and theirs is not None and row.get("znn_vox_s") and row.get(f"{peer}_vox_s"):
            row[f"{peer}_ratio"] = round(row["znn_vox_s"] / row[f"{peer}_vox_s"], 2)
            row[f"{peer}_diff"] = relative_difference(ours, theirs)
    return row


def _grow(bench: _Bench, name: str, net: Network, peer: str, history: list[Point], onnx: Path | None,
          measured: list[Row], grown: dict[int, Row], progress: Callable[[Row], None] | None) -> None:
    """Run ``peer`` at larger cubes than its largest run while :func:`~znn.bench.growth.next_side` finds one in
    ``--memory`` (and the machine's) and ``--time-cap``, at most :data:`~znn.bench.growth.MAX_GROWN` times; each
    run into ``grown``'s row of its side (``grown``: True; peers that grow to one side share it), each measurement
    onto ``measured`` (marked ``grown``). No output is saved: znn did not run there to compare with."""
    spec, request = net.spec, bench.request
    memory = min(request.memory, bench.machine)  # a patch may fit the budget but not this machine

    def after(side: int | None) -> int | None:
        return None if side is None else next_side(history, side, lambda s: _voxels(spec, (s, s, s)),
                                                   request.time_cap, memory)

    side = after(max((r["outsz"][0] for r in measured), default=None))
    for _ in range(MAX_GROWN):
        if side is None:
            return
        outsz = (side, side, side)
        row = grown.setdefault(side, dict(_patch_head(bench, name, outsz), grown=True))
        result = _measure(bench, history, _peer_job(bench, _base_job(bench, name, outsz), peer, onnx, spec, None),
                          spec)
        _fill(row, peer, result)
        _report(progress, row)
        if result.get("vox_s") is None:  # failed or killed (next_side would stop too), or skipped (no new point)
            return
        measured.append(dict(result, grown=True))
        side = after(side)
    if side is not None:
        bench.notes.append(f"{name}: {TITLES[peer]} stopped growing after {MAX_GROWN} grown patches (the most the "
                           f"bench tries); its largest patch in {format_bytes(request.memory)} may be larger")


def _static(onnx: Path, spec: NetworkSpec, outsz: Triple, workdir: Path) -> Path:
    from znn.bench.onnxnet import static_copy

    return static_copy(onnx, workdir / f"{onnx.stem}-{outsz[0]}.onnx", spec.layout(outsz).input_patch)


def _fill(row: Row, engine: str, result: Row) -> None:
    """``result`` of ``engine`` into ``row`` under ``<engine>_...`` keys (znn also its configuration)."""
    if result.get("vox_s") is None:
        if result.get("fits", True):  # not fitting the memory is the table's "does not fit", not a note
            row[f"{engine}_note"] = result.get("note", "not run")
        return
    row.update({f"{engine}_vox_s": result["vox_s"], f"{engine}_s": result["seconds"],
                f"{engine}_rss": result["peak_rss"]})
    if engine == "znn":
        row.update(modes=mode_names(result["modes"]), spectra_s=result["spectra_s"])


def _time_znn_cluster(bench: _Bench, net: Network, outsz: Triple, row: Row) -> None:
    """Dense inference of a synthetic volume of two blocks per worker on the runner's cluster (see
    :func:`znn.bench.scaling.measure`), one block per single-threaded worker at a time, when that fits."""
    runner, request = bench.runner, bench.request
    assert runner is not None
    job = EngineJob("znn", "", outsz, request.threads, request.repeat, modes=request.modes, memory=request.memory,
                    block_threads=1)
    fit = fit_block(net.spec, outsz, job, memplan.process_rss(), in_flight=1)
    row.update(block_threads=1, spectra_cache=fit.spectra_cache, predicted_bytes=fit.predicted, fits=fit.fits,
               modes=mode_names(fit.modes))
    if not fit.fits:
        return
    with tempfile.TemporaryDirectory(prefix="znn-bench-", dir=bench.workdir) as tmp:
        shape = block_grid_shape(2 * max(1, runner.workers), outsz)
        volume = synthetic_volume(Path(tmp) / "input.zarr", shape, request.seed)
        modes = request.modes if request.modes == "optimize" else fit.modes
        work = DenseWork(net, volume, outsz, modes, fit.spectra_cache)
        dense = measure([runner], work, request.repeat, Path(tmp))[0]
    row.update(znn_s=dense["seconds"], znn_vox_s=round(dense["voxels_s"]), workers=runner.workers,
               blocks=dense["blocks"])


# ---------------------------------------------------------------------------------------------- tables 2 and 3


def _patch_label(outsz: Sequence[int]) -> str:
    """An output patch in a ratio's label: ``128^3`` for a cube."""
    return f"{outsz[0]}^3" if len(set(outsz)) == 1 else "x".join(map(str, outsz))


def _ratio(plan: Row, peer: str, found: Row) -> Row:
    """znn's plan over ``peer`` at its largest patch ``found``, with the two patches it compares (``znn_outsz``;
    the peer's is the row's ``outsz``) and the label the table prints them with (``ratio_of``)."""
    return {"ratio": round(plan["vox_s"] / found["vox_s"], 2), "znn_outsz": plan["outsz"],
            "ratio_of": f"znn {_patch_label(plan['outsz'])} vs {TITLES[peer]} {_patch_label(found['outsz'])}"}


def _config_label(row: Row) -> str:
    blocks, threads = row.get("blocks", 1), row.get("block_threads", 1)
    return f"{blocks} block{'s' if blocks > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"


def _largest_and_configs(bench: _Bench, name: str, net: Network, measured: dict[str, list[Row]]) -> list[Row]:
    request = bench.request
    rows: list[Row] = []
    plan: Row | None = None
    if bench.runner is not None:
        bench.notes.append(f"{name}: the plan's choice and its alternatives are timed only without a cluster "
                           "(--scheduler threads)")
    else:
        job = EngineJob("znn", name, (1, 1, 1), request.threads, request.repeat, request.seed, modes=request.modes,
                        memory=request.memory, choose="plan")
        plan = bench.run(job, bench.limits(), bench.workdir)
        if plan.get("vox_s") is None:
            bench.notes.append(f"{name}: the plan's choice for {format_bytes(request.memory)} did not run: "
                               f"{plan.get('note')}")
            plan = None
    best = {"znn": plan, **{p: largest_fit(measured[p], request.memory) for p in bench.peers}}
    for engine, found in best.items():
        row: Row = {"kind": "largest", "net": name, "engine": engine, "memory": request.memory,
                    "grow": request.grow}
        if found is None:
            row["config"] = "did not run" if engine == "znn" else "no measured patch fits"
        else:
            row.update(outsz=found["outsz"], vox_s=found["vox_s"], peak_rss=found["peak_rss"],
                       fits=found["peak_rss"] <= request.memory, grown=found.get("grown", False),
                       config=_config_label(found) if engine == "znn" else f"{request.threads} threads")
            if plan is not None and engine != "znn" and found["vox_s"] > 0:
                row.update(_ratio(plan, engine, found))
        rows.append(row)
    if plan is not None:
        rows += _configs(bench, name, net, plan)
    return rows


def _alternatives(request: ForwardBenchRequest, plan: Row) -> list[tuple[int, str]]:
    """(threads per block, modes) of the alternatives to the plan's choice: every core on one block, one block per
    core, all layers in FFT mode with the plan's threads (without repeats, nor the plan's own)."""
    tries = [(1, request.modes), (request.threads, request.modes), (plan["block_threads"], "fft")]
    found: list[tuple[int, str]] = []
    for t in tries:
        if t != (plan["block_threads"], request.modes) and t not in found:
            found.append(t)
    return found


def _configs(bench: _Bench, name: str, net: Network, plan: Row) -> list[Row]:
    """Table 3 for one network: the plan's choice and each alternative at its patch, the fastest marked."""
    request = bench.request
    outsz = (plan["outsz"][0], plan["outsz"][1], plan["outsz"][2])
    results = [dict(plan, plan=True)]
    for bt, modes in _alternatives(request, plan) if request.alternatives else []:
        blocks = max(1, request.threads // bt)
        est = memplan.block_estimate(net.spec, outsz, "fft" if modes == "optimize" else modes, plan["spectra_cache"])
        peak = est.total(blocks, plan.get("start_rss", 0))
        job = EngineJob("znn", name, outsz, request.threads, request.repeat, request.seed, block_threads=bt,
                        modes=modes, spectra_cache=plan["spectra_cache"])
        if peak > bench.machine:
            results.append({"outsz": list(outsz), "block_threads": bt, "blocks": blocks, "modes": modes,
                            "all_fft": modes == "fft" and request.modes != "fft",
                            "note": f"skipped (predicted {format_bytes(peak)} > the machine's memory)"})
        else:
            results.append(dict(bench.run(job, bench.limits(), bench.workdir), block_threads=bt, blocks=blocks,
                                predicted_bytes=peak, all_fft=modes == "fft" and request.modes != "fft"))
    timed = [r for r in results if r.get("vox_s") is not None]
    within = [r for r in timed if r.get("peak_rss", 0) <= request.memory] or timed
    fastest = max(within, key=lambda r: r["vox_s"]) if within else None
    rows = []
    for r in results:
        label = _config_label(r) + (", all fft" if r.get("all_fft") else "")
        row: Row = {"kind": "config", "net": name, "outsz": list(outsz), "config": label,
                    "modes": mode_names(r["modes"]) if r.get("modes") is not None else "-",
                    "spectra_cache": plan["spectra_cache"], "vox_s": r.get("vox_s"), "peak_rss": r.get("peak_rss"),
                    "predicted_bytes": r.get("predicted_bytes"),
                    "fits": r["peak_rss"] <= request.memory if r.get("peak_rss") else None,
                    "plan": bool(r.get("plan")), "fastest": r is fastest, "note": r.get("note")}
        if row["plan"] and fastest is not None:
            row["plan_over_best"] = round(plan["vox_s"] / fastest["vox_s"], 2)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- tables


def progress_line(row: Row) -> str:
    """One line on a row just measured, for the progress output."""
    if row.get("kind") == "patch":
        rates = ", ".join(f"{TITLES[e]} {row.get(f'{e}_vox_s') or row.get(f'{e}_note', '-')}"
                          for e in ("znn", *PEERS) if f"{e}_vox_s" in row or f"{e}_note" in row)
        return f"  {row['net']} {row['outsz']}{' (grown)' if row.get('grown') else ''}: {rates} vox/s"
    what = row.get("engine") or row.get("config")
    return f"  {row['net']} {row.get('kind')} {what} {row.get('outsz')}: {row.get('vox_s')} vox/s"


def _short(note: str | None) -> str:
    """A skipped or failed run in a table cell."""
    if not note:
        return "-"
    for start, text in (("skipped (time", "time cap"), ("skipped (memory", "memory"), ("skipped (a smaller", "-"),
                        ("skipped (predicted", "memory"), ("killed after", "killed: time"),
                        ("killed at", "killed: memory"), ("failed", "failed")):
        if note.startswith(start):
            return text
    return "-"


_PATCH = (Column("net", "net"), Column("outsz", "output"), Column("block_threads", "thr/block"),
          Column("modes", "conv modes"), Column("spectra_cache", "spectra"), Column("predicted_bytes", "plan mem"),
          Column("znn_vox_s", "znn vox/s", "{:,}"), Column("znn_rss", "znn peak"),
          Column("torch_vox_s", "torch vox/s", "{:,}"), Column("torch_rss", "torch peak"),
          Column("ort_vox_s", "ORT vox/s", "{:,}"), Column("ort_rss", "ORT peak"),
          Column("torch_ratio", "znn/torch", "{:.2f}"), Column("ort_ratio", "znn/ORT", "{:.2f}"),
          Column("torch_diff", "diff torch", "{:.1e}"), Column("ort_diff", "diff ORT", "{:.1e}"))
_LARGEST = (Column("net", "net"), Column("engine", "engine"), Column("outsz", "output"),
            Column("config", "configuration"), Column("vox_s", "vox/s", "{:,}"), Column("peak_rss", "peak RSS"),
            Column("fits", "in memory"), Column("ratio", "znn/this", "{:.2f}"))
_CONFIG = (Column("net", "net"), Column("outsz", "output"), Column("config", "configuration"),
           Column("modes", "conv modes"), Column("spectra_cache", "spectra"), Column("vox_s", "vox/s", "{:,}"),
           Column("peak_rss", "peak RSS"), Column("predicted_bytes", "plan mem"), Column("fits", "in memory"),
           Column("mark", ""))


def _cell(row: Row, col: Column) -> str:
    value = row.get(col.key)
    if col.key == "mark":
        return ", ".join(m for m, on in (("plan", row.get("plan")), ("fastest", row.get("fastest"))) if on)
    if value is None:
        if col.key == "znn_vox_s" and not row.get("fits", True):
            return "does not fit"
        if col.key.endswith("vox_s"):
            return _short(row.get(col.key.replace("vox_s", "note")))
        return "-"
    if col.key in ("predicted_bytes", "peak_rss") or col.key.endswith("_rss"):
        return format_bytes(value)
    if col.key == "spectra_cache":
        return "cached" if value else "per block"
    if col.key == "fits":
        return "yes" if value else "no"
    if col.key == "engine":
        return TITLES.get(value, str(value))
    if col.key == "outsz" and row.get("grown"):
        return f"{plain_cell(value, col.fmt)} (grown)"
    if col.key == "ratio" and row.get("ratio_of"):
        return f"{value:.2f}x ({row['ratio_of']})"
    return plain_cell(value, col.fmt)


def format_table(rows: Sequence[Row]) -> str:
    """The three tables (those with rows), each with what it measured, then the notes."""
    patch = [r for r in rows if r.get("kind", "patch") == "patch"]
    largest = [r for r in rows if r.get("kind") == "largest"]
    config = [r for r in rows if r.get("kind") == "config"]
    lines: list[str] = []
    if patch:
        first = patch[0]
        lines += [f"each engine at each output patch: output voxels/s, {first['threads']} threads, median of "
                  f"{first['repeat']}; znn runs {first['threads']} // thr/block blocks at once, the peers one patch; "
                  "peak = VmHWM of a fresh process per engine and patch"
                  + ("; (grown): a peer's patch past --outsz, on the way to its largest in the memory"
                     if any(r.get("grown") for r in patch) else ""), rows_table(_PATCH, patch, _cell)]
        if first.get("scheduler", "threads") not in ("threads", "synchronous"):
            lines.append(f"znn here: dense inference on the dask cluster {first['scheduler']} "
                         f"({first.get('workers', '?')} worker(s), one block per single-threaded worker at a time, "
                         "two blocks per worker), not --threads // thr/block")
    if largest:
        search = "listed or grown" if largest[0].get("grow", True) else "listed (--no-grow)"
        lines += ["", f"each engine at the largest patch it fits into {format_bytes(largest[0]['memory'])} (znn: the "
                  f"plan's choice; peers: the largest {search} patch whose measured peak fits); targets "
                  f"znn/ONNX Runtime >= {TARGETS}", rows_table(_LARGEST, largest, _cell)]
    if config:
        lines += ["", "the plan's choice beside the alternatives the bench tried at its patch",
                  rows_table(_CONFIG, config, _cell)]
        lines += [f"{r['net']}: plan {r['config']} {r['vox_s']:,} vox/s; plan / best within the memory = "
                  f"{r['plan_over_best']:.2f}" + ("" if r["fits"] else " (the plan's own peak is over the memory)")
                  for r in config if r.get("plan") and r.get("plan_over_best") is not None]
    notes = [r["text"] for r in rows if r.get("kind") == "note"]
    notes += [f"{r['net']} {r.get('outsz')} {r.get('engine') or r.get('config')}: {r['note']}"
              for r in rows if r.get("kind") == "config" and r.get("note")]
    notes += [f"{r['net']} {r['outsz']} {TITLES[e]}: {r[f'{e}_note']}" for r in patch for e in ("znn", *PEERS)
              if r.get(f"{e}_note")]
    lines += ["", *(f"note: {n}" for n in notes)] if notes else []
    return "\n".join(lines)
