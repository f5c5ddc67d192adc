"""`znn forward JOB.cfg` (dense inference of a job's forward_range) and `znn plan JOB.cfg --memory 8GB`.

The job keys used: ``fnet_spec`` (optional check of the checkpoint), ``forward_net``, ``fdata_spec``,
``forward_range``, ``forward_outsz`` (z,y,x or ``auto``: the planner's pick), ``forward_conv_mode``,
``output_prefix``, ``output_format``, ``is_bd_mirror``, ``out_type``/``cost_fn`` (for ``--transform auto``),
``scheduler`` (``--scheduler`` overrides it; see :func:`~znn.pipeline.run.schedulers.resolve_scheduler`),
``num_threads``, ``dtype``, ``spectra_cache``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from znn.errors import ConfigError, ZnnFileNotFoundError
from znn.io.config import Job
from znn.network import Network
from znn.pipeline.dense import memplan
from znn.pipeline.dense.grid import output_shape
from znn.pipeline.dense.inputs import InputFile
from znn.pipeline.dense.outputs import (
    export_outputs,
    output_paths,
    resolve_transform,
)
from znn.pipeline.dense.volume import InferenceResult, infer_volume

__all__ = ["register", "load_forward_network", "sample_inputs", "forward_job", "plan_job", "ForwardSetup"]


def load_forward_network(job: Job) -> Network:
    """The network of ``forward_net`` (checked against ``fnet_spec`` when the job names one), as dense inference runs
    it: its sliding-window twin (:meth:`~znn.network.Network.sliding_window`; max_pool edges become max filters)."""
    import numpy as np

    from znn.io.checkpoint import load_checkpoint
    from znn.io.netfile import load_network

    path = Path(job.require("forward_net"))
    if not path.is_file():
        raise ZnnFileNotFoundError(f"{job.path}: forward_net = {path}: no such network checkpoint; give the .h5 "
                                   "file written by training (train_net_prefix ..._current.h5)")
    spec = load_network(job.fnet_spec) if job.fnet_spec else None
    return load_checkpoint(path, spec, dtype=np.dtype(job.dtype)).sliding_window()


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
    dense inference runs, on this block's shapes and threads (:func:`~znn.pipeline.forward.autotune.inference_modes`)."""
    from znn.pipeline.forward.autotune import inference_modes

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
    from znn.pipeline.run.schedulers import cores

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
    from znn.pipeline.run.schedulers import resolve_scheduler

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

    ``scheduler`` (``--scheduler``) overrides the job's key (:func:`~znn.pipeline.run.schedulers.resolve_scheduler`);
    one runner (one cluster for ``local``) serves every sample."""
    from znn.pipeline.run.schedulers import make_runner, resolve_scheduler

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
