"""The process settings of :mod:`znn.environment` that change how the process runs."""

import os
import platform
import subprocess
import sys

import pytest

GLIBC_ONLY = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc only")

# allocate, touch and free 256 MiB four times; print the page faults of the last three rounds
_ROUNDS = """
import resource, sys
import numpy as np
from znn.environment import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(1 << 26, dtype=np.float32); del a
before = faults()
for _ in range(3):
    a = np.ones(1 << 26, dtype=np.float32); del a
print(kept, faults() - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept, int(faults)


@GLIBC_ONLY
def test_freed_memory_is_reused_without_page_faults():
    """By default every big array is a fresh mmap: 3 rounds of 256 MiB fault in 3 x 65,536 pages of 4 KiB, or
    3 x 128 transparent huge pages of 2 MiB. Kept, the rounds reuse the first one's memory."""
    default_kept, default = _faults("default")
    kept, faults = _faults("keep")
    assert default_kept == "False" and kept == "True"
    assert default >= 300, default  # the test would show nothing if the default did not fault
    assert faults < default / 10, (faults, default)


# the rounds of _ROUNDS in a new thread, after `znn train` (which fails on a missing file) or after another thread
# allocated first and the setting came late
_THREAD_ROUNDS = """
import resource, sys, threading, time
import numpy as np
from znn.cli import main
from znn.environment import keep_freed_memory
if sys.argv[1] == "late":
    early = threading.Thread(target=lambda: np.ones(1 << 18, dtype=np.float32))
    early.start(); early.join()
    time.sleep(0.5)  # join returns before the C thread has exited and put its arena on glibc's free list
    keep_freed_memory()
else:
    assert main(["train", "/nonexistent/job.cfg"]) == 2
def rounds(out):
    a = np.ones(1 << 26, dtype=np.float32); del a
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        a = np.ones(1 << 26, dtype=np.float32); del a
    out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
found = []
worker = threading.Thread(target=rounds, args=(found,))
worker.start(); worker.join()
print(found[0])
"""


def _thread_faults(mode: str, env: dict[str, str] | None = None) -> int:
    out = subprocess.run([sys.executable, "-c", _THREAD_ROUNDS, mode], capture_output=True, text=True, check=True,
                         env=None if env is None else {**os.environ, **env})
    return int(out.stdout.split()[-1])


@GLIBC_ONLY
def test_training_commands_keep_freed_memory_for_every_thread():
    """`znn train` sets malloc up before any thread starts, so the step's worker threads reuse freed memory too.
    Set after another thread has allocated, it no longer reaches new threads (their arena maps big blocks afresh):
    what a process pool started before the engine did to 3d_5's steps at 32^3 (38-42 s against 10.7-13.6 s)."""
    late = _thread_faults("late")
    assert late >= 300, late  # the test would show nothing if a late setting reached the thread
    assert _thread_faults("cli") < late / 10


@GLIBC_ONLY
def test_a_child_started_with_the_environment_keeps_freed_memory_in_every_thread():
    """What ``znn bench net --torch-apart`` gives PyTorch's child: the settings from the process's start, so even a
    thread that allocated before anything was called (as importing torch starts them) does not spoil them."""
    from znn.environment import keep_freed_memory_environment

    late = _thread_faults("late")
    assert late >= 300, late
    assert _thread_faults("late", keep_freed_memory_environment()) < late / 10
