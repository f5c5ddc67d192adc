"""`znn forward JOB.cfg` (dense inference of a job's forward_range) and `znn plan JOB.cfg --memory 8GB`.

The job keys used: ``fnet_spec`` (optional check of the checkpoint), ``forward_net``, ``fdata_spec``,
``forward_range``, ``forward_outsz`` (z,y,x or ``auto``: the planner's pick), ``forward_conv_mode``,
``output_prefix``, ``output_format``, ``is_bd_mirror``, ``out_type``/``cost_fn`` (for ``--transform auto``),
``scheduler`` (``--scheduler`` overrides it; see :func:`~znn.pipeline.schedulers.resolve_scheduler`),
``num_threads``, ``dtype``, ``spectra_cache``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from znn.errors import ConfigError, ShapeError, ZnnFileNotFoundError
from znn.io.config import Job, load_job
from znn.network import Network
from znn.pipeline import memplan
from znn.pipeline.inference import (
    TRANSFORMS,
    InferenceResult,
    InputFile,
    export_outputs,
    infer_volume,
    output_paths,
    output_shape,
    resolve_transform,
)
from znn.pipeline.schedulers import add_scheduler_argument

__all__ = ["register", "load_forward_network", "sample_inputs", "forward_job", "plan_job", "ForwardSetup"]


def load_forward_network(job: Job) -> Network:
    """The network of ``forward_net`` (checked against ``fnet_spec`` when the job names one)."""
    import numpy as np

    from znn.io.checkpoint import load_checkpoint
    from znn.io.netfile import load_network

    path = Path(job.require("forward_net"))
    if not path.is_file():
        raise ZnnFileNotFoundError(f"{job.path}: forward_net = {path}: no such network checkpoint; give the .h5 "
                                   "file written by training (train_net_prefix ..._current.h5)")
    spec = load_network(job.fnet_spec) if job.fnet_spec else None
    return load_checkpoint(path, spec, dtype=np.dtype(job.dtype))


def sample_inputs(job: Job, net: Network, sample_id: int) -> dict[str, list[InputFile]]:
    """Input files of sample ``sample_id`` per network input node (the sample's input1, input2, ... in the order of
    the network's input nodes)."""
    from znn.io.specfile import load_spec

    samples = load_spec(job.require("fdata_spec"))
    sample = samples.sample(sample_id)
    nodes = net.spec.inputs
    if len(sample.inputs) != len(nodes):
        raise ConfigError(f"{sample.where}: {len(sample.inputs)} input(s) for a network with {len(nodes)} input "
                          f"node(s) ({', '.join(nodes)}); give input1 .. input{len(nodes)}")
    result: dict[str, list[InputFile]] = {}
    for node, image_id in zip(nodes, sample.inputs):
        images = samples.images[image_id]
        images.check_files()
        result[node] = [InputFile(str(f), pp) for f, pp in zip(images.fnames, images.pp_types)]
    return result


def _modes(job: Job, net: Network, outsz: Any, cache: bool, block_threads: int) -> Any:
    """``forward_conv_mode``; ``optimize`` is resolved per layer by timing both modes of the phase evaluator that
    dense inference runs, on this block's shapes and threads (:func:`~znn.pipeline.autotune.inference_modes`)."""
    from znn.pipeline.autotune import inference_modes

    return inference_modes(net.spec, outsz, job.forward_conv_mode, net.dtype, cache, block_threads)


def _volume_out(job: Job, files: dict[str, list[InputFile]], net: Network) -> tuple[int, int, int]:
    from znn.io.volume import volume_shape_dtype

    shape, _ = volume_shape_dtype(next(iter(files.values()))[0].path)
    vol = tuple(int(s) for s in shape[-3:]) if len(shape) >= 3 else (1, *shape)
    fov = net.spec.layout((1, 1, 1)).fov
    return output_shape(vol, fov, job.is_bd_mirror)  # type: ignore[arg-type]


def _threaded(scheduler: str) -> bool:
    return scheduler == "threads"


def _in_flight(job: Job, scheduler: str) -> int:
    """Blocks in memory at once in one process: one per thread in-process; one per (single-threaded) worker
    process on a cluster, whose memory the plan is for."""
    from znn.pipeline.schedulers import cores

    return cores(job.num_threads) if _threaded(scheduler) else 1


def _input_itemsize(files: dict[str, list[InputFile]]) -> int:
    from znn.io.volume import volume_shape_dtype

    return max(volume_shape_dtype(f.path)[1].itemsize for fs in files.values() for f in fs)


def default_memory() -> int:
    """Memory the planner may use when none is given: what the OS reports available, less 10%."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(int(line.split()[1]) * 1024 * 0.9)
    except OSError:
        pass
    return 8 << 30


def plan_job(job: Job, memory: int | None, net: Network | None = None, sample_id: int | None = None,
             baseline: int | None = None, scheduler: str | None = None) -> memplan.MemoryPlan:
    """The memory plan of the job's network for its first forward sample (or ``sample_id``), for the blocks one
    process holds on ``scheduler`` (resolved with the job's key and dask config when not given)."""
    from znn.pipeline.schedulers import resolve_scheduler

    scheduler = resolve_scheduler(scheduler, job)
    net = net or load_forward_network(job)
    sample_id = sample_id if sample_id is not None else job.require("forward_range")[0]
    files = sample_inputs(job, net, sample_id)
    modes = job.forward_conv_mode
    budget = memory if memory is not None else default_memory()
    cache = None if job.spectra_cache else False
    options: dict[str, Any] = {"volume_out": _volume_out(job, files, net), "itemsize": net.dtype.itemsize,
                               "input_itemsize": _input_itemsize(files), "spectra_cache": cache}
    if _threaded(scheduler):  # one block per thread, or all threads on bigger blocks
        return memplan.plan_parallel(net.spec, budget, _in_flight(job, scheduler), baseline, modes, **options)
    return memplan.plan_memory(net.spec, budget, _in_flight(job, scheduler), baseline, modes, **options)


@dataclass
class ForwardSetup:
    """What `znn forward` decided for one sample before running it."""

    sample: int
    outsz: tuple[int, int, int]
    spectra_cache: bool
    modes: Any
    transform: str
    plan: memplan.MemoryPlan | None
    block_threads: int = 1


def forward_job(job: Job, transform: str = "auto", memory: int | None = None, outsz: Any = None,
                fresh: bool = False, progress: Any = True,
                on_setup: Callable[[ForwardSetup], None] | None = None,
                scheduler: str | None = None) -> list[InferenceResult]:
    """Run the job's forward pass over every sample of ``forward_range``; returns one result per sample.

    ``scheduler`` (``--scheduler``) overrides the job's key (:func:`~znn.pipeline.schedulers.resolve_scheduler`);
    one runner (one cluster for ``local``) serves every sample."""
    from znn.pipeline.schedulers import make_runner, resolve_scheduler

    scheduler = resolve_scheduler(scheduler, job)
    net = load_forward_network(job)
    samples = job.require("forward_range")
    prefix = job.require("output_prefix")
    transform = resolve_transform(transform, net.spec, job.out_type, job.cost_fn)
    with make_runner(scheduler, job.num_threads) as runner:
        return [_forward_sample(job, net, sample, prefix, transform, memory, outsz, fresh, progress, on_setup,
                                scheduler, runner) for sample in samples]


def _forward_sample(job: Job, net: Network, sample: int, prefix: str, transform: str, memory: int | None,
                    outsz: Any, fresh: bool, progress: Any, on_setup: Callable[[ForwardSetup], None] | None,
                    scheduler: str, runner: Any) -> InferenceResult:
    files = sample_inputs(job, net, sample)
    patch = outsz or job.forward_outsz
    plan = None
    cache = bool(job.spectra_cache)
    block_threads = 1
    if patch == "auto" or memory is not None:
        plan = plan_job(job, memory, net, sample, scheduler=scheduler)
        assert plan.chosen is not None
        if patch == "auto":
            patch = plan.chosen.outsz
            cache = cache and plan.chosen.spectra_cache
            if _threaded(scheduler):
                block_threads = max(1, _in_flight(job, scheduler) // plan.in_flight)
        else:
            est = memplan.block_estimate(net.spec, patch, job.forward_conv_mode if job.forward_conv_mode !=
                                         "optimize" else "fft", cache, net.dtype.itemsize)
            if cache and est.total(plan.in_flight, plan.baseline) > plan.budget:
                cache = False  # kernel spectra do not fit beside the blocks: recompute them per block
    patch = tuple(int(v) for v in patch)
    modes = _modes(job, net, patch, cache, block_threads)
    setup = ForwardSetup(sample, patch, cache, modes, transform, plan, block_threads)  # type: ignore[arg-type]
    if on_setup is not None:
        on_setup(setup)
    store = output_paths(prefix, sample, "zarr", net.spec.outputs)
    store_dir = Path(next(iter(store.values()))).parent
    result = infer_volume(net, files, store_dir, patch, mirror=job.is_bd_mirror, modes=modes,
                          transform=transform, scheduler=runner, num_threads=job.num_threads,
                          spectra_cache=cache, progress=progress, fresh=fresh, block_threads=block_threads)
    if job.output_format != "zarr":
        export_outputs(result, output_paths(prefix, sample, job.output_format, net.spec.outputs))
    return result


# ------------------------------------------------------------------------------------------------------ CLI
def _triple_or_auto(text: str) -> Any:
    if text == "auto":
        return "auto"
    from znn.cli import parse_triple

    return parse_triple(text)


def _memory(text: str) -> int:
    try:
        return memplan.parse_bytes(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:  # type: ignore[type-arg]
    p = sub.add_parser("forward", help="dense inference of a job's forward_range into zarr/h5/tif outputs",
                       description="Run the job's forward_net densely over every sample of forward_range. Output: "
                       "<output_prefix>_sample<N>_output.zarr (resumable; a rerun skips finished blocks), plus .h5 "
                       "or .tif with output_format.")
    p.add_argument("job", help="a .cfg job file")
    p.add_argument("--transform", choices=TRANSFORMS, default="auto",
                   help="output transform over channels (auto: softmax for softmax-trained boundary nets, sigmoid for "
                        "affinity/binomial nets, none for square loss)")
    p.add_argument("--memory", type=_memory, help="memory budget, e.g. 8GB (plans forward_outsz = auto and decides "
                                                   "whether kernel spectra are cached)")
    p.add_argument("--outsz", type=_triple_or_auto, help="output block z,y,x (or auto); overrides forward_outsz")
    p.add_argument("--fresh", action="store_true", help="ignore finished blocks and recompute everything")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_scheduler_argument(p)
    q = sub.add_parser("plan", help="predict memory per output block and pick the largest patch that fits",
                       description="Predict the peak memory of dense inference for candidate FFT-friendly output "
                       "patches and pick the largest that fits --memory.")
    q.add_argument("job", help="a .cfg job file")
    q.add_argument("--memory", type=_memory, help="memory budget, e.g. 8GB (default: available memory)")
    add_scheduler_argument(q)
    return {"forward": _cmd_forward, "plan": _cmd_plan}


def _cmd_forward(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    job = load_job(args.job)

    def show(setup: ForwardSetup) -> None:
        how = "planned" if setup.plan is not None and setup.plan.chosen and setup.plan.chosen.outsz == setup.outsz \
            else "given"
        peak = f", predicted peak {memplan.format_bytes(setup.plan.predicted_peak)}" if setup.plan else ""
        print(f"sample {setup.sample}: output block {','.join(map(str, setup.outsz))} ({how}, "
              f"{setup.block_threads} thread(s) per block), kernel spectra "
              f"{'cached' if setup.spectra_cache else 'recomputed per block'}, transform {setup.transform}{peak}",
              file=sys.stderr, flush=True)

    results = forward_job(job, args.transform, args.memory, args.outsz, args.fresh, not args.quiet, show,
                          args.scheduler)
    for r in results:
        print(f"{r.store}: {r.blocks_total} blocks, {r.blocks_skipped} skipped (already done), {r.blocks_run} run in "
              f"{r.seconds:.1f} s, {r.voxels_per_second:,.0f} voxels/s", flush=True)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    try:
        plan = plan_job(job, args.memory, scheduler=args.scheduler)
    except ShapeError as exc:
        raise ShapeError(f"{args.job}: {exc}") from None
    print(plan.table())
    assert plan.chosen is not None
    print(f"chosen: forward_outsz = {','.join(map(str, plan.chosen.outsz))} (predicted peak "
          f"{memplan.format_bytes(plan.predicted_peak)}, kernel spectra "
          f"{'cached' if plan.chosen.spectra_cache else 'recomputed per block'})")
    return 0
