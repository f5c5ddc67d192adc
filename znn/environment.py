"""The environment as this process had it when znn was first imported, before any dask nanny it starts could
write into it (:mod:`znn.pipeline.run.schedulers` tells a variable the user set from one an earlier cluster's nanny
left behind). ``znn/__init__`` imports this module first, so the snapshot is taken at ``import znn``.

Also what the per-user caches (autotuned conv modes, FFTW wisdom) are keyed by and where they live: the CPU
(:func:`cpu_model`, :func:`cpu_flags`) and the folder (:func:`cache_dir`); the machine every benchmark names
(:func:`machine`); and the memory the machine has available now (:func:`available_memory`)."""

import hashlib
import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

STARTING_ENVIRONMENT = dict(os.environ)


def cache_dir() -> Path:
    """Where znn keeps its per-user caches: ``$ZNN_CACHE_DIR`` if set, else the user cache folder of the platform
    (``platformdirs.user_cache_dir("znn")``: ``~/.cache/znn`` on Linux, or ``$XDG_CACHE_HOME/znn``)."""
    root = os.environ.get("ZNN_CACHE_DIR")
    if root:
        return Path(root)
    import platformdirs

    return Path(platformdirs.user_cache_dir("znn", appauthor=False))


def _cpuinfo() -> list[tuple[str, str]]:
    """The ``name: value`` lines of Linux ``/proc/cpuinfo`` (one block per logical CPU); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            return [(name.strip(), value.strip()) for name, sep, value in (line.partition(":") for line in f) if sep]
    except OSError:
        return []


def _cpuinfo_field(name: str) -> str | None:
    return next((value for key, value in _cpuinfo() if key == name), None)


@lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; else ``platform.processor()``)."""
    return _cpuinfo_field("model name") or platform.processor() or "unknown-cpu"


@lru_cache(maxsize=None)
def cpu_flags() -> str:
    """A short digest of the CPU's instruction-set flags (``/proc/cpuinfo``; else the architecture's name): two
    machines with the same model name but different SIMD support (a VM hiding AVX-512) differ here."""
    flags = _cpuinfo_field("flags") or _cpuinfo_field("Features") or platform.machine()
    return hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:16]


# The widest SIMD instruction set a CPU flag (x86 ``flags``, ARM ``Features``) shows, widest first.
_ISA_LEVELS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2"), ("sve", "SVE"),
               ("asimd", "NEON"))


def isa_level() -> str:
    """The widest SIMD instruction set the CPU offers (``AVX-512``, ``AVX2``, ...: what FFTW and BLAS kernels run
    at), from Linux ``/proc/cpuinfo``; elsewhere the architecture's name (``arm64``, ``x86_64``)."""
    flags = set((_cpuinfo_field("flags") or _cpuinfo_field("Features") or "").split())
    found = next((level for flag, level in _ISA_LEVELS if flag in flags), None)
    return found or platform.machine() or "unknown"


def physical_cores() -> int | None:
    """Cores without their hyperthreads: distinct (``physical id``, ``core id``) of Linux ``/proc/cpuinfo``; None
    where it does not say (another OS, a VM or ARM kernel that leaves the ids out)."""
    cores, package = set(), ""
    for key, value in _cpuinfo():
        if key == "physical id":
            package = value
        elif key == "core id":
            cores.add((package, value))
    return len(cores) or None


def cores(num_threads: int = 0) -> int:
    """``num_threads`` with ZNN's meaning (the ``num_threads`` key, ``--threads``): 0 or less means every core."""
    return num_threads if num_threads > 0 else (os.cpu_count() or 1)


@lru_cache(maxsize=None)
def machine() -> dict[str, Any]:
    """The machine a figure was measured on: CPU model, logical cores (``os.cpu_count``, what ``num_threads = 0``
    uses), physical cores (None: unknown) and SIMD level. Benchmarks stamp their tables and JSON with it."""
    return {"cpu": cpu_model(), "logical_cores": cores(), "physical_cores": physical_cores(),
            "isa": isa_level()}


def proc_bytes(path: str, key: str) -> int:
    """The ``key:`` line of a Linux ``/proc`` file (``/proc/self/status``, ``/proc/meminfo``) in bytes; 0 where the
    file or the line is missing (another OS, a process that is gone)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def available_memory() -> int:
    """Bytes this machine can give a new process now: MemAvailable (Linux ``/proc/meminfo``; on a machine shared
    with other work, less than its total), else the physical memory; 0 where neither is known."""
    found = proc_bytes("/proc/meminfo", "MemAvailable")
    if found:
        return found
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or no such name
        return 0


# glibc's mallopt parameters (malloc.h), each with the environment variable glibc reads at a process's start for it,
# and the value that keeps freed memory
_KEEP_FREED = ((-4, "MALLOC_MMAP_MAX_", 0), (-1, "MALLOC_TRIM_THRESHOLD_", 2**31 - 1), (-8, "MALLOC_ARENA_MAX", 1))


def keep_freed_memory_environment() -> dict[str, str]:
    """The environment variables that give a new process the settings of :func:`keep_freed_memory` from its start,
    before any of its threads (for a child process that imports a library that starts threads, as PyTorch does)."""
    return {name: str(value) for _, name, value in _KEEP_FREED}


@lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory this process frees for its next allocations, not give it back.

    By default every array over 32 MiB is a fresh ``mmap`` that ``free`` unmaps, so the next step of a training
    loop page-faults and zeroes the same gigabytes again: on a 2-core VM that kernel time was a third of a 3d_5
    step's CPU time (2.0 of 6.8 s, 40,000 page faults a step). Here all allocations come from one heap
    (no mmap, one arena) that is never trimmed; the process holds its peak, which the next step needs again.
    A training engine calls this; processes that only infer do not need it (their evaluator recycles its own
    buffers). It reaches every thread only when called before any thread but the main one has allocated: such a
    thread has an arena of its own, which glibc hands to a new thread once it has exited (the free list of arenas
    comes before their limit), and an arena other than the main one maps each large block afresh (whatever
    ``M_MMAP_MAX`` says) and unmaps it on free. The ``znn`` commands that train call it first thing; measured on
    3d_5 at 32^3 with a process pool started before the engine: steps of 38-42 s, 46-53 s of system time each, against
    10.7-13.6 s. Returns False where the C library is not glibc (nothing changed)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(param, value) == 1 for param, _, value in _KEEP_FREED)
