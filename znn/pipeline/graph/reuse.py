"""A graph built once and run again on new values: the training step of one patch shape.

Building a step's graph, culling it, ranking its tasks and handing it to dask (which turns the tuples the builders
write into its task objects) costs as much for every step as for the first, and grows with the tasks the plan splits
the step into: at 16 workers' split, about 900 keys, it was a tenth of a step on 2 cores. Only the values a step
starts with change from step to step (the patch, parameters, momenta, the loss of the patch's labels, the step's
number; the builders put each of them into the graph through :meth:`~znn.pipeline.graph.core.Graph.data`), so a
:class:`Reusable` keeps everything else: the culled graph in dask's task spec, the keys wanted, the priorities.
Each run puts the new values in as data nodes; what is computed is what a freshly built graph computes, bit for bit.

In-process schedulers only: a cluster's scheduler may still hold an earlier run's result under a key, so graphs
sent there keep keys named from their data (:func:`~znn.pipeline.graph.build.forward_graph`'s default token).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dask.core import istask
from dask.optimization import cull
from dask.task_spec import DataNode, GraphNode, List, Task, TaskRef

from znn.pipeline.graph.build import task_priorities
from znn.pipeline.graph.core import Graph, Key

__all__ = ["Reusable"]


@dataclass(frozen=True)
class Reusable:
    """The tasks of a graph that computes ``keys``, less its data, ready to run with new data."""

    token: str
    tasks: dict[Key, GraphNode]  # every task the wanted keys need, in dask's task spec
    data_keys: frozenset[Key]  # the values each run gives (those the tasks read)
    keys: list[Key]
    priority: dict[Key, int]

    @classmethod
    def of(cls, g: Graph, keys: list[Key]) -> "Reusable":
        """``g`` culled to what ``keys`` need, its tasks converted once."""
        needed, _ = cull(g.dsk, keys)
        data = frozenset(k for k in g.data_keys if k in needed)
        every = set(needed)
        tasks = {k: _task(k, v, every) for k, v in needed.items() if k not in data}
        priority = task_priorities(g)
        return cls(g.token, tasks, data, list(keys), {k: priority[k] for k in needed})

    def graph(self, values: Mapping[Key, Any]) -> dict[Key, GraphNode]:
        """The graph of one run: these tasks on ``values`` (key -> value, as
        :func:`~znn.pipeline.graph.build.step_data` gives them; those no task reads are left out)."""
        missing = self.data_keys.difference(values)
        if missing:
            raise KeyError(f"no value for {sorted(map(str, missing))[:3]} of the graph built as {self.token!r}")
        dsk: dict[Key, GraphNode] = dict(self.tasks)
        for key in self.data_keys:
            dsk[key] = DataNode(key, values[key])
        return dsk


def _task(key: Key, value: Any, keys: set[Any]) -> GraphNode:
    """One entry of a builder's graph (:func:`~znn.pipeline.graph.core.call`'s tuples, lists, keys, literals) in
    dask's task spec."""
    if istask(value):
        return Task(key, value[0], *(_argument(a, keys) for a in value[1:]))
    if _is_key(value, keys):  # an alias of another key
        return Task(key, _identity, TaskRef(value))
    return DataNode(key, value)


def _argument(value: Any, keys: set[Any]) -> Any:
    if istask(value):
        return Task(None, value[0], *(_argument(a, keys) for a in value[1:]))
    if isinstance(value, list):
        return List(*(_argument(a, keys) for a in value))
    if _is_key(value, keys):
        return TaskRef(value)
    return value


def _is_key(value: Any, keys: set[Any]) -> bool:
    """Whether ``value`` names a key of the graph (keys are strings or tuples; a tuple holding an array does not
    hash and is no key)."""
    if not isinstance(value, (str, tuple)):
        return False
    try:
        return value in keys
    except TypeError:
        return False


def _identity(x: Any) -> Any:
    return x
