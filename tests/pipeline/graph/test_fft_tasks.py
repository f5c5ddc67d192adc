"""The FFT conv edge's product tasks: an output block (and an input gradient block) is the same, to rounding,
whether its contraction runs over one block of maps, over large blocks summed pair by pair, or over small blocks
joined first (conv_fft.joins_blocks), on an edge split into phases."""

from __future__ import annotations

import numpy as np
import pytest

from tests.shared import REFERENCE, need
from znn.io.netfile import load_network
from znn.ops.conv_fft import SUM_BLOCKS_FROM_MAPS, joins_blocks
from znn.pipeline.graph import tasks
from znn.pipeline.graph.blocks import even_split
from znn.pipeline.graph.plan import make_plan


@pytest.fixture(scope="module")
def conv2():
    """N4_relu's conv2 (48 to 48 maps, 5x5 at dilation 2: 4 phases) planned in FFT mode, its kernels and data."""
    spec = load_network(need(REFERENCE / "networks/N4_relu.znn"))
    ep = make_plan(spec, (1, 4, 4), "fft").edges["conv2"]
    assert ep.phase_count == 4
    rng = np.random.default_rng(0)
    n_in, n_out = spec.kernel_shape("conv2")[:2]
    x = rng.standard_normal((n_in, *ep.in_extent))
    kernel = rng.standard_normal(spec.kernel_shape("conv2"))
    gy = rng.standard_normal((n_out, *ep.out_extent))
    return ep, x, kernel, gy


def _forward_and_grad_input(ep, x, kernel, gy, parts: int | list[tuple[int, int]]):
    """Every output block's maps and every input block's gradient with both sides split into ``parts`` blocks
    (or into the blocks given)."""
    ib = even_split(x.shape[0], parts) if isinstance(parts, int) else parts
    ob = even_split(gy.shape[0], parts) if isinstance(parts, int) else parts
    xspec = [tasks.input_spectra(x[a:b], edge=ep) for a, b in ib]
    kspec = [[tasks.kernel_spectra(kernel, ib=i, ob=o, edge=ep) for o in ob] for i in ib]
    gspec = [tasks.grad_output_spectra(gy[a:b], edge=ep) for a, b in ob]
    y = np.concatenate([tasks.conv_fft_forward(xspec, [row[j] for row in kspec], edge=ep) for j in range(len(ob))])
    gx = np.concatenate([tasks.conv_fft_grad_input(gspec, kspec[i], edge=ep) for i in range(len(ib))])
    return y, gx


UNEVEN_SUMMED = [(0, 12), (12, 48)]  # the smallest block decides: 12 maps are summed
UNEVEN_JOINED = [(0, 11), (11, 30), (30, 48)]


@pytest.mark.parametrize("parts", [2, 8, UNEVEN_SUMMED, UNEVEN_JOINED],
                         ids=["large blocks summed", "small blocks joined", "uneven summed", "uneven joined"])
def test_products_over_blocks_equal_one_block(conv2, parts):
    ep, x, kernel, gy = conv2
    blocks = even_split(x.shape[0], parts) if isinstance(parts, int) else parts
    maps = [b - a for a, b in blocks]
    assert joins_blocks(maps, ep.phase_count) == (min(maps) < SUM_BLOCKS_FROM_MAPS)
    y1, gx1 = _forward_and_grad_input(ep, x, kernel, gy, 1)
    y, gx = _forward_and_grad_input(ep, x, kernel, gy, parts)
    np.testing.assert_allclose(y, y1, rtol=0, atol=1e-10 * np.abs(y1).max())
    np.testing.assert_allclose(gx, gx1, rtol=0, atol=1e-10 * np.abs(gx1).max())


def test_blocks_are_joined_only_when_small_and_split_into_phases():
    assert joins_blocks([6, 6], 4) and not joins_blocks([24, 24], 4)
    assert not joins_blocks([6, 6], 1)  # undilated products are always summed
    assert not joins_blocks([6], 4)  # one block: nothing to join
