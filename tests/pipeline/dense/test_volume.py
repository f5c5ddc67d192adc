"""Dense inference: tiled output equals the whole-volume forward pass (2D, two-input and 3D networks, mirrored and
valid borders, blocks that do not divide the volume), resume after a kill, redo on new weights, bounded memory on a
volume larger than the process may hold, and user errors that name the key or file at fault."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.shared import DATA, REFERENCE, ROOT, need
from znn.errors import ConfigError, ShapeError, ZnnFileNotFoundError
from znn.io.checkpoint import save_checkpoint
from znn.io.config import load_job
from znn.io.netfile import load_network, parse_network
from znn.io.volume import open_volume, read_volume, write_volume
from znn.network import Network
from znn.ops.transform import apply_transform
from znn.pipeline.dense.grid import block_grid
from znn.pipeline.dense.inputs import InputFile, mirror_indices
from znn.pipeline.dense.manifest import MANIFEST_DIR
from znn.pipeline.dense.outputs import resolve_transform
from znn.pipeline.dense.plan import DenseOptions, plan_dense
from znn.pipeline.dense.volume import DenseRequest, InferenceResult, infer_volume
from znn.pipeline.forward.blockgraph import BlockForward
from znn.pipeline.jobs.forward import forward_job

TINY3D = ROOT / "workflows" / "inference" / "tiny3d.znn"
# A 2D network small enough for big volumes: FOV 1,3,3.
TINY2D = """
nodes input
type input
size 1

edges conv1
type conv
init msra
size 1,3,3
input input
output hidden

nodes hidden
type transfer
function rectify_linear
size 3

edges conv2
type conv
init msra
size 1,1,1
input hidden
output output

nodes output
type transfer
function linear
size 1
"""

# A second input and a sum node joining both branches (appended to TINY2D with its last edge renamed).
TWO_INPUTS = """
nodes input-r
type input
size 1

edges convr
type conv
size 1,1,1
input input-r
output output

edges conv3
type conv
size 1,1,1
input second
output output

