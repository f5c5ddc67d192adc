"""`znn forward JOB.cfg` (dense inference of a job's forward_range) and `znn plan JOB.cfg --memory 8GB`.

The job keys used: ``fnet_spec`` (optional check of the checkpoint), ``forward_net``, ``fdata_spec``,
``forward_range``, ``forward_outsz`` (z,y,x or ``auto``: the planner's pick), ``forward_conv_mode``,
``output_prefix``, ``output_format``, ``is_bd_mirror``, ``out_type``/``cost_fn`` (for ``--transform auto``),
``scheduler`` (``--scheduler`` overrides it; see :func:`~znn.pipeline.run.schedulers.resolve_scheduler`),
``num_threads``, ``dtype``, ``spectra_cache``, ``resolution`` and ``pyramid`` (``--pyramid`` sets it).

Every output is an OME-Zarr image (:mod:`znn.io.ngff`). Its voxel size is the ``resolution`` of the sample's first
input ``[imageN]`` section, else the job's ``resolution``, else what the first input volume's own metadata says
(an OME-Zarr scale, an h5 ``resolution``/``element_size_um`` attribute), else unknown (scale 1, no unit). Its
``znn`` attribute records the network file and checkpoint (path, sha256), the job file, the sample, its inputs,
the output transform and znn's version.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from znn import environment
from znn.environment import cores
from znn.errors import ZnnFileNotFoundError
from znn.io.config import Job
from znn.io.locks import RunLock, lock_beside
from znn.io.ngff import ImageMeta, Resolution, provenance
from znn.io.paths import check_apart, check_writable
from znn.io.sample_nodes import bind_sample
from znn.io.specfile import SampleSpec, VolumeSet, load_spec
from znn.io.stores import check_h5_export, check_output_store
from znn.io.volume import parse_volume_path
from znn.network import Network
from znn.pipeline.dense import memplan
from znn.pipeline.dense.inputs import InputFile
from znn.pipeline.dense.outputs import (
    export_outputs,
    output_paths,
    resolve_transform,
)
from znn.pipeline.dense.plan import (
    DenseOptions,
    DensePlan,
    MemoryBudget,
    memory_plan,
    patch_search,
    plan_dense,
)
from znn.pipeline.dense.volume import DenseRequest, InferenceResult, infer_volume
from znn.pipeline.run.schedulers import Runner, make_runner, resolve_scheduler
from znn.text import format_bytes
from znn.types import Triple

__all__ = ["load_forward_network", "ForwardSample", "forward_samples", "sample_inputs", "forward_job", "plan_job",
           "ForwardSetup", "default_memory", "capped_memory", "check_forward_places", "output_resolution",
           "job_provenance", "output_image"]

log = logging.getLogger("znn.forward")


def load_forward_network(job: Job) -> Network:
    """The network of ``forward_net`` (checked against ``fnet_spec`` when the job names one). Dense planning
    (:func:`~znn.pipeline.dense.plan.plan_dense`, :func:`~znn.pipeline.dense.plan.patch_search`) runs its
    sliding-window twin."""
    import numpy as np

    from znn.io.checkpoint import load_checkpoint
    from znn.io.netfile import load_network

    path = Path(job.require("forward_net"))
    if not path.is_file():
        raise ZnnFileNotFoundError(f"{job.path}: forward_net = {path}: no such network checkpoint; give the .h5 "
                                   "file written by training (train_net_prefix ..._current.h5)")
    spec = load_network(job.fnet_spec) if job.fnet_spec else None
    return load_checkpoint(path, spec, dtype=np.dtype(job.dtype))


@dataclass(frozen=True)
class ForwardSample:
    """One sample of a forward job, bound to the network's input nodes once: planning, the place checks and the
    outputs' metadata all read this, so the sample file is read once per run and each sample bound once."""

    id: int
    inputs: dict[str, list[InputFile]]  # per network input node, its files (checked to exist)
    resolution: Resolution | None  # the outputs' voxel size (see :func:`output_resolution`; None: unknown)


