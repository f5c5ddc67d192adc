"""The forward contract: every evaluator gives each dense output voxel the value of the plain network on that
voxel's own window (its field of view), as :func:`~znn.pipeline.forward.sequential.sequential_forward` computes it.

One base class holds the cases and the check; each evaluator is a subclass that only says how it computes a dense
output patch. Cases: every network of ``../shared/znn-reference/networks`` and ``benchmark`` (skipped with a
reason without ``../shared``) and the bundled ones in ``workflows/``: 2D and 3D, with ``max_pool`` edges
(``hd3d_strided``) and without, with two inputs of different FOVs (``VD2D3D``). Dense evaluators run the network's
sliding-window twin (:meth:`~znn.network.Network.sliding_window`; dense inference makes it itself), the reference
the network as written. Maps are shrunk to at most two per node group (kernels, strides, pooling and FOV as
written) and the patches are small, so the whole file runs in well under a minute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from tests.shared import REFERENCE, ROOT, need
from znn.io.netfile import load_network
from znn.io.volume import read_volume, write_volume
from znn.network import Network
from znn.pipeline.dense.grid import input_offsets
from znn.pipeline.dense.inputs import InputFile
from znn.pipeline.dense.plan import DenseOptions, plan_dense
from znn.pipeline.dense.volume import DenseRequest, infer_volume
from znn.pipeline.forward.blockgraph import BlockForward
from znn.pipeline.forward.phases import PhaseForward
from znn.pipeline.forward.sequential import sequential_forward
from znn.spec import NetworkSpec
from znn.types import Triple

OUTSZ_3D: Triple = (2, 3, 3)
OUTSZ_2D: Triple = (1, 3, 4)
MAX_MAPS = 2
# float64 throughout: FFT and direct convolutions agree with the reference to rounding, relative to the largest value
RTOL = 1e-9
# A case whose reference costs more than this many multiply-adds per map pair in its first layer (FOV voxels times
# kernel taps: the 2D benchmarks' 20x20 to 40x40 kernels over FOVs of 365 to 745 voxels across, n726 and 3d_7's
# 7x7x7 over 118^3) takes seconds per output voxel with direct convolutions: it runs with the slow tests, and its
# reference convolves by FFT (tested against scipy.signal in tests/ops; the windows are what this file checks).
SLOW_WORK = 100_000_000


def _network_files() -> list[Path | None]:
    """Every case's .znn file; None stands for the ../shared networks when ../shared is absent (the case skips)."""
    bundled = sorted((ROOT / "workflows").glob("*/*.znn"))
    if not REFERENCE.exists():
        return [None, *bundled]
    files: list[Path | None] = [*sorted(REFERENCE.glob("networks/*.znn")), *sorted(REFERENCE.glob("benchmark/*.znn"))]
    return files + bundled


def _case_id(path: Path | None) -> str:
    return "shared-networks" if path is None else f"{path.parent.name}/{path.stem}"


def _reference_work(path: Path) -> int:
    spec = load_network(path)
    fov = max(math.prod(f) for f in spec.layout().input_fov.values())
    return fov * max(math.prod(spec.edges[e].size) for e in spec.conv_edges())


def _param(path: Path | None) -> object:
    slow = path is not None and _reference_work(path) > SLOW_WORK
    return pytest.param(path, id=_case_id(path), marks=[pytest.mark.slow] if slow else [])


FILES = [_param(p) for p in _network_files()]


@dataclass(frozen=True)
class Case:
    """A network (maps shrunk, seeded random float64 parameters), its input volumes, and the reference output."""

    net: Network
    outsz: Triple
    volumes: dict[str, np.ndarray]  # input node -> (maps, outsz + largest FOV - 1): every output voxel's windows
    offsets: dict[str, Triple]  # input node -> where its windows start in its volume (inputs are centred)
    want: dict[str, np.ndarray]  # output node -> (maps, *outsz), each voxel the network on its own window

    @property
    def patches(self) -> dict[str, np.ndarray]:
        """Each input's part of its volume that a dense evaluator reads for the whole output patch."""
        fov = self.net.spec.layout().input_fov
        return {n: _window(v, self.offsets[n], tuple(o + f - 1 for o, f in zip(self.outsz, fov[n])))
                for n, v in self.volumes.items()}


