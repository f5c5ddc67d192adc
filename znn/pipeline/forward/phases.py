"""The dense-inference evaluator: one block's forward pass node group by node group, FFT convolutions by phases."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np

from znn.network import Network
from znn.ops.phase import phase_conv_fft, phase_kernel_spectra, phase_shape
from znn.ops.pooling import max_filter_values
from znn.pipeline.graph.plan import NetPlan, make_plan
from znn.types import Triple


class PhaseForward:
    """Inference-only forward pass of one block, node group by node group on the calling thread.

    Conv edges in ``fft`` mode run :func:`phase_conv_fft` with kernel spectra kept per edge (``spectra_cache``) or
    made per block; ``direct`` edges run the BLAS direct convolution; max filters keep no winner indices. Extents,
    crops and dilations come from the same plan as the graph engine's, so the result is the same network.
    """

    def __init__(self, net: Network, outsz: Sequence[int], modes: str | Mapping[str, str] = "fft",
                 spectra_cache: bool = True, cache_bytes: int | None = None, threads: int = 1):
        self.net = net
        self.plan: NetPlan = make_plan(net.spec, outsz, modes)
        self.spectra_cache = spectra_cache
        self.threads = max(1, int(threads))
        self._kspec: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    @property
    def input_patch(self) -> dict[str, Triple]:
        return self.plan.layout.input_patch

    def _shape(self, name: str) -> Triple:
        ep = self.plan.edges[name]
        return phase_shape(ep.need, self.plan.spec.edges[name].size, ep.dilation)

    def _fft_edges(self) -> list[str]:
        return [e for e in self.plan.spec.conv_edges() if self.plan.edges[e].mode == "fft"]

    def warm(self) -> None:
        """Make the kernel spectra of every FFT conv edge once (when caching)."""
        if not self.spectra_cache:
            return
        with self._lock:
            for name in self._fft_edges():
                if name not in self._kspec:
                    self._kspec[name] = phase_kernel_spectra(self.net.kernels[name], self._shape(name))

    @property
    def cache_nbytes(self) -> int:
        return sum(a.nbytes for a in self._kspec.values())

    def forward(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from znn.ops import conv as convops
        from znn.ops import pointwise, pooling
        from znn.pipeline.graph.tasks import central

        spec, plan, net = self.plan.spec, self.plan, self.net
        self.warm()
        values: dict[str, np.ndarray] = {n: np.asarray(inputs[n], dtype=net.dtype) for n in spec.inputs}
        readers = {n: len(spec.outgoing[n]) for n in spec.nodes}
        for node in spec.order():
            group = spec.nodes[node]
            if group.type == "input":
                continue
            parts, sources = [], []
            for name in spec.incoming[node]:
                edge, ep = spec.edges[name], plan.edges[name]
                sources.append(values[edge.input])
                x = central(values[edge.input], ep.crop_lo, ep.need)
                if edge.type == "conv":
                    if ep.mode == "fft":  # reads its phases from the crop: no contiguous copy first
                        parts.append(phase_conv_fft(x, net.kernels[name], ep.dilation, self._kspec.get(name),
                                                    threads=self.threads))
                    else:
                        parts.append(convops.conv_forward_direct(np.ascontiguousarray(x), net.kernels[name],
                                                                 ep.dilation, self.threads))
                elif edge.type == "max_filter":
                    parts.append(max_filter_values(x, edge.size, ep.dilation))
                elif edge.type == "max_pool":
                    parts.append(pooling.max_pool(np.ascontiguousarray(x), edge.size)[0])
                elif edge.type == "dropout":
                    parts.append(pointwise.dropout(np.ascontiguousarray(x), edge.ratio, np.random.default_rng(0),
                                                   training=False)[0])
                elif edge.type == "crop":
                    parts.append(np.ascontiguousarray(pointwise.crop(x, edge.offset)))
                else:
                    parts.append(np.ascontiguousarray(x))
                readers[edge.input] -= 1
                if readers[edge.input] == 0 and edge.input not in spec.outputs:
                    del values[edge.input]  # free activations as soon as their last reader ran
            if any(spec.edges[e].type == "maxout" for e in spec.incoming[node]):
                y = pointwise.maxout(parts)[0]
            else:
                y = parts[0] if len(parts) == 1 else parts[0] + sum(parts[1:])
            del parts
            if group.type == "transfer":
                owned = not any(np.may_share_memory(y, source) for source in sources)  # not an input's memory
                y = _bias_and_transfer(y, net.biases[node], group.function, group.function_args, owned)
            del sources
            values[node] = y
        return {n: values[n] for n in spec.outputs}


def _bias_and_transfer(y: np.ndarray, bias: np.ndarray, function: str, args: Sequence[float],
                       in_place: bool) -> np.ndarray:
    """:func:`~znn.ops.pointwise.add_bias` then the transfer function, in ``y`` itself when ``in_place`` (the pass
    made ``y`` and nothing else reads it): two fewer volume-sized arrays per layer, for ReLU, the common case."""
    from znn.ops import pointwise

    if not in_place:
        return pointwise.transfer_forward(function, pointwise.add_bias(y, bias), args, training=False)
    y += bias.astype(y.dtype, copy=False)[:, None, None, None]
    if function == "rectify_linear":
        return np.maximum(y, y.dtype.type(0), out=y)
    return pointwise.transfer_forward(function, y, args, training=False)
