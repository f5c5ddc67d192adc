"""The PyTorch twin exported to ONNX once, at a small patch, runs in ONNX Runtime at other patches with the outputs of
the sequential reference on the same weights."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from znn.bench.engines import bench_inputs, bench_net  # noqa: E402
from znn.bench.onnxnet import export_onnx, run_session, session, static_copy  # noqa: E402
from znn.pipeline.forward.sequential import sequential_forward  # noqa: E402

TOL = 1e-4  # float32, relative to the output's largest magnitude


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    net = bench_net("tiny3d", 3)
    path = export_onnx(net, tmp_path_factory.mktemp("onnx") / "tiny3d.onnx", patches=[(2, 5, 3), (6, 6, 6)])
    return net, path


@pytest.mark.parametrize("outsz", [(2, 5, 3), (6, 6, 6)])
def test_one_export_runs_at_every_patch(tiny, tmp_path, outsz):
    net, path = tiny
    x = bench_inputs(net.spec, outsz, seed=4)
    want = sequential_forward(net, x, outsz)
    for model in (path, static_copy(path, tmp_path / "static.onnx", net.spec.layout(outsz).input_patch)):
        got = run_session(session(model, threads=1), x)
        for name, w in want.items():
            assert got[name].shape == w.shape == (net.spec.nodes[name].size, *outsz)
            np.testing.assert_allclose(got[name], w, rtol=TOL, atol=TOL * np.abs(w).max())


def test_a_session_uses_the_threads_asked(tiny):
    sess = session(tiny[1], threads=2)
    assert sess.get_session_options().intra_op_num_threads == 2
    assert sess.get_session_options().inter_op_num_threads == 1
    assert sess.get_providers() == ["CPUExecutionProvider"]