def forward_samples(job: Job, net: Network, sample_ids: Sequence[int]) -> list[ForwardSample]:
    """Samples ``sample_ids`` of the job's ``fdata_spec``, read once and each bound to ``net``'s input nodes."""
    spec = load_spec(job.require("fdata_spec"))
    samples = []
    for sample_id in sample_ids:
        images = _sample_images(spec, net, sample_id)
        samples.append(ForwardSample(sample_id, _input_files(images), output_resolution(job, images)))
    return samples


def _sample_images(spec: SampleSpec, net: Network, sample_id: int) -> dict[str, VolumeSet]:
    """The ``[imageN]`` section feeding each network input node of sample ``sample_id``, its files checked to
    exist."""
    sample = bind_sample(spec, sample_id, net.spec)
    images = {node: spec.images[image_id] for node, image_id in zip(net.spec.inputs, sample.inputs)}
    for section in images.values():
        section.check_files()
    return images


def _input_files(images: Mapping[str, VolumeSet]) -> dict[str, list[InputFile]]:
    return {node: [InputFile(str(f), pp) for f, pp in zip(section.fnames, section.pp_types)]
            for node, section in images.items()}


def sample_inputs(job: Job, net: Network, sample_id: int) -> dict[str, list[InputFile]]:
    """Input files of sample ``sample_id`` per network input node (the sample's keys name the nodes, ``input = 1``,
    ``input-r = 2``, or number them ``input1, input2, ...`` in the network's order; see
    :mod:`znn.io.sample_nodes`); errors name the spec file, section and key, and list the network's nodes."""
    return _input_files(_sample_images(load_spec(job.require("fdata_spec")), net, sample_id))


def output_resolution(job: Job, images: Mapping[str, VolumeSet]) -> Resolution | None:
    """The voxel size of a sample's outputs, of its ``images`` per input node: the first input section's
    ``resolution``, else the job's, else the first input volume's own (None: unknown)."""
    from znn.io.volume import volume_resolution

    first = next(iter(images.values()))
    found: Resolution | None = first.resolution or job.resolution
    if found is None and first.fnames and "://" not in str(first.fnames[0]):
        found = volume_resolution(first.fnames[0])
    return found


def job_provenance(job: Job) -> dict[str, Any]:
    """What every output of the job records of where it came from: the network file, the checkpoint (each hashed
    once per run) and the job file; :func:`output_image` adds the sample's part."""
    return provenance(network=job.fnet_spec, checkpoint=job.forward_net, job=job.path)


def output_image(made_by: Mapping[str, Any], sample: ForwardSample, transform: str, dtype: str) -> ImageMeta:
    """The OME-Zarr metadata of ``sample``'s outputs: voxel size and provenance, the job's (``made_by``, see
    :func:`job_provenance`) with the sample, its inputs, the transform and ``dtype`` (the dense run adds the
    origin)."""
    inputs = {node: [f.path for f in files] for node, files in sample.inputs.items()}
    made = {**made_by, "sample": sample.id, "inputs": inputs, "transform": transform, "dtype": dtype}
    return ImageMeta(sample.resolution, provenance=made)


def default_memory() -> int:
    """Memory the planner may use when none is given: what the OS reports available, less 10% (8 GiB where the OS
    does not say)."""
    return _usable(environment.available_memory()) or 8 << 30


def _usable(available: int) -> int:
    """What the planner may take of ``available`` bytes: 10% stays free for what the memory model leaves out."""
    return int(available * 0.9)