def _window(volume: np.ndarray, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(volume[(slice(None), *(slice(a, a + s) for a, s in zip(start, size)))])


def _shrunk(spec: NetworkSpec) -> NetworkSpec:
    nodes = [replace(n, size=min(n.size, MAX_MAPS)) for n in spec.nodes.values()]
    return NetworkSpec.from_groups(nodes, spec.edges.values(), spec.path)


def _random_network(spec: NetworkSpec, seed: int) -> Network:
    """Seeded random kernels (scaled by their fan-in, so values stay of order one through deep networks) and
    biases, whatever the file's initialisers are (some are zero)."""
    rng = np.random.default_rng(seed)
    net = Network.initialise(spec, seed=seed, dtype=np.float64)
    for name, kernel in net.kernels.items():
        fan_in = kernel.shape[0] * math.prod(kernel.shape[2:])
        net.kernels[name] = rng.standard_normal(kernel.shape) / math.sqrt(fan_in)
    for name, bias in net.biases.items():
        net.biases[name] = 0.1 * rng.standard_normal(bias.shape)
    return net


@lru_cache(maxsize=None)
def _case(path: Path) -> Case:
    """The case of one network file, made once for every evaluator."""
    spec = _shrunk(load_network(path))
    net = _random_network(spec, seed=7)
    fov = spec.layout().input_fov
    offsets, big = input_offsets(spec, mirror=False)
    outsz = OUTSZ_2D if all(f[0] == 1 for f in fov.values()) else OUTSZ_3D
    rng = np.random.default_rng(11)
    volumes = {n: rng.standard_normal((spec.nodes[n].size, *(o + b - 1 for o, b in zip(outsz, big))))
               for n in spec.inputs}
    want = {n: np.empty((spec.nodes[n].size, *outsz)) for n in spec.outputs}
    mode = "fft" if _reference_work(path) > SLOW_WORK else "direct"
    for voxel in np.ndindex(*outsz):
        windows = {n: _window(v, tuple(a + b for a, b in zip(voxel, offsets[n])), fov[n]) for n, v in volumes.items()}
        for n, y in sequential_forward(net, windows, (1, 1, 1), mode).items():
            want[n][(slice(None), *voxel)] = y[:, 0, 0, 0]
    return Case(net, outsz, volumes, offsets, want)


class ForwardContract:
    """The cases and the check; a subclass says how its evaluator computes the dense output of a case."""

    def dense(self, case: Case, tmp_path: Path) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @pytest.mark.parametrize("path", FILES)
    def test_each_voxel_is_the_network_on_its_window(self, path: Path | None, tmp_path: Path) -> None:
        case = _case(need(REFERENCE) if path is None else path)
        got = self.dense(case, tmp_path)
        assert sorted(got) == sorted(case.want)
        for node, want in case.want.items():
            assert got[node].shape == want.shape, node
            scale = max(1.0, float(np.abs(want).max()))
            np.testing.assert_allclose(got[node], want, rtol=RTOL, atol=RTOL * scale, err_msg=node)


class BlockEvaluator(ForwardContract):
    """An evaluator of one block (the sliding-window twin planned at the output patch, fed each input's patch)."""

    def evaluator(self, net: Network, outsz: Triple) -> PhaseForward | BlockForward:
        raise NotImplementedError

    def dense(self, case: Case, tmp_path: Path) -> dict[str, np.ndarray]:
        engine = self.evaluator(case.net.sliding_window(), case.outsz)
        patches = case.patches
        assert engine.input_patch == {n: p.shape[1:] for n, p in patches.items()}
        return engine.forward(patches)


class TestPhaseForwardFFT(BlockEvaluator):
    """On two threads, and as the second block of its evaluator: the first block (other values) leaves its
    activations' memory for the second to reuse, and the first block's output, handed out, must not change."""

    def evaluator(self, net: Network, outsz: Triple) -> PhaseForward:
        return PhaseForward(net, outsz, "fft", threads=2)

    def dense(self, case: Case, tmp_path: Path) -> dict[str, np.ndarray]:
        engine = self.evaluator(case.net.sliding_window(), case.outsz)
        rng = np.random.default_rng(3)
        first = engine.forward({n: rng.standard_normal(p.shape) for n, p in case.patches.items()})
        kept = {n: y.copy() for n, y in first.items()}
        got = engine.forward(case.patches)
        for n, y in first.items():
            np.testing.assert_array_equal(y, kept[n], err_msg=f"{n}: the first block's output was overwritten")
            assert not np.may_share_memory(y, got[n])
        return got


class TestPhaseForwardDirect(BlockEvaluator):
    def evaluator(self, net: Network, outsz: Triple) -> PhaseForward:
        return PhaseForward(net, outsz, "direct", spectra_cache=False)


class TestBlockForward(BlockEvaluator):
    """The training engine's forward graph (FFT conv blocks), run in this process."""

    def evaluator(self, net: Network, outsz: Triple) -> BlockForward:
        return BlockForward(net, outsz, "fft")


class TestDenseInference(ForwardContract):
    """``infer_volume`` end to end: the input volumes written as zarr, valid borders (no mirroring: every output
    voxel has a real window), blocks smaller than the output so the grid tiles it (edge blocks clipped), the
    outputs read back from the store."""

    def dense(self, case: Case, tmp_path: Path) -> dict[str, np.ndarray]:
        inputs = {}
        for node, volume in case.volumes.items():
            path = tmp_path / f"{node}.zarr"
            write_volume(path, volume)
            inputs[node] = [InputFile(str(path))]
        block = (1, 2, 3) if case.outsz[0] == 1 else (1, 2, 2)
        plan = plan_dense(case.net, inputs, DenseOptions(block, mirror=False))
        res = infer_volume(DenseRequest(plan, tmp_path / "out.zarr", scheduler="synchronous", progress=False))
        assert res.out_shape == case.outsz
        return {node: read_volume(path) for node, path in res.arrays.items()}
