"""The graph evaluator: one block's forward pass as the training engine's dask graph, run in this process."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np
from dask.local import get_sync
from dask.optimization import cull

from znn.network import Network
from znn.pipeline.graph.build import forward_graph
from znn.pipeline.graph.cache import SpectraCache
from znn.pipeline.graph.plan import NetPlan, make_plan
from znn.types import Triple


class BlockForward:
    """One network planned at one output patch, run block after block in this process: the forward graph of a
    block runs on the calling thread; kernel spectra come from a shared cache (when enabled), else each block
    computes them when its layer is reached and drops them after."""

    def __init__(self, net: Network, outsz: Sequence[int], modes: str | Mapping[str, str] = "fft",
                 spectra_cache: bool = True, cache_bytes: int | None = None, threads: int = 1):
        self.net = net
        self.plan: NetPlan = make_plan(net.spec, outsz, modes)
        self.cache = SpectraCache(spectra_cache, cache_bytes)
        self._lock = threading.Lock()

    @property
    def input_patch(self) -> dict[str, Triple]:
        return self.plan.layout.input_patch

    def warm(self) -> None:
        """Compute every FFT conv layer's kernel spectra into the cache once (blocks that start together would
        otherwise each compute their own copy)."""
        from znn.pipeline.graph import tasks

        if not self.cache.enabled:
            return
        with self._lock:
            for name, ep in self.plan.edges.items():
                if ep.mode != "fft" or ep.fft_shape is None or self.cache.get(name, ep.fft_shape) is not None:
                    continue
                edge = self.plan.spec.edges[name]
                kernel = self.net.kernels[name]
                spectra = [[tasks.kernel_spectra(kernel, ib, ob, edge=ep)
                            for ob in self.plan.blocks[edge.output]] for ib in self.plan.blocks[edge.input]]
                self.cache.put(name, ep.fft_shape, spectra)

    def forward(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from znn.pipeline.graph import tasks

        g = forward_graph(self.plan, self.net, inputs, training=False, cache=self.cache)
        keep = dict(g.new_kspec) if self.cache.enabled else {}
        if not self.cache.enabled:
            # each output block's task makes the kernel spectra of its column itself and drops them after, so
            # at most one column of a layer's kernel spectra is alive, whatever order the scheduler picks
            for edge, rows in g.new_kspec.items():
                for j, conv_key in enumerate(g.fwd[edge]):
                    task = g.dsk[conv_key]
                    column = [g.dsk[rows[i][j]] for i in range(len(rows))]
                    g.dsk[conv_key] = (task[0], task[1], column, *task[3:])
        outputs = {n: g.act[n] for n in self.plan.spec.outputs}
        flat = [k for ks in outputs.values() for k in ks] + [k for rows in keep.values() for row in rows for k in row]
        needed, _ = cull(g.dsk, flat)
        values = dict(zip(flat, get_sync(needed, flat)))
        for edge, rows in keep.items():
            spectra = [[values[k] for k in row] for row in rows]
            self.cache.put(edge, self.plan.edges[edge].transform_shape, spectra)
        return {n: tasks.concat_maps([values[k] for k in ks]) for n, ks in outputs.items()}
