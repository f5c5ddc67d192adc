"""What every graph builder shares: the graph being built, its keys, the operation of each task and the phase of
the step that operation belongs to (which decides its priority), and how a task is written down.

Keys are ``("<op>-<layer>-<token>", index...)``. Every task is made by :func:`call`: the values it depends on
(graph keys, or nested tasks) are positional, everything else is passed by keyword (a ``functools.partial``), so
no builder depends on the position of an argument in another builder's task.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from znn.pipeline.graph.plan import NetPlan

Key = tuple[Any, ...]


class Phase(enum.IntEnum):
    """Where in a training step an operation runs; :func:`znn.pipeline.graph.build.task_priorities` orders ready
    tasks by it (and by the depth of their layer)."""

    DATA = 0  # inputs and parameters: no work, ready at once
    FORWARD = 1  # shallow layers first
    LOSS = 2
    BACKWARD = 3  # the chain of input gradients, output to input: deep layers first
    KERNEL_GRADIENT = 4  # nothing downstream waits for it but the update
    UPDATE = 5  # fills the cores the critical path leaves idle


class Op(enum.Enum):
    """Every operation a graph task performs, with its phase (a new operation cannot be added without one)."""

    # the values a graph starts with (:meth:`Graph.data`), and the views of them
    INPUT = ("input", Phase.DATA)
    INPUT_BLOCK = ("inblock", Phase.DATA)
    KERNEL = ("kernel", Phase.DATA)
    BIAS = ("bias", Phase.DATA)
    KERNEL_MOMENTUM = ("kmomentum", Phase.DATA)  # a kernel's SGD velocity
    BIAS_MOMENTUM = ("bmomentum", Phase.DATA)
    CACHED_SPECTRA = ("kcache", Phase.DATA)  # kernel spectra of an edge that is not updated, from the cache
    LOSS_FUNCTION = ("lossfn", Phase.DATA)  # the step's loss (a function of the outputs: the patch's labels)
    STEP = ("step", Phase.DATA)  # the step's number, which seeds its randomness (dropout)
    # forward
    CONV = ("conv", Phase.FORWARD)  # an output block of a conv edge
    CONV_SLAB = ("convslab", Phase.FORWARD)  # a slab of output rows of a direct conv edge, every output map
    INPUT_SPECTRA = ("xfft", Phase.FORWARD)
    KERNEL_SPECTRA = ("kfft", Phase.FORWARD)
    MAX_FILTER = ("max_filter", Phase.FORWARD)
    MAX_POOL = ("max_pool", Phase.FORWARD)
    DROPOUT = ("dropout", Phase.FORWARD)
    CROP = ("crop", Phase.FORWARD)
    MAXOUT = ("maxout", Phase.FORWARD)  # a maxout edge, and the maximum a maxout node takes
    NODE = ("node", Phase.FORWARD)
    ACTIVATION = ("act", Phase.FORWARD)
    # loss
    LOSS = ("loss", Phase.LOSS)
    COST = ("cost", Phase.LOSS)
    # backward
    NODE_GRADIENT = ("gpre", Phase.BACKWARD)  # the gradient before a node's transfer
    GRAD_SPECTRA = ("gfft", Phase.BACKWARD)
    GRAD_INPUT = ("gx", Phase.BACKWARD)  # an input block's gradient of a conv edge
    GRAD_INPUT_SLAB = ("gxslab", Phase.BACKWARD)  # a slab of input rows' gradient of a direct conv edge
    # kernel gradients and updates
    GRAD_KERNEL = ("gw", Phase.KERNEL_GRADIENT)
    GRAD_KERNEL_SLAB = ("gwslab", Phase.KERNEL_GRADIENT)  # a slab's share of a direct conv's kernel gradient
    UPDATE = ("update", Phase.UPDATE)

    @property
    def label(self) -> str:
        return str(self.value[0])

    @property
    def phase(self) -> Phase:
        return Phase(self.value[1])

    @classmethod
    def of_edge(cls, edge_type: str) -> Op:
        """The forward operation of a one-to-one edge type."""
        for op in cls:
            if op.label == edge_type and op.phase is Phase.FORWARD:
                return op
        raise ValueError(f"no graph operation for edge type {edge_type!r}")


def call(fn: Callable[..., Any], *deps: Any, **params: Any) -> tuple[Any, ...]:
    """The task ``fn(*deps, **params)``: ``deps`` are graph keys or nested tasks (dask computes them first),
    ``params`` plain values bound by keyword."""
    return (functools.partial(fn, **params) if params else fn, *deps)


@dataclass
class Graph:
    """A task graph being built, with the keys of each node group's activation blocks."""

    plan: NetPlan
    token: str
    dsk: dict[Any, Any] = field(default_factory=dict)
    act: dict[str, list[Key]] = field(default_factory=dict)  # node -> activation block keys
    fwd: dict[str, list[Key]] = field(default_factory=dict)  # edge -> forward result keys (tuples with aux data)
    xspec: dict[str, list[Key]] = field(default_factory=dict)  # conv edge -> input spectra per input block
    kspec: dict[str, list[list[Any]]] = field(default_factory=dict)  # conv edge -> [ib][ob] key or cached array
    new_kspec: dict[str, list[list[Key]]] = field(default_factory=dict)  # kernel spectra computed in this graph
    params: dict[str, Key] = field(default_factory=dict)
    gw: dict[str, list[list[Any]]] = field(default_factory=dict)  # conv edge -> kernel gradient [ib][ob] tasks
    threads: int = 1  # cores the graph runs on (workers of a threaded scheduler; 1 for one-thread workers)
    origin: dict[Key, tuple[Op, str]] = field(default_factory=dict)  # task key -> (op, layer) it was made for
    momenta: dict[tuple[str, str], Key] = field(default_factory=dict)  # ("kernel", edge) / ("bias", node) -> velocity
    step_key: Key | None = None  # training graphs: the key of the step's number
    loss_key: Key | None = None  # step graphs: the key of the loss function
    data_keys: list[Key] = field(default_factory=list)  # the keys :meth:`data` gave values, in order

    def key(self, op: Op, layer: str, *index: int) -> Key:
        key = (f"{op.label}-{layer}-{self.token}", *index)
        self.origin[key] = (op, layer)
        return key

    def data(self, op: Op, layer: str, *index: int, value: Any) -> Key:
        """The key of a value the graph starts with (input, parameter, momentum, cached spectra, the loss, the step
        number). Every such value enters the graph here, so a graph built once can be run again on new values
        (:mod:`znn.pipeline.graph.reuse`)."""
        key = self.key(op, layer, *index)
        self.dsk[key] = value
        self.data_keys.append(key)
        return key

    def task_threads(self, width: int) -> int:
        """Threads for each of ``width`` tasks that run side by side: a stage narrower than the machine splits
        its tasks over the idle cores (only kernels whose numbers do not depend on the split take them)."""
        return max(1, self.threads // max(1, width))
