"""The networks the benchmarks run, by name: bundled job files (:mod:`znn.io.bundled`), so a wheel runs them."""

from __future__ import annotations

from pathlib import Path

from znn.io.bundled import bundled_file

# name -> file under workflows/: the ZNNi networks n337 and n726, a tiny 3D net, the cluster scaling net
BENCH_NETWORKS = {
    "n337": ("inference", "n337.znn"),
    "n726": ("inference", "n726.znn"),
    "tiny3d": ("inference", "tiny3d.znn"),
    "scaling": ("cluster", "scaling.znn"),
}


def bench_network(name: str) -> Path:
    """The network file of benchmark network ``name`` (one of :data:`BENCH_NETWORKS`)."""
    return bundled_file(*BENCH_NETWORKS[name])
