"""The process settings of :mod:`znn.environment` that change how the process runs."""

import platform
import subprocess
import sys

import pytest

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


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults():
    """By default every big array is a fresh mmap: 3 rounds of 256 MiB fault in 3 x 65,536 pages of 4 KiB, or
    3 x 128 transparent huge pages of 2 MiB. Kept, the rounds reuse the first one's memory."""
    default_kept, default = _faults("default")
    kept, faults = _faults("keep")
    assert default_kept == "False" and kept == "True"
    assert default >= 300, default  # the test would show nothing if the default did not fault
    assert faults < default / 10, (faults, default)