def capped_memory(memory: int | None, scheduler: str, workers: int) -> tuple[int, str | None]:
    """The budget one process of a run on ``scheduler`` plans for: ``memory`` (None: the default), but no more than
    this machine's available memory less 10%, split among the ``workers`` processes of a ``local`` cluster (a block
    planned for memory the machine does not have gets the process killed by the kernel); and the one line that
    says so when ``memory`` was more. Not capped where the run is elsewhere (a scheduler's address) or the OS does
    not say what is available."""
    available = environment.available_memory()
    if "://" in scheduler or not available:
        return (default_memory() if memory is None else memory), None
    share = _usable(available) // (workers if scheduler == "local" else 1)
    if memory is None or memory <= share:
        return (share if memory is None else memory), None
    asked, planned = f"memory {format_bytes(memory)}", format_bytes(share)
    if scheduler == "local":
        asked, planned = f"{asked} per worker process x {workers} workers", f"{planned} per worker process"
    return share, (f"{asked} is more than this machine can give: {format_bytes(available)} available less 10%; "
                   f"planning for {planned}")


def _memory_budget(job: Job, scheduler: str, memory: int | None, baseline: int | None = None) -> MemoryBudget:
    """``memory`` (default: what is available; never more) for the blocks one process holds on ``scheduler``: one
    per thread in-process; one per (single-threaded) worker process on a cluster, whose memory the plan is for."""
    budget, note = capped_memory(memory, scheduler, cores(job.num_threads))
    if note is not None:
        log.warning(note)
    return MemoryBudget(budget, cores(job.num_threads), scheduler == "threads", baseline)


def plan_job(job: Job, memory: int | None, net: Network | None = None, sample_id: int | None = None,
             baseline: int | None = None, scheduler: str | None = None) -> memplan.MemoryPlan:
    """The memory plan of the job's network for its first forward sample (or ``sample_id``), for the blocks one
    process holds on ``scheduler`` (resolved with the job's key and dask config when not given)."""
    scheduler = resolve_scheduler(scheduler, job)
    net = (net or load_forward_network(job)).sliding_window()
    sample_id = sample_id if sample_id is not None else job.require("forward_range")[0]
    search = patch_search(net, sample_inputs(job, net, sample_id), job.is_bd_mirror, bool(job.spectra_cache))
    return memory_plan(net.spec, _memory_budget(job, scheduler, memory, baseline), job.forward_conv_mode, search)


@dataclass
class ForwardSetup:
    """What `znn forward` decided for one sample before running it: its dense plan and output transform."""

    sample: int
    transform: str
    dense: DensePlan

    @property
    def outsz(self) -> Triple:
        return self.dense.outsz

    @property
    def spectra_cache(self) -> bool:
        return self.dense.block.spectra_cache

    @property
    def modes(self) -> Any:
        return self.dense.block.modes

    @property
    def block_threads(self) -> int:
        return self.dense.block.block_threads

    @property
    def plan(self) -> memplan.MemoryPlan | None:
        """The memory plan behind the block, when one was made (``auto`` block, or a memory budget)."""
        return self.dense.memory


@dataclass(frozen=True)
class _ForwardRun:
    """What every sample of one forward job shares."""

    job: Job
    net: Network
    transform: str
    made_by: dict[str, Any]  # the job's part of every output's provenance (:func:`job_provenance`)
    options: DenseOptions
    runner: Runner
    progress: Any
    fresh: bool
    on_setup: Callable[[ForwardSetup], None] | None
    notes: TextIO | None


