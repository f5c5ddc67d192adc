"""The one dispatch of one-to-one edges: inference gives the values training gives (without backward data), a
training draw is reproducible, and the backward undoes the forward's crop and routing."""

from __future__ import annotations

import numpy as np
import pytest

from znn.pipeline.graph.edges import OneToOne, one_to_one_backward, one_to_one_forward

EDGES = [OneToOne("max_filter", (2, 2, 3), (1, 2, 1)), OneToOne("max_pool", (1, 2, 2)),
         OneToOne("dropout", ratio=1.0), OneToOne("crop", offset=(0, 1, 2)), OneToOne("maxout")]


@pytest.mark.parametrize("edge", EDGES, ids=[e.kind for e in EDGES])
def test_inference_values_are_the_training_values(edge: OneToOne) -> None:
    x = np.random.default_rng(0).standard_normal((2, 4, 6, 8))
    view = x[:, :, 1:5, 2:8]  # evaluators pass crops of larger maps
    y, kept = one_to_one_forward(edge, view)
    assert kept is None and y.flags.c_contiguous
    y_train, kept_train = one_to_one_forward(edge, view, draw=(1, 2, 3, 4))
    np.testing.assert_array_equal(y, y_train)  # ratio 1 keeps every voxel of a dropout
    assert (kept_train is not None) == edge.keeps_backward_data


def test_dropout_draw_is_reproducible_and_backward_uses_its_mask() -> None:
    edge = OneToOne("dropout", ratio=0.5)
    x = np.ones((1, 3, 4, 5))
    a, mask = one_to_one_forward(edge, x, draw=(0, 1, 2, 3))
    b, _ = one_to_one_forward(edge, x, draw=(0, 1, 2, 3))
    c, _ = one_to_one_forward(edge, x, draw=(0, 2, 2, 3))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(one_to_one_backward(edge, np.ones_like(a), mask, (3, 4, 5)), a)


def test_backward_shapes() -> None:
    x = np.random.default_rng(1).standard_normal((2, 4, 6, 8))
    for edge in EDGES:
        y, kept = one_to_one_forward(edge, x, draw=(0, 0, 0, 0))
        g = one_to_one_backward(edge, np.ones_like(y), kept, (4, 6, 8))
        assert g.shape == x.shape, edge.kind
