"""The PyTorch twin of a network (:mod:`znn.bench.torchnet`) exported to ONNX and run by ONNX Runtime: the peer
`znn bench forward` times beside PyTorch, on the same weights.

* :func:`export_onnx`: ``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``, opset
  :data:`OPSET`), which needs only torch and onnx (the dynamo exporter, PyTorch's default since 2.9, also needs
  onnxscript). The twin is traced once per network at a small output patch with its z, y, x axes dynamic: every
  crop the twin makes is the same at every patch (:meth:`~znn.bench.torchnet.TorchNet.trims`), so the graph is
  valid at any patch, which :func:`export_onnx` checks for the patches asked. Tracing runs the twin once, so
  exporting at the small patch costs a second, where an export at each large patch would cost a PyTorch pass.
* :func:`static_copy`: the model with the input shape of one patch fixed, as an export at that patch would be (ONNX
  Runtime then plans every tensor's shape ahead).
* :func:`session`: ONNX Runtime's CPU execution provider, ``intra_op_num_threads`` threads, one inter-op thread.

torch and onnx are needed to export, onnxruntime to run (all three in the ``bench`` extra); this module imports
them where they are used, so a process that only runs a model never imports torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from znn.errors import ShapeError
from znn.network import Network

__all__ = ["OPSET", "EXPORTER", "export_onnx", "static_copy", "session", "run_session"]

OPSET = 17
EXPORTER = f"torch.onnx.export (TorchScript exporter, dynamo=False), opset {OPSET}"


def export_onnx(net: Network, path: str | Path, patches: Sequence[Sequence[int]] = (),
                outsz: Sequence[int] = (1, 1, 1)) -> Path:
    """Write ``net`` (its PyTorch twin at output patch ``outsz``, spatial axes dynamic) as an ONNX model at
    ``path``. Inputs and outputs are named after the network's input and output nodes, ``(1, maps, z, y, x)``.
    Raises :class:`ShapeError` if the graph would not hold at one of ``patches`` (a crop that changes with the
    patch)."""
    import torch

    from znn.bench.torchnet import build_torch_net

    spec = net.spec
    model = build_torch_net(net, outsz)
    for patch in patches:
        if build_torch_net(net, patch).trims() != model.trims():
            raise ShapeError(f"the PyTorch twin of this network crops differently at output patch {tuple(patch)} "
                             f"than at {tuple(outsz)}; one ONNX export does not serve both")
    dtype = next(iter(model.weight.values())).dtype
    args = tuple(torch.zeros((1, spec.nodes[n].size, *model.input_patch[n]), dtype=dtype) for n in spec.inputs)
    axes = {n: {2: f"{n}_z", 3: f"{n}_y", 4: f"{n}_x"} for n in (*spec.inputs, *spec.outputs)}
    with warnings.catch_warnings():  # the exporter's deprecation notice, the tracer's notes on the shape check
        warnings.simplefilter("ignore")
        torch.onnx.export(_positional(model), args, str(path), opset_version=OPSET, dynamo=False,
                          input_names=list(spec.inputs), output_names=list(spec.outputs), dynamic_axes=axes)
    return Path(path)


def _positional(model: Any) -> Any:
    """``model`` (a TorchNet) as a module of positional inputs and outputs, in the spec's node order."""
    import torch

    class Positional(torch.nn.Module):  # type: ignore[misc,unused-ignore]  # torch is Any without it
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, *xs: Any) -> tuple[Any, ...]:
            out = self.net(dict(zip(model.spec.inputs, xs)))
            return tuple(out[n] for n in model.spec.outputs)

    return Positional().eval()


def static_copy(src: str | Path, dst: str | Path, input_patch: Mapping[str, Sequence[int]]) -> Path:
    """A copy of the model at ``src`` with each input's z, y, x fixed to ``input_patch[name]``, at ``dst``."""
    import onnx

    model = onnx.load(str(src))
    for value in model.graph.input:
        if value.name in input_patch:
            for dim, size in zip(value.type.tensor_type.shape.dim[2:], input_patch[value.name]):
                dim.dim_value = int(size)
    onnx.save(model, str(dst))
    return Path(dst)


def session(path: str | Path, threads: int) -> Any:
    """An ONNX Runtime session of the model at ``path`` on the CPU: ``threads`` intra-op threads, one inter-op."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(sess: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``sess`` on NumPy ``(maps, z, y, x)`` inputs; the outputs by node name, ``(maps, z, y, x)``."""
    feed = {i.name: np.ascontiguousarray(inputs[i.name])[None] for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    return {n: y[0] for n, y in zip(names, sess.run(names, feed))}
