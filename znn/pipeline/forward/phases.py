"""The dense-inference evaluator: one block's forward pass node group by node group, FFT convolutions by phases."""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Mapping, Sequence

import numpy as np

from znn.network import Network
from znn.ops import pointwise
from znn.ops.conv import conv_forward_direct
from znn.ops.phase import (
    SPECTRA_CAP_BYTES,
    TileGeometry,
    choose_tile,
    phase_conv_fft,
    phase_kernel_spectra,
)
from znn.ops.pooling import max_filter_values
from znn.pipeline.graph import tasks
from znn.pipeline.graph.edges import OneToOne, one_to_one_forward
from znn.pipeline.graph.plan import NetPlan, make_plan
from znn.types import Triple


class PhaseForward:
    """Inference-only forward pass of one block, node group by node group on the calling thread.

    Conv edges in ``fft`` mode run :func:`phase_conv_fft` over tiles of the shape :func:`fft_tiles` picks, with
    kernel spectra at that shape kept per edge (``spectra_cache``) or made per block; ``direct`` edges run the BLAS direct convolution; the other edges run their one dispatch
    (:mod:`znn.pipeline.graph.edges`) in inference: max filters keep no winner indices. Extents, crops and
    dilations come from the same plan as the graph engine's, so the result is the same network.
    """

    def __init__(self, net: Network, outsz: Sequence[int], modes: str | Mapping[str, str] = "fft",
                 spectra_cache: bool = True, cache_bytes: int | None = None, threads: int = 1):
        self.net = net
        self.plan: NetPlan = make_plan(net.spec, outsz, modes)
        self.spectra_cache = spectra_cache
        self.threads = max(1, int(threads))
        self.tiles = fft_tiles(self.plan, net.dtype.itemsize)
        self._kspec: dict[str, np.ndarray] = {}
        spec = self.plan.spec
        self._one_to_one = {name: OneToOne.of(edge, self.plan.edges[name].dilation)
                            for name, edge in spec.edges.items() if edge.type != "conv"}
        self._lock = threading.Lock()
        self._buffers = _Buffers()

    @property
    def input_patch(self) -> dict[str, Triple]:
        return self.plan.layout.input_patch

    def warm(self) -> None:
        """Make the kernel spectra of every FFT conv edge once (when caching)."""
        if not self.spectra_cache:
            return
        with self._lock:
            for name, tile in self.tiles.items():
                if name not in self._kspec:
                    self._kspec[name] = phase_kernel_spectra(self.net.kernels[name], tile.shape)

    @property
    def cache_nbytes(self) -> int:
        return sum(a.nbytes for a in self._kspec.values())

    def forward(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec, net = self.plan.spec, self.net
        self.warm()
        values: dict[str, np.ndarray] = {n: np.asarray(inputs[n], dtype=net.dtype) for n in spec.inputs}
        readers = {n: len(spec.outgoing[n]) for n in spec.nodes}
        for node in spec.order():
            group = spec.nodes[node]
            if group.type == "input":
                continue
            parts, sources, done = [], [], []
            for name in spec.incoming[node]:
                source = spec.edges[name].input
                sources.append(values[source])
                parts.append(self._edge_forward(name, values[source]))
                readers[source] -= 1
                if readers[source] == 0 and source not in spec.outputs:
                    done.append(values.pop(source))  # its last reader ran
            y = tasks.join(parts, any(spec.edges[e].type == "maxout" for e in spec.incoming[node]))[0]
            if len(parts) > 1:
                done.extend(parts)  # their sum (or maximum) is a new array
            del parts
            if group.type == "transfer":
                owned = not any(np.may_share_memory(y, source) for source in sources)  # not an input's memory
                y = _bias_and_transfer(y, net.biases[node], group.function, group.function_args, owned,
                                       self.threads)
            del sources
            values[node] = y
            for array in done:  # free activations as soon as their last reader ran; reuse their memory
                if not any(np.may_share_memory(array, v) for v in values.values()):
                    self._buffers.give(array)
            del done
        return {n: values[n] for n in spec.outputs}

    def _edge_forward(self, name: str, source: np.ndarray) -> np.ndarray:
        """The output of edge ``name`` from its input node's values: a conv edge by phase FFTs or directly, a max
        filter by slabs (both into recycled memory), the others by their one dispatch (values only)."""
        ep, edge = self.plan.edges[name], self.plan.spec.edges[name]
        x = tasks.central(source, ep.crop_lo, ep.need)
        op = self._one_to_one.get(name)
        if op is not None and op.kind != "max_filter":
            return one_to_one_forward(op, x, threads=self.threads)[0]
        maps = self.plan.spec.nodes[edge.output if op is None else edge.input].size
        out = self._buffers.empty((maps, *ep.out_extent), self.net.dtype, edge.output in self.plan.spec.outputs)
        if op is not None:
            return max_filter_values(x, op.size, op.dilation, self.threads, out=out)
        kernel = self.net.kernels[name]
        if ep.mode == "fft":  # reads its phases from the crop: no contiguous copy first
            return phase_conv_fft(x, kernel, ep.dilation, self._kspec.get(name), threads=self.threads,
                                  tile=self.tiles[name].shape, out=out)
        return conv_forward_direct(np.ascontiguousarray(x), kernel, ep.dilation, self.threads, out=out)


def reuse_spare(spare: list[int], need: int) -> int | None:
    """Which released buffer (by byte size in ``spare``) an output of ``need`` bytes takes: the smallest that
    holds it (activations shrink along a network, so an output takes an earlier layer's memory); None: make a
    new one. The one policy of :class:`_Buffers` and of the memory model (``znn.pipeline.dense.memplan``)."""
    fits = [i for i, size in enumerate(spare) if size >= need]
    return min(fits, key=lambda i: spare[i]) if fits else None


def keep_spares(spare: list[int]) -> list[int]:
    """The released buffers kept for reuse: the ``SPARE_BUFFERS`` largest (the others are freed)."""
    return sorted(spare, reverse=True)[:SPARE_BUFFERS]


# Released activation buffers kept for reuse: a layer's input and output, what a chain of layers recycles.
SPARE_BUFFERS = 2


class _Buffers:
    """Memory for activations, recycled: an activation whose last reader ran gives its memory back, and a later
    layer's output takes it (:func:`reuse_spare`), so a block does not pay the kernel's page faults on every new
    volume-sized array (about half a second per gigabyte on the development machine), and neither does the next
    block, whose first layers take the buffers the last block's first layers made. Per thread (blocks run side by
    side on one evaluator). The network's outputs, handed to the caller, always get memory of their own, and only
    memory this object made is ever reused, never a caller's."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._made: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()

    def _spare(self) -> list[np.ndarray]:
        spare = getattr(self._local, "spare", None)
        if spare is None:
            spare = self._local.spare = []
        return spare

    def empty(self, shape: Sequence[int], dtype: np.dtype, handed_out: bool = False) -> np.ndarray:
        need = math.prod(shape) * np.dtype(dtype).itemsize
        if handed_out:
            return np.empty(tuple(shape), dtype=dtype)
        spare = self._spare()
        index = reuse_spare([b.nbytes for b in spare], need)
        if index is not None:
            buffer = spare.pop(index)
        else:
            buffer = np.empty(max(need, 1), dtype=np.uint8)
            self._made[id(buffer)] = buffer
        return buffer[:need].view(dtype).reshape(tuple(shape))

    def give(self, array: np.ndarray) -> None:
        root = array
        while isinstance(root.base, np.ndarray):
            root = root.base
        if self._made.get(id(root)) is not root:
            return  # a caller's array or one a kernel made: not ours to reuse
        spare = self._spare()
        if any(b is root for b in spare):
            return
        spare.append(root)
        kept = keep_spares([b.nbytes for b in spare])
        spare.sort(key=lambda b: b.nbytes, reverse=True)
        del spare[len(kept):]


def fft_tiles(plan: NetPlan, itemsize: int = 4, spectra_cap: int = SPECTRA_CAP_BYTES) -> dict[str, TileGeometry]:
    """Per conv edge in ``fft`` mode of ``plan``, the tiles :func:`phase_conv_fft` runs it with (the shape of
    :func:`~znn.ops.phase.choose_tile`): what :class:`PhaseForward` computes and the memory and speed models of
    dense planning count."""
    spec = plan.spec
    tiles = {}
    for name in spec.conv_edges():
        ep, edge = plan.edges[name], spec.edges[name]
        if ep.mode != "fft":
            continue
        w_shape = (spec.nodes[edge.input].size, spec.nodes[edge.output].size, *edge.size)
        shape = choose_tile(ep.need, w_shape, ep.dilation, spectra_cap, itemsize)
        tiles[name] = TileGeometry.of(ep.need, w_shape, ep.dilation, shape)
    return tiles


def _bias_and_transfer(y: np.ndarray, bias: np.ndarray, function: str, args: Sequence[float],
                       in_place: bool, threads: int) -> np.ndarray:
    """:func:`~znn.ops.pointwise.add_bias` then the transfer function, in ``y`` itself when ``in_place`` (the pass
    made ``y`` and nothing else reads it): one pass through memory per layer on ``threads`` threads, no new
    volume-sized arrays."""
    if not in_place or not y.flags.c_contiguous:
        y = np.array(y, copy=True)
    return pointwise.bias_transfer_inplace(y, bias, function, args, threads)