nodes second
type sum
size 1
"""


def _preprocess(vol: np.ndarray, pp: str) -> np.ndarray:
    """The whole-volume preprocessing (the training side's function when present)."""
    try:
        from znn.ops.preprocess import preprocess_image
    except ImportError:  # pragma: no cover - the module is part of the package
        assert pp == "none"
        return vol.astype(np.float32)
    return preprocess_image(vol, pp)


def _reference(net: Network, volumes: dict[str, np.ndarray], mirror: bool, transform: str = "none",
               mode: str = "fft") -> dict[str, np.ndarray]:
    """The untiled result: the whole (mirror-padded) volume through one forward pass."""
    spec = net.spec
    fovs = spec.layout((1, 1, 1)).input_fov
    big = tuple(max(f[a] for f in fovs.values()) for a in range(3))
    shape = next(iter(volumes.values())).shape[-3:]
    out = tuple(s if mirror else s - f + 1 for s, f in zip(shape, big))
    feed = {}
    for node, vol in volumes.items():
        v = vol if vol.ndim == 4 else vol[None]
        if mirror:
            lo = [(b - 1) // 2 for b in big]
            v = np.pad(v, [(0, 0)] + [(a, b - 1 - a) for a, b in zip(lo, big)], mode="reflect")
        crop = [(b - f) // 2 for b, f in zip(big, fovs[node])]
        ext = [o + f - 1 for o, f in zip(out, fovs[node])]
        feed[node] = np.ascontiguousarray(v[:, crop[0]:crop[0] + ext[0], crop[1]:crop[1] + ext[1],
                                            crop[2]:crop[2] + ext[2]])
    y = BlockForward(net, out, mode, spectra_cache=False).forward(feed)
    return {n: apply_transform(v, transform) for n, v in y.items()}


def _infer(net: Network, inputs: dict, store: Path, outsz: tuple[int, int, int], *, mirror: bool = True,
           modes: str = "fft", evaluator: str = "phases", **request) -> InferenceResult:
    """A dense run of ``net`` planned with these options (the call sites of the tests below)."""
    plan = plan_dense(net, inputs, DenseOptions(outsz, mirror, modes, evaluator=evaluator))
    return infer_volume(DenseRequest(plan, store, **request))


def _isbi(shape: tuple[int, int, int]) -> np.ndarray:
    import tifffile

    vol = tifffile.imread(need(DATA / "isbi2012" / "train-volume.tif"))
    z, y, x = shape
    return np.ascontiguousarray(vol[:z, 100:100 + y, 150:150 + x])


# ------------------------------------------------------------------------------------------------ pieces
@pytest.mark.parametrize("n, lo, hi", [(5, -7, 12), (1, -3, 4), (2, -5, 7), (9, -20, 30)])
def test_mirror_indices_equal_numpy_reflect(n, lo, hi):
    data = np.arange(n)
    padded = np.pad(data, (-lo, hi - n), mode="reflect") if n > 1 else np.zeros(hi - lo, int)
    np.testing.assert_array_equal(data[mirror_indices(lo, hi, n)], padded)


def test_block_grid_writes_every_voxel_once():
    out_shape, patch = (5, 17, 23), (2, 8, 10)
    hits = np.zeros(out_shape, int)
    for index, origin, lo, hi in block_grid(out_shape, patch):
        assert all(0 <= o and o + p <= s for o, p, s in zip(origin, patch, out_shape))  # computed inside
        assert all(o <= a and b <= o + p for o, a, b, p in zip(origin, lo, hi, patch))  # writes what it computed
        assert all(a % p == 0 for a, p in zip(lo, patch))  # one chunk of the patch grid
        hits[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] += 1
    assert (hits == 1).all()


def test_transform_auto():
    spec = load_network(need(REFERENCE / "networks" / "N4_relu.znn"))
    assert resolve_transform("auto", spec, "boundary", "auto") == "softmax"
    assert resolve_transform("auto", spec, "affinity", "auto") == "sigmoid"
    assert resolve_transform("auto", spec, "boundary", "square_loss") == "none"
    assert resolve_transform("sigmoid", spec) == "sigmoid"
    with pytest.raises(ConfigError, match="--transform"):
        resolve_transform("soft", spec)


PASS_THROUGH = """
nodes input
type input
size 1
edges one
type max_filter
size 1,1,1
stride 1,1,1
input input
output t
nodes t
type transfer
function rectify_linear
size 1
edges mx
type maxout
input t
output u
nodes u
type transfer
function tanh
function_args 1,1
size 1
edges conv
type conv
init gaussian
size 2,2,2
input u
output output
nodes output
type transfer
function rectify_linear
size 2
"""


def test_phase_forward_never_writes_into_an_array_it_did_not_make():
    """Transfer nodes behind edges that pass their input through (a 1x1x1 max filter, a maxout of one edge) get
    the bias and transfer function on a copy: the caller's input and the other nodes' values stay as they were."""
    from znn.pipeline.forward.phases import PhaseForward
    from znn.pipeline.forward.sequential import sequential_forward

    net = Network.initialise(parse_network(PASS_THROUGH), seed=4, dtype=np.float64)
    net.biases["t"][:] = 0.25
    net.biases["u"][:] = -0.5
    engine = PhaseForward(net, (3, 4, 5), "fft")
    x = np.random.default_rng(3).standard_normal((1, *engine.input_patch["input"]))
    before = x.copy()
    got = engine.forward({"input": x})["output"]
    np.testing.assert_array_equal(x, before)
    want = sequential_forward(net, {"input": before}, (3, 4, 5))["output"]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, outsz", [("networks/N4_relu.znn", (1, 5, 6)), ("networks/hd3d_strided.znn", (1, 2, 1)),
                                         ("networks/VD2D.znn", (1, 3, 3))])
@pytest.mark.parametrize("mode", ["fft", "direct"])
def test_phase_forward_equals_sequential(name, outsz, mode):
    from znn.pipeline.forward.phases import PhaseForward
    from znn.pipeline.forward.sequential import sequential_forward

    spec = load_network(need(REFERENCE / name))
    net = Network.initialise(spec, seed=1, dtype=np.float64)
    engine = PhaseForward(net, outsz, mode)
    rng = np.random.default_rng(0)
    x = {n: rng.standard_normal((spec.nodes[n].size, *p)) for n, p in engine.input_patch.items()}
    got, want = engine.forward(x), sequential_forward(net, x, outsz)
    for node in spec.outputs:
        np.testing.assert_allclose(got[node], want[node], rtol=1e-10, atol=1e-10 * np.abs(want[node]).max())


# ------------------------------------------------------------------------------------------------ tiled == untiled
def test_n4_isbi_tiled_equals_untiled(tmp_path):
    vol = _isbi((2, 100, 110))
    write_volume(tmp_path / "in.zarr", vol, chunks=(1, 64, 64))
    net = Network.initialise(load_network(need(REFERENCE / "networks" / "N4_relu.znn")), seed=1)
    res = _infer(net, {"input": [InputFile(str(tmp_path / "in.zarr"), "standard2D")]}, tmp_path / "out.zarr",
                 (1, 60, 64), transform="softmax", num_threads=2, progress=False)
    assert res.blocks_total == 2 * 2 * 2 and res.out_shape == (2, 100, 110)
    got = read_volume(res.arrays["output"])
    want = _reference(net, {"input": _preprocess(vol, "standard2D")}, True, "softmax")["output"]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


def test_vd2d3d_two_inputs_tiled_equals_untiled(tmp_path):
    vol = _isbi((2, 20, 22))
    write_volume(tmp_path / "in.h5", vol)
    net = Network.initialise(load_network(need(REFERENCE / "networks" / "VD2D3D.znn")), seed=2)
    files = {"input": [InputFile(str(tmp_path / "in.h5"), "standard2D")],
             "input-r": [InputFile(str(tmp_path / "in.h5"), "standard2D")]}
    res = _infer(net, files, tmp_path / "out.zarr", (2, 12, 15), num_threads=2, progress=False)
    got = read_volume(res.arrays["output"])
    pre = _preprocess(vol, "standard2D")
    want = _reference(net, {"input": pre, "input-r": pre}, True)["output"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("mirror, mode", [(True, "fft"), (False, "direct")])
def test_3d_network_tiled_equals_untiled(tmp_path, mirror, mode):
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 255, (20, 27, 25), dtype=np.uint8)
    write_volume(tmp_path / "in.tif", vol)
    net = Network.initialise(load_network(TINY3D), seed=3)
    res = _infer(net, {"input": [str(tmp_path / "in.tif")]}, tmp_path / "out.zarr", (4, 7, 6),
                 mirror=mirror, modes=mode, num_threads=2, progress=False,
                 evaluator="phases" if mirror else "graph")
    got = read_volume(res.arrays["output"])
    want = _reference(net, {"input": vol.astype(np.float32)}, mirror, mode=mode)["output"]
    assert got.shape == want.shape == (2, *((20, 27, 25) if mirror else (9, 16, 14)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_distributed_cluster_gives_the_same_output(tmp_path, local_client):
    from znn.pipeline.run.schedulers import make_runner

    vol = np.random.default_rng(1).standard_normal((9, 14, 13)).astype(np.float32)
    write_volume(tmp_path / "in.zarr", vol)
    net = Network.initialise(load_network(TINY3D), seed=4)
    files = {"input": [str(tmp_path / "in.zarr")]}
    threads = _infer(net, files, tmp_path / "a.zarr", (5, 7, 7), num_threads=2, progress=False, pyramid=1)
    cluster = _infer(net, files, tmp_path / "b.zarr", (5, 7, 7), scheduler=make_runner(local_client),
                     progress=False, pyramid=1)
    assert cluster.blocks_run == threads.blocks_run == 8
    np.testing.assert_allclose(read_volume(cluster.arrays["output"]), read_volume(threads.arrays["output"]),
                               rtol=0, atol=1e-5)
    # the pyramid's tasks ran on the cluster's workers too, each level from the one below
    np.testing.assert_allclose(read_volume(cluster.pyramid["output"][0]), read_volume(threads.pyramid["output"][0]),
                               rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ jobs, resume
def _job(tmp_path: Path, net: Network, volume: np.ndarray, name: str = "job", **keys: str) -> Path:
    write_volume(tmp_path / "vol.h5", volume, overwrite=True)
    save_checkpoint(tmp_path / "net.h5", net)
    (tmp_path / "data.spec").write_text("[image1]\nfnames = vol.h5\npp_types = standard3D\n\n[sample1]\ninput = 1\n")
    values = {"fdata_spec": "data.spec", "forward_net": "net.h5", "forward_range": "1", "forward_outsz": "4,8,8",
              "output_prefix": "out/run", "is_bd_mirror": "yes", "num_threads": "2", **keys}
    text = "[parameters]\n" + "".join(f"{k} = {v}\n" for k, v in values.items() if v is not None)
    path = tmp_path / f"{name}.cfg"
    path.write_text(text)
    return path


def _done(store: Path) -> int:
    return len([p for p in (store / MANIFEST_DIR / "done").iterdir() if not p.name.startswith(".")])


def test_kill_and_resume_runs_only_unfinished_blocks(tmp_path):
    net = Network.initialise(load_network(TINY3D), seed=5)
    vol = np.random.default_rng(2).integers(0, 200, (12, 30, 30), dtype=np.uint8)
    job = _job(tmp_path, net, vol, scheduler="synchronous", forward_outsz="3,5,5")
    store = tmp_path / "out" / "run_sample1_output.zarr"
    env = {**os.environ, "ZNN_FFTW_PLANNER": "FFTW_ESTIMATE", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "znn.cli", "forward", str(job), "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if (store / MANIFEST_DIR / "done").is_dir() and _done(store) >= 10:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = _done(store)
    total = 4 * 6 * 6
    assert 10 <= finished < total, "the run finished before it could be killed; make the volume larger"
    resumed = forward_job(load_job(job), progress=False)[0]
    assert (resumed.blocks_skipped, resumed.blocks_run) == (finished, total - finished)
    (tmp_path / "fresh").mkdir()
    again = forward_job(load_job(_job(tmp_path / "fresh", net, vol, scheduler="synchronous",
                                      forward_outsz="3,5,5")), progress=False)[0]
    assert again.blocks_run == total
    np.testing.assert_array_equal(read_volume(resumed.arrays["output"]), read_volume(again.arrays["output"]))


def test_new_weights_redo_every_block_and_cli_reports_skips(tmp_path, capsys):
    from znn.cli import main

    net = Network.initialise(load_network(TINY3D), seed=6)
    vol = np.random.default_rng(3).integers(0, 200, (8, 20, 20), dtype=np.uint8)
    job = _job(tmp_path, net, vol, output_format="h5")
    assert main(["forward", str(job), "--quiet"]) == 0
    assert "2 skipped" not in capsys.readouterr().out
    first = read_volume(str(tmp_path / "out" / "run_sample1_output.h5") + ":/output")
    assert main(["forward", str(job), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "18 blocks, 18 skipped (already done), 0 run" in out
    save_checkpoint(tmp_path / "net.h5", Network.initialise(net.spec, seed=7))
    redo = forward_job(load_job(job), progress=False)[0]
    assert (redo.blocks_skipped, redo.blocks_run) == (0, 18)
    second = read_volume(str(tmp_path / "out" / "run_sample1_output.h5") + ":/output")
    assert first.shape == second.shape == (2, 8, 20, 20) and not np.allclose(first, second)


def test_auto_outsz_uses_the_plan(tmp_path):
    net = Network.initialise(load_network(TINY3D), seed=8)
    vol = np.random.default_rng(4).integers(0, 200, (10, 30, 30), dtype=np.uint8)
    job = load_job(_job(tmp_path, net, vol, forward_outsz="auto"))
    seen = []
    from znn.pipeline.dense.memplan import process_rss

    res = forward_job(job, memory=process_rss() + (400 << 20), progress=False, on_setup=seen.append)[0]
    assert seen[0].plan is not None and seen[0].outsz == seen[0].plan.chosen.outsz == res.outsz
    assert min(res.blocks_total, 2 // seen[0].block_threads) * seen[0].block_threads == 2  # both threads work


# ------------------------------------------------------------------------------------------------ errors
def test_errors_name_the_key_or_file(tmp_path):
    net = Network.initialise(load_network(TINY3D), seed=9)
    vol = np.zeros((4, 6, 6), np.uint8)
    with pytest.raises(ConfigError, match="forward_net"):
        forward_job(load_job(_job(tmp_path, net, vol, forward_net=None)), progress=False)
    with pytest.raises(ZnnFileNotFoundError, match="forward_net = .*missing.h5"):
        forward_job(load_job(_job(tmp_path, net, vol, forward_net="missing.h5")), progress=False)
    with pytest.raises(ShapeError, match="is_bd_mirror"):
        forward_job(load_job(_job(tmp_path, net, vol, is_bd_mirror="no")), progress=False)
    with pytest.raises(ConfigError, match="output_prefix"):
        forward_job(load_job(_job(tmp_path, net, vol, output_prefix=None)), progress=False)
    with pytest.raises(ZnnFileNotFoundError, match="nowhere.tif"):
        _infer(net, {"input": ["nowhere.tif"]}, tmp_path / "x.zarr", (1, 1, 1), progress=False)
    two = Network.initialise(parse_network(TINY2D.replace("input hidden\noutput output", "input hidden\noutput second") + TWO_INPUTS))
    with pytest.raises(ConfigError, match="input-r"):
        _infer(two, {"input": [str(tmp_path / "vol.h5")]}, tmp_path / "y.zarr", (1, 1, 1), progress=False)
    from znn.cli import main

    assert main(["forward", str(_job(tmp_path, net, vol, forward_net=None))]) == 2


# ------------------------------------------------------------------------------------------------ memory
_MEMORY_SCRIPT = textwrap.dedent("""
    import json, os, resource, sys
    import numpy as np
    from znn.io.netfile import parse_network
    from znn.network import Network
    from znn.pipeline.dense import memplan, volume as inference
    from znn.pipeline.dense.plan import DenseOptions, plan_dense

    def vm():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    text, volume, store, extra = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    net = Network.initialise(parse_network(open(text).read()), seed=0)
    import dask.threaded, zarr, numcodecs, threadpoolctl  # noqa: F401  (what the run imports anyway)
    limit = vm() + extra
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    base = memplan.process_rss()
    from znn.io.volume import volume_shape_dtype
    search = memplan.PatchSearch(volume_out=volume_shape_dtype(volume)[0], input_itemsize=1)
    plan = memplan.plan_memory(net.spec, base + extra // 2, in_flight=2, baseline=base, search=search)
    dense = plan_dense(net, {"input": [volume]},
                       DenseOptions(plan.chosen.outsz, spectra_cache=plan.chosen.spectra_cache))
    res = inference.infer_volume(inference.DenseRequest(dense, store, num_threads=2, progress=False))
    peak = memplan.peak_rss()  # not ru_maxrss: that includes the pytest process this one was forked from
    print(json.dumps({"baseline": base, "predicted": plan.predicted_peak, "peak": peak, "limit_extra": extra,
                      "outsz": plan.chosen.outsz, "blocks": res.blocks_run}))
""")


@pytest.mark.slow
def test_volume_larger_than_memory_runs_within_the_plan(tmp_path):
    import zarr

    shape = (16, 4096, 4096)  # 256 MiB of uint8 in, 1 GiB of float32 out
    z = zarr.create_array(str(tmp_path / "big.zarr"), shape=shape, chunks=(1, 1024, 1024), dtype="uint8")
    rng = np.random.default_rng(0)
    for i in range(shape[0]):
        z[i] = rng.integers(0, 255, shape[1:], dtype=np.uint8)
    extra = 256 << 20  # address space the run may add to what the imports took: the whole input volume
    (tmp_path / "tiny.znn").write_text(TINY2D)
    script = tmp_path / "run.py"
    script.write_text(_MEMORY_SCRIPT)
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "ZNN_FFTW_PLANNER": "FFTW_ESTIMATE", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "tiny.znn"), str(tmp_path / "big.zarr"),
                          str(tmp_path / "out.zarr"), str(extra)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    print(stats)
    output = open_volume(tmp_path / "out.zarr" / "output")
    # neither the input (all the address space the run may add) nor the output (four times it) can be held whole
    assert np.prod(shape) >= extra and output.nbytes >= 2 * extra
    assert stats["peak"] <= 1.2 * stats["predicted"]
    sample = output[:, 11, 2000:2040, 4050:].compute()
    assert np.isfinite(sample).all() and np.abs(sample).max() > 0
