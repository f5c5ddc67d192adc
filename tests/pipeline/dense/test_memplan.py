"""Memory planner: sizes parse, candidates are FFT-friendly and fit the volume, predictions grow with the patch and
bound what one block really takes, and the plan picks the largest patch that fits (caching spectra when they fit)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.shared import ROOT
from znn.errors import ConfigError, ShapeError
from znn.io.netfile import load_network
from znn.ops.fft import fast_len
from znn.pipeline.dense import memplan
from znn.text import parse_bytes

TINY3D = ROOT / "workflows" / "inference" / "tiny3d.znn"


@pytest.mark.parametrize("text, value", [("8GB", 8 * 10**9), ("512MiB", 512 << 20), ("1.5g", int(1.5 * 2**30)),
                                         ("2000", 2000), (1024, 1024)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_parse_bytes_rejects_nonsense():
    with pytest.raises(ConfigError, match="8GB"):
        parse_bytes("lots")


def test_candidates_are_fft_friendly_and_clipped():
    spec = load_network(TINY3D)
    fov = spec.layout((1, 1, 1)).fov
    cands = memplan.candidate_patches(spec, (40, 50, 300), max_side=128)
    assert cands == sorted(cands, key=lambda t: (t[0] * t[1] * t[2], t))
    for c in cands:
        assert all(1 <= v <= lim for v, lim in zip(c, (40, 50, 300)))
        if c[2] < 300:  # not clipped by the volume: the input extent is a fast FFT length
            assert fast_len(c[2] + fov[2] - 1) == c[2] + fov[2] - 1


def test_estimate_grows_with_patch_and_cache_is_shared():
    spec = load_network(TINY3D)
    small = memplan.block_estimate(spec, (8, 8, 8))
    big = memplan.block_estimate(spec, (32, 32, 32))
    assert big.per_block > small.per_block and big.cache > small.cache > 0
    off = memplan.block_estimate(spec, (32, 32, 32), spectra_cache=False)
    # without the cache each block makes its layers' spectra itself: nothing shared, more per block
    assert off.cache == 0 and off.per_block > big.per_block
    direct = memplan.block_estimate(spec, (32, 32, 32), modes="direct")
    assert direct.cache == 0 and set(direct.modes.values()) == {"direct"}


def test_plan_picks_the_largest_fitting_patch():
    spec = load_network(TINY3D)
    budget = 300 << 20
    plan = memplan.plan_memory(spec, budget, in_flight=2, baseline=100 << 20,
                               search=memplan.PatchSearch(volume_out=(200, 200, 200)))
    assert plan.chosen is not None and plan.predicted_peak <= budget
    bigger = [c for c in plan.candidates if c.outsz > plan.chosen.outsz and
              c.outsz[0] * c.outsz[1] * c.outsz[2] > plan.chosen.outsz[0] * plan.chosen.outsz[1] * plan.chosen.outsz[2]]
    assert all(c.total(2, 100 << 20) > budget for c in bigger)
    assert "chosen" in plan.table()
    more = memplan.plan_memory(spec, 4 * budget, in_flight=2, baseline=100 << 20,
                               search=memplan.PatchSearch(volume_out=(200, 200, 200)))
    assert more.chosen.outsz >= plan.chosen.outsz


def test_plan_drops_the_spectra_cache_when_short():
    spec = load_network(TINY3D)
    roomy = memplan.plan_memory(spec, 2 << 30, 1, 0, search=memplan.PatchSearch(candidates=[(64, 64, 64)]))
    tight_need = memplan.block_estimate(spec, (64, 64, 64), spectra_cache=False).total(1, 0)
    tight = memplan.plan_memory(spec, tight_need + 1, 1, 0, search=memplan.PatchSearch(candidates=[(64, 64, 64)]))
    assert roomy.chosen.spectra_cache and not tight.chosen.spectra_cache


def test_nothing_fits_is_an_error():
    with pytest.raises(ShapeError, match="no output patch fits"):
        memplan.plan_memory(load_network(TINY3D), 1 << 20, in_flight=2, baseline=0)


_ONE_BLOCK = """
import sys, numpy as np
from znn.io.netfile import load_network
from znn.network import Network
from znn.pipeline.dense import memplan
from znn.pipeline.forward.phases import PhaseForward
from threadpoolctl import threadpool_limits
spec = load_network(sys.argv[1]); cache = sys.argv[2] == "1"
net = Network.initialise(spec, seed=0)
bf = PhaseForward(net, (24, 40, 40), "fft", cache)
x = {n: np.ones((1, *p), np.float32) for n, p in bf.input_patch.items()}
base = memplan.process_rss()
with open("/proc/self/clear_refs", "w") as f:  # peak RSS from here on (imports may have peaked higher)
    f.write("5")
with threadpool_limits(1):
    bf.warm(); bf.forward(x); bf.forward(x)
peak = memplan.peak_rss()
est = memplan.block_estimate(spec, (24, 40, 40), "fft", cache)
print(peak - base, est.per_block + est.cache)
"""


@pytest.mark.parametrize("cache", ["1", "0"])
def test_prediction_bounds_one_block(cache):
    env = {**os.environ, "ZNN_FFTW_PLANNER": "FFTW_ESTIMATE"}  # whatever earlier tests left in the environment
    out = subprocess.run([sys.executable, "-c", _ONE_BLOCK, str(TINY3D), cache], capture_output=True, text=True,
                         check=True, env=env)
    used, predicted = (int(v) for v in out.stdout.split())
    assert used <= 1.2 * predicted, (used, predicted)
    assert predicted <= 4 * used + (32 << 20), (used, predicted)  # and not absurdly pessimistic


def test_recycled_buffers_policy_is_the_models():
    """The evaluator's reuse of released activation memory and the memory model's emulation of it are one policy:
    the smallest released buffer that holds the output, else a new one; the two largest released ones wait."""
    from znn.pipeline.forward.phases import SPARE_BUFFERS, keep_spares, reuse_spare

    assert reuse_spare([100, 40, 60], 50) == 2
    assert reuse_spare([100, 40, 60], 100) == 0
    assert reuse_spare([100, 40], 101) is None and reuse_spare([], 1) is None
    assert keep_spares([5, 50, 20, 30]) == [50, 30][:SPARE_BUFFERS]