def forward_job(job: Job, transform: str = "auto", memory: int | None = None, outsz: Any = None,
                fresh: bool = False, progress: Any = True,
                on_setup: Callable[[ForwardSetup], None] | None = None,
                scheduler: str | None = None, notes: TextIO | None = None) -> list[InferenceResult]:
    """Run the job's forward pass over every sample of ``forward_range``; returns one result per sample.

    ``memory`` (a budget in bytes) plans ``forward_outsz = auto`` and whether kernel spectra are cached; ``outsz``
    overrides ``forward_outsz``. ``scheduler`` (``--scheduler``) overrides the job's key
    (:func:`~znn.pipeline.run.schedulers.resolve_scheduler`); one runner (one cluster for ``local``) serves every
    sample. Progress and what a local cluster started go to ``notes`` (None: stderr)."""
    scheduler = resolve_scheduler(scheduler, job)
    net = load_forward_network(job)
    job.require("output_prefix")
    # every sample bound before any runs: a missing section or file of the last one must not wait for the others
    samples = forward_samples(job, net, job.require("forward_range"))
    check_forward_places(job, net, samples)
    transform = resolve_transform(transform, net.spec, job.out_type, job.cost_fn)
    patch = outsz or job.forward_outsz
    budget = _memory_budget(job, scheduler, memory) if patch == "auto" or memory is not None else None
    options = DenseOptions(patch, job.is_bd_mirror, job.forward_conv_mode, bool(job.spectra_cache), memory=budget)
    note = None if notes is None else functools.partial(print, file=notes, flush=True)
    with make_runner(scheduler, job.num_threads, note) as runner:
        run = _ForwardRun(job, net, transform, job_provenance(job), options, runner, progress, fresh, on_setup,
                          notes)
        return [_forward_sample(run, sample) for sample in samples]


def _forward_sample(run: _ForwardRun, sample: ForwardSample) -> InferenceResult:
    job, outputs = run.job, run.net.spec.outputs
    prefix = job.require("output_prefix")
    store = _output_store(prefix, sample.id, outputs)
    # the store's lock covers its exports too (infer_volume takes it again, re-entrantly)
    with RunLock(lock_beside(store), f"output store {store}"):
        plan = plan_dense(run.net, sample.inputs, run.options)
        if run.on_setup is not None:
            run.on_setup(ForwardSetup(sample.id, run.transform, plan))
        image = output_image(run.made_by, sample, run.transform, job.dtype)
        result = infer_volume(DenseRequest(plan, store, run.transform, run.runner, job.num_threads, run.progress,
                                           run.fresh, image, job.pyramid, run.notes))
        if job.output_format != "zarr":
            export_outputs(result, output_paths(prefix, sample.id, job.output_format, outputs))
    return result


def _output_store(prefix: str | Path, sample: int, outputs: Sequence[str]) -> Path:
    """The zarr store of sample ``sample``'s outputs (its arrays are ``<store>/<node>``)."""
    return Path(next(iter(output_paths(prefix, sample, "zarr", outputs).values()))).parent


def check_forward_places(job: Job, net: Network, samples: Sequence[ForwardSample]) -> None:
    """Before any work: every sample's output store (and h5/tif export) can be written where ``output_prefix``
    puts it, and none of them is, holds or lies inside a file the job reads (its volumes, network, job files)."""
    prefix, fmt, nodes = job.require("output_prefix"), job.output_format, net.spec.outputs
    fix = f"{job.path}: change output_prefix"
    outputs: list[tuple[str, str | Path]] = []
    for sample in (s.id for s in samples):
        store = check_output_store(_output_store(prefix, sample, nodes), f"sample {sample} output store", fix)
        outputs.append((f"sample {sample} output store", store))
        if fmt != "zarr":
            for target in output_paths(prefix, sample, fmt, nodes).values():
                export = check_writable(parse_volume_path(target).file, f"sample {sample} {fmt} export", False, fix)
                if fmt == "h5":
                    check_h5_export(export, f"sample {sample} h5 export", fix)
                outputs.append((f"sample {sample} {fmt} export", target))
    check_apart(outputs, _forward_inputs(job, samples), fix)


def _forward_inputs(job: Job, samples: Sequence[ForwardSample]) -> list[tuple[str, str | Path]]:
    """Every file a forward job reads: its volumes (of every sample), its network and its job files."""
    read = (("forward_net", job.forward_net), ("fnet_spec", job.fnet_spec), ("fdata_spec", job.fdata_spec))
    files: list[tuple[str, str | Path]] = [(key, path) for key, path in read if path]
    if job.path is not None:
        files.append(("the job file", job.path))
    for sample in samples:
        for node, inputs in sample.inputs.items():
            files += [(f"sample {sample.id}'s {node} volume", f.path) for f in inputs]
    return files
