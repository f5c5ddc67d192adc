"""The per-user FFTW wisdom cache (znn.ops.wisdom), across real processes: what one process planned, the next one
plans from wisdom; a foreign, corrupt or unwritable cache is ignored with a warning, never a crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.shared import ROOT
from znn.ops import wisdom

# Plans the transforms of cubes of the given sides (argv[1], comma-separated) through znn.ops.fft, then reports
# for each side of argv[2] whether FFTW can plan it from wisdom alone (no measuring) in this process.
CHILD = """
import sys, numpy as np, pyfftw
import znn.ops.fft as F
for n in filter(None, sys.argv[1].split(",")):
    x = F.empty_aligned((1, int(n), int(n), int(n)), np.float32)  # aligned, as the check below plans
    x[:] = 1
    F.rfft3(x)
hits = []
for n in filter(None, sys.argv[2].split(",")):
    n = int(n)
    F.wisdom.ensure_cache_loaded(F.planner_effort())
    try:
        pyfftw.FFTW(pyfftw.empty_aligned((1, n, n, n), "float32"),
                    pyfftw.empty_aligned((1, n, n, n // 2 + 1), "complex64"),
                    axes=(-3, -2, -1), flags=("FFTW_MEASURE", "FFTW_WISDOM_ONLY"))
        hits.append("hit")
    except RuntimeError:
        hits.append("miss")
print(" ".join(hits))
"""
EFFORT = "FFTW_MEASURE"


def _env(cache: object, **extra: str) -> dict[str, str]:
    env = {**os.environ, "ZNN_CACHE_DIR": str(cache), "ZNN_FFTW_PLANNER": EFFORT, "PYTHONPATH": str(ROOT)}
    env.pop("ZNN_FFTW_WISDOM", None)
    return {**env, **extra}


def _child(env: dict[str, str], plan: str = "", check: str = "") -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-W", "always::RuntimeWarning", "-c", CHILD, plan, check], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def _cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ZNN_CACHE_DIR", str(tmp_path))
    return wisdom.cache_file(wisdom.cache_key(EFFORT))


def test_wisdom_planned_by_one_process_is_loaded_by_the_next(tmp_path, monkeypatch):
    path = _cache_file(tmp_path, monkeypatch)
    assert _child(_env(tmp_path), check="12").stdout.split() == ["miss"]  # nothing cached yet
    assert not path.exists()  # nothing planned, nothing written
    _child(_env(tmp_path), plan="12")
    stored = json.loads(path.read_text())
    assert stored["key"] == wisdom.cache_key(EFFORT) and len(stored["fftw_wisdom"]) == 3
    assert _child(_env(tmp_path), check="12,20").stdout.split() == ["hit", "miss"]
    # off: the cache is neither read nor written
    assert _child(_env(tmp_path, ZNN_FFTW_WISDOM="off"), check="12").stdout.split() == ["miss"]
    before = path.read_text()
    _child(_env(tmp_path, ZNN_FFTW_WISDOM="off"), plan="20")
    assert path.read_text() == before


def test_saving_merges_what_other_processes_wrote(tmp_path, monkeypatch):
    _cache_file(tmp_path, monkeypatch)
    _child(_env(tmp_path), plan="12")
    _child(_env(tmp_path), plan="20")  # loads 12, plans 20, saves both
    assert _child(_env(tmp_path), check="12,20").stdout.split() == ["hit", "hit"]
    left = sorted(p.name for p in (tmp_path / "fftw-wisdom").iterdir() if not p.name.endswith(".lock"))
    assert left == [_cache_file(tmp_path, monkeypatch).name]  # no temp files left behind


def test_a_cache_of_another_key_is_ignored_and_replaced(tmp_path, monkeypatch):
    path = _cache_file(tmp_path, monkeypatch)
    _child(_env(tmp_path), plan="12")
    stored = json.loads(path.read_text())
    stored["key"] = {**stored["key"], "cpu_flags": "another-machine"}
    path.write_text(json.dumps(stored))
    done = _child(_env(tmp_path), plan="20", check="12")
    assert "was written for another machine" in done.stderr and done.stdout.split() == ["miss"]
    assert json.loads(path.read_text())["key"] == wisdom.cache_key(EFFORT)  # the next save replaced it
    assert _child(_env(tmp_path), check="20").stdout.split() == ["hit"]


@pytest.mark.parametrize("text", ["{not json", '{"key": 1}', "\x00\x01 binary", '{"key": {}, "fftw_wisdom": 3}'])
def test_a_corrupt_cache_is_ignored_with_a_warning(tmp_path, monkeypatch, text):
    path = _cache_file(tmp_path, monkeypatch)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    done = _child(_env(tmp_path), plan="12", check="12")
    assert "the FFTW wisdom cache" in done.stderr and done.stdout.split() == ["hit"]
    assert json.loads(path.read_text())["key"] == wisdom.cache_key(EFFORT)


def test_wisdom_fftw_refuses_is_ignored_with_a_warning(tmp_path, monkeypatch):
    path = _cache_file(tmp_path, monkeypatch)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"key": wisdom.cache_key(EFFORT), "fftw_wisdom": ["(garbage", "", "x"]}))
    done = _child(_env(tmp_path), plan="12")
    assert "FFTW refused the wisdom cache" in done.stderr


def test_a_cache_folder_that_cannot_be_written_only_warns(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = _child(_env(blocker / "cache"), plan="12")
    assert "cannot write the FFTW wisdom cache" in done.stderr
